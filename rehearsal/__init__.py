"""A local rehearsal of a Modal app: its functions run unmodified under an emulated runtime.

`scripts/modal-rehearsal` runs `modal_app.py` (or `--app MODULE`) with a stand-in `modal`
package (`fake_modal`) in every process; a control plane in the main process
(`control`) holds what Modal's servers hold and runs each container as its own process
(`container`), or as a fork of its function's memory snapshot (`snapshots`); `images`
limits what a container imports to what its image installs; `proxy` is the web
function's front door; `hooks` add latency and count database and bucket calls;
`client` launches a rehearsal and connects a test or benchmark to it; `local` is
`make rehearse` (with `loopback`'s S3 server and a throwaway PostgreSQL).
Only documented Modal semantics are emulated, each cited where it is implemented.
Not part of the wheel: it needs a checkout.
"""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the plane and containers
