"""A process outside the rehearsal (a test, a benchmark, a laptop's CLI) talking to it.

`launch(command, env, ready_at=...)` starts a rehearsal (`scripts/modal-rehearsal`, or
`make rehearse`'s entry) as a process and keeps its output. `connect(state_dir)` makes
`rehearsal.fake_modal`'s calls in this process go to the running rehearsal, as `modal`
does to Modal from a laptop: `Function.from_name(app, name).spawn(...)`,
`FunctionCall.from_id(id).get(...)`, `.cancel()`. The returned `Control` also looks
inside: counters, timings, containers, the state of an input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rehearsal import wire

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Launched:
    """A rehearsal process and its output (its containers' too), read as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float) -> bool:
        """Whether it printed its ready line within `timeout` and still runs."""
        return self.ready.wait(timeout) and self.proc.poll() is None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """`signum` (Ctrl-C is SIGINT) unless it ended; SIGKILL after `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def launch(command: list[str], env: dict[str, str], *, ready_at: str) -> Launched:
    """Start `command` in the checkout with `env` added; `ready` is set once a line starts
    with `ready_at` (or the output ends). The output is read all along, so no pipe fills."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    launched = Launched(proc)

    def drain() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            launched.lines.append(line)
            if line.startswith(ready_at):
                launched.ready.set()
        launched.ready.set()

    threading.Thread(target=drain, name="rehearsal-output", daemon=True).start()
    return launched


@dataclass
class Control:
    link: wire.Wire

    def counters(self) -> dict[str, Any]:
        return dict(self.link.call("counters"))

    def function_counters(self, tag: str) -> dict[str, int]:
        return dict(self.counters()["functions"].get(tag, {}))

    def timings(self, tag: str) -> dict[str, list[Any]]:
        """Completed batches (size, seconds) and container starts (seconds) of a function."""
        return dict(self.link.call("timings", tag))

    def containers(self) -> list[dict[str, Any]]:
        return list(self.link.call("containers"))

    def input(self, call_id: str) -> dict[str, Any]:
        return dict(self.link.call("input", call_id))

    def wait_input(self, call_id: str, *states: str, timeout: float = 60.0) -> dict[str, Any]:
        """Until the input is in one of `states` ("running": its user code started)."""
        seen = dict(self.link.call("wait_input", call_id, list(states), timeout))
        assert seen["state"] in states, f"{call_id} is {seen['state']} after {timeout} s"
        return seen

    def close(self) -> None:
        wire.use(None)
        self.link.close()


def connect(state_dir: Path) -> Control:
    address, authkey = (state_dir / "control").read_text().split()
    host, _, port = address.rpartition(":")
    link = wire.Wire((host, int(port)), bytes.fromhex(authkey), ("client",))
    wire.use(link)
    return Control(link)
