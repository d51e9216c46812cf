"""`modal.Dict`'s server side: named Dicts of pickled keys and values, held in memory.

Keys compare by their pickled bytes, as on Modal's server. "An individual Dict entry will
expire after 7 days of inactivity (no reads or writes)" (modal/dict.py): `get` and `put`
touch an entry; listing (`items`, `len`) and `contains` do not, since the docs do not say
they do. `put(..., skip_if_exists=True)` is one atomic insert-if-absent, as on Modal.
Entries live as long as the rehearsal does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from rehearsal.fake_modal import exception

EXPIRE_AFTER_S = 7 * 24 * 3600.0


@dataclass
class _Entry:
    value: bytes
    touched: float


Entries = dict[bytes, _Entry]


class Dicts:
    """Every Dict of the rehearsed app; `call` serves `rehearsal.fake_modal.Dict`."""

    OPS = frozenset({"get", "put", "update", "pop", "contains", "clear", "len", "items"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._named: dict[str, Entries] = {}

    def call(self, name: str, create: bool, op: str, *args: Any) -> Any:
        if op not in self.OPS:
            raise ValueError(f"unknown Dict operation {op!r}")
        with self._lock:
            entries = self._named.get(name)
            if entries is None:
                if not create:
                    raise exception.NotFoundError(f"Dict '{name}' not found")
                entries = self._named[name] = {}
            return getattr(self, f"_{op}")(entries, time.time(), *args)

    @staticmethod
    def _live(entries: Entries, key: bytes, now: float) -> _Entry | None:
        entry = entries.get(key)
        if entry is not None and entry.touched < now - EXPIRE_AFTER_S:
            del entries[key]
            return None
        return entry

    def _get(self, entries: Entries, now: float, key: bytes) -> tuple[bool, bytes | None]:
        entry = self._live(entries, key, now)
        if entry is None:
            return False, None
        entry.touched = now
        return True, entry.value

    def _put(
        self, entries: Entries, now: float, key: bytes, value: bytes, skip_if_exists: bool
    ) -> bool:
        if skip_if_exists and self._live(entries, key, now) is not None:
            return False
        entries[key] = _Entry(value, now)
        return True

    def _update(self, entries: Entries, now: float, pairs: list[tuple[bytes, bytes]]) -> None:
        for key, value in pairs:
            entries[key] = _Entry(value, now)

    def _pop(self, entries: Entries, now: float, key: bytes) -> tuple[bool, bytes | None]:
        entry = self._live(entries, key, now)
        entries.pop(key, None)
        return (True, entry.value) if entry is not None else (False, None)

    def _contains(self, entries: Entries, now: float, key: bytes) -> bool:
        return self._live(entries, key, now) is not None

    def _clear(self, entries: Entries, now: float) -> None:
        entries.clear()

    def _items(self, entries: Entries, now: float) -> list[tuple[bytes, bytes]]:
        return [(k, e.value) for k, e in list(entries.items()) if self._live(entries, k, now)]

    def _len(self, entries: Entries, now: float) -> int:
        return len(self._items(entries, now))
