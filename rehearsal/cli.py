"""`scripts/modal-rehearsal`: run a Modal app's functions here, under an emulated runtime.

The app module is imported here (the control plane needs its declarations) and in every
emulated container, each time with `rehearsal.fake_modal` as `modal`. It runs until
SIGINT or SIGTERM; then every container it started is stopped, and the counters are
printed and written to STATE_DIR/counters.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

import uvicorn

from rehearsal import LOG_FORMAT, fake_modal
from rehearsal.control import ControlPlane, write_control_file
from rehearsal.proxy import FrontDoor
from rehearsal.state import Options

log = logging.getLogger("rehearsal")
ROOT = Path(__file__).resolve().parent.parent
READY = "modal-rehearsal: ready"  # the line tests and scripts wait for


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modal-rehearsal", description=__doc__)
    p.add_argument("--port", type=int, help="serve the web function on 127.0.0.1:PORT")
    p.add_argument("--gpus", type=int, help="at most N containers of GPU functions (processes)")
    p.add_argument(
        "--crash-gpu-every",
        type=int,
        metavar="K",
        help="SIGKILL the GPU container running every K-th batch, mid-batch",
    )
    p.add_argument(
        "--sweep-every",
        type=float,
        metavar="S",
        help="run scheduled functions every S seconds (default: their schedule's period)",
    )
    p.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="added to every database, bucket and Modal call",
    )
    p.add_argument(
        "--max-containers-default",
        type=int,
        default=8,
        metavar="N",
        help="at most N containers of a function that sets no max_containers (default 8)",
    )
    p.add_argument("--app", default="modal_app", help="the app's module (default: modal_app)")
    p.add_argument("--state-dir", type=Path, help="Volumes, counters, the control file")
    p.add_argument(
        "--web-request-limit",
        type=float,
        default=150.0,
        metavar="S",
        help="answer a 303 to a result URL after S seconds (Modal: 150)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per forwarded request
    state_dir = (args.state_dir or Path(tempfile.mkdtemp(prefix="modal-rehearsal-"))).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    web_url = f"http://127.0.0.1:{args.port}" if args.port else None
    # The GPU class runs on this machine's CPU; the containers inherit all of this.
    os.environ.update(
        {
            "MAGICMIX_DEVICE": "cpu",
            "MAGICMIX_DTYPE": "float32",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            fake_modal.ENV_STATE_DIR: str(state_dir),
            **({fake_modal.ENV_WEB_URL: web_url} if web_url else {}),
        }
    )
    fake_modal.install(plane=True)  # in no image's container: the images' imports fail here
    module = importlib.import_module(args.app)
    app = fake_modal.app_of(module)
    options = Options(
        app_module=args.app,
        gpus=args.gpus,
        crash_gpu_every=args.crash_gpu_every,
        sweep_every=args.sweep_every,
        latency_ms=args.latency_ms,
        default_max_containers=args.max_containers_default,
    )
    plane = ControlPlane(app, options)
    problems = plane.check_deployable()
    if problems:
        for problem in problems:
            print(f"modal-rehearsal: cannot deploy {app.name}: {problem}", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    plane.start()
    server = serve_web(plane, args.port, args.web_request_limit) if args.port else None
    write_control_file(state_dir / "control", plane)
    print(
        f"{READY}: app {app.name!r}, web {web_url or '(not served)'}, state {state_dir}", flush=True
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        if server is not None:
            server.should_exit = True
        plane.stop()
        counters = plane.op_counters()
        (state_dir / "counters.json").write_text(json.dumps(counters, indent=2, sort_keys=True))
        print(json.dumps(counters, sort_keys=True), flush=True)
    return 0


def serve_web(plane: ControlPlane, port: int, limit_s: float) -> uvicorn.Server:
    """uvicorn serving the front door on 127.0.0.1:PORT, in a thread; returns the server."""

    service = plane.web_service()
    if service is None:
        raise SystemExit("modal-rehearsal: --port given, but the app has no web function")
    front = FrontDoor(plane, service, limit_s)
    config = uvicorn.Config(front, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="rehearsal-front-door", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"modal-rehearsal: could not serve on 127.0.0.1:{port}")
        threading.Event().wait(0.02)
    return server
