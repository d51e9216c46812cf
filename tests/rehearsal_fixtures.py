"""Run `scripts/modal-rehearsal` as a real process and connect to it, as a laptop would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rehearsal import client
from rehearsal.cli import READY
from tests.http_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "modal-rehearsal"


def until(check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `check` until it is truthy (a bound for a broken build, not a budget)."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
    return value


@dataclass
class Rehearsal:
    """A running rehearsal: its process, its control connection, its web URL, its log."""

    proc: subprocess.Popen[str]
    control: client.Control
    base_url: str
    state_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)


def _drain(proc: subprocess.Popen[str], lines: list[str], ready: threading.Event) -> None:
    """Keep reading its output (and its containers'), so no pipe fills up."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(READY):
            ready.set()
    ready.set()


@contextmanager
def rehearsing(
    state_dir: Path,
    *flags: str,
    env: dict[str, str],
    app: str = "tests.rehearsal_app",
    start_timeout: float = 120.0,
) -> Iterator[Rehearsal]:
    """`scripts/modal-rehearsal --app APP --port P FLAGS` until the block ends (SIGTERM)."""
    port = free_port()
    command = [sys.executable, str(SCRIPT), "--app", app, "--port", str(port)]
    command += ["--state-dir", str(state_dir), *flags]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    ready = threading.Event()
    threading.Thread(target=_drain, args=(proc, lines, ready), daemon=True).start()
    try:
        assert ready.wait(start_timeout) and proc.poll() is None, "".join(lines)
        control = client.connect(state_dir)
        try:
            yield Rehearsal(proc, control, f"http://127.0.0.1:{port}", state_dir, lines)
        finally:
            control.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
