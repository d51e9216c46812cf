"""In-memory stand-ins for what Modal cannot run here (no credentials, no network).

`InMemoryDict` mirrors the `modal.Dict` methods the Modal backend uses, with the same
signatures (a test checks them against the installed `modal`), and the one atomicity the
backend relies on: `put(..., skip_if_exists=True)` creates a key at most once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from magicmix.modal_state import DictJobStore, ModalState

_NO_DEFAULT = object()


class InMemoryDict:
    """A `modal.Dict` stand-in: one process, a lock instead of Modal's server."""

    def __init__(self) -> None:
        self._data: dict[Any, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            return self._data.get(key, default)

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        with self._lock:
            if skip_if_exists and key in self._data:
                return False
            self._data[key] = value
            return True

    def pop(self, key: Any, default: Any = _NO_DEFAULT) -> Any:
        with self._lock:
            if default is _NO_DEFAULT:
                return self._data.pop(key)
            return self._data.pop(key, default)

    def items(self) -> Iterator[tuple[Any, Any]]:
        with self._lock:
            return iter(list(self._data.items()))

    def len(self) -> int:
        with self._lock:
            return len(self._data)


def standin_state() -> ModalState:
    return ModalState(
        jobs=InMemoryDict(), active=InMemoryDict(), expiring=InMemoryDict(), keys=InMemoryDict()
    )


def standin_job_store() -> DictJobStore:
    state = standin_state()
    return DictJobStore(state.jobs, state.active, state.expiring)
