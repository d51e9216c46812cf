"""Memory snapshots: one process per function holds the snapshot, containers are its forks.

"Modal can snapshot your container's memory after it has started up, and restore from
that snapshot to start new containers" (https://modal.com/docs/guide/memory-snapshots):
the snapshot is taken after the import and the `@modal.enter(snap=True)` methods, and
every container restored from it runs only what comes after. Here the snapshot is a
process that did exactly that (`rehearsal/container.py --snapshot`) and then forks one
child per container; a child is a restored container. Starting one costs a fork, not an
import of torch, so a crash or a scale-up is as cheap as Modal means it to be. How long
Modal takes to restore is not emulated (it is neither documented nor this machine's).

The control plane sees a forked container through `Forked`, which answers as much of
`subprocess.Popen` as it uses; the snapshot process reaps its children and reports their
exits, and a child dies with its snapshot process (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import TextIO

from rehearsal.container import ENV_SNAPSHOT_FDS

log = logging.getLogger(__name__)


class Forked:
    """A container forked from a snapshot; its pid is known once the fork happened."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._ended = threading.Event()
        self._signal_on_start: int | None = None

    def started(self, pid: int) -> None:
        with self._lock:
            self.pid = pid
            pending, self._signal_on_start = self._signal_on_start, None
        if pending is not None:
            self.send_signal(pending)

    def ended(self, code: int) -> None:
        with self._lock:
            if self.returncode is None:
                self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"container {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            if self.pid is None:  # not forked yet: on start (a kill wins over a stop)
                if self._signal_on_start != signal.SIGKILL:
                    self._signal_on_start = signum
                return
            pid = self.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class Snapshot:
    """The snapshot process of one function, and the containers forked from it."""

    def __init__(
        self, command: list[str], env: dict[str, str], on_failed: Callable[[str], None]
    ) -> None:
        commands_in, commands_out = os.pipe()
        events_in, events_out = os.pipe()
        env = {**env, ENV_SNAPSHOT_FDS: f"{commands_in},{events_out}"}
        self.proc = subprocess.Popen(  # its own process group: a terminal's Ctrl-C is the plane's
            command, env=env, pass_fds=(commands_in, events_out), process_group=0
        )
        os.close(commands_in)
        os.close(events_out)
        self._commands: TextIO = os.fdopen(commands_out, "w", buffering=1)
        self._events: TextIO = os.fdopen(events_in, "r")
        self._on_failed = on_failed
        self._lock = threading.Lock()
        self._asked: dict[str, Forked] = {}  # by container id, until forked
        self._children: dict[int, Forked] = {}  # by pid
        self._gone = False
        threading.Thread(target=self._read, name="rehearsal-snapshot", daemon=True).start()

    @property
    def alive(self) -> bool:
        return not self._gone

    def fork(self, container_id: str) -> Forked:
        """Ask for a container restored from the snapshot (forked once the snapshot exists)."""
        child = Forked()
        with self._lock:
            if self._gone:
                child.ended(1)
                return child
            self._asked[container_id] = child
            try:
                self._commands.write(f"fork {container_id}\n")
            except (BrokenPipeError, ValueError):
                del self._asked[container_id]
                child.ended(1)
        return child

    def stop(self, grace_s: float = 5.0) -> None:
        with self._lock, contextlib.suppress(OSError):
            self._commands.close()
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _read(self) -> None:
        for line in self._events:
            kind, _, rest = line.rstrip("\n").partition(" ")
            if kind == "failed":
                self._on_failed(rest)
            elif kind == "started":
                container_id, pid = rest.split()
                with self._lock:
                    child = self._asked.pop(container_id)
                    self._children[int(pid)] = child
                child.started(int(pid))
            elif kind == "exit":
                pid, code = rest.split()
                with self._lock:
                    child = self._children.pop(int(pid))
                child.ended(int(code))
        self.proc.wait()
        with self._lock:  # the snapshot process is gone, and its children with it
            self._gone = True
            asked, self._asked = list(self._asked.values()), {}
            children, self._children = list(self._children.values()), {}
        for child in asked:
            child.ended(1)
        for child in children:
            child.kill()
            child.ended(-signal.SIGKILL)
