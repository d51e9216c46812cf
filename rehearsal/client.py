"""A process outside the rehearsal (a test, a benchmark, a laptop's CLI) talking to it.

`connect(state_dir)` makes `rehearsal.fake_modal`'s calls in this process go to the
running rehearsal, as `modal` does to Modal from a laptop: `Function.from_name(app,
name).spawn(...)`, `FunctionCall.from_id(id).get(...)`, `.cancel()`. The
returned `Control` also looks inside: counters, containers, the state of an input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rehearsal import wire


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
