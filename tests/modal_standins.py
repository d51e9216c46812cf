"""In-memory stand-ins for what Modal cannot run here (no credentials, no network).

`InMemoryDict` implements the documented semantics of `modal.Dict` that the backend
relies on, and nothing more (modal 1.6.4, `modal/dict.py`; https://modal.com/docs/guide/dicts):
- `get(key, default=None)`: "Returns `default` if key does not exist." (dict.py:494)
- `put(key, value, *, skip_if_exists=False) -> bool`: "Returns True if the key-value pair
  was added and False if it wasn't because the key already existed and `skip_if_exists`
  was set." (dict.py:556) One request, so insert-if-absent is atomic: Modal calls it a
  locking primitive giving "exactly once" semantics (https://modal.com/blog/cache-dict-launch).
- `pop(key, default)`: "Remove a key from the Dict, returning the value if it exists. If
  key is not found, return default if provided, otherwise raise KeyError." (dict.py:583)
- `items()`: "the return value is a simple iterator, and results are unordered."
  (dict.py:643) The stand-in shuffles, so no test can lean on an order.
- Values are pickled, so "updates to mutable value types will not be reflected in other
  containers unless the updated object is explicitly put back" (the guide): the stand-in
  stores and returns copies.
A test (`test_standin_has_modal_dict_signatures`) checks the signatures against the
installed `modal`.
"""

from __future__ import annotations

import pickle  # nosec B403 - our own values, as Modal itself pickles them
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from magicmix.backends.modal.state import DictJobStore, ModalState
from magicmix.outputs.store import LocalStore

_NO_DEFAULT = object()
DICT_NAMES = ("jobs", "active", "outbox", "expiring", "keys")


class InMemoryDict:
    """A `modal.Dict` stand-in: one process, a lock instead of Modal's server."""

    def __init__(self) -> None:
        self._data: dict[Any, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, default: Any = None) -> Any:
        with self._lock:
            data = self._data.get(key)
        return default if data is None else pickle.loads(data)  # nosec B301

    def put(self, key: Any, value: Any, *, skip_if_exists: bool = False) -> bool:
        data = pickle.dumps(value)
        with self._lock:
            if skip_if_exists and key in self._data:
                return False
            self._data[key] = data
            return True

    def pop(self, key: Any, default: Any = _NO_DEFAULT) -> Any:
        with self._lock:
            if key not in self._data:
                if default is _NO_DEFAULT:
                    raise KeyError(key)
                return default
            return pickle.loads(self._data.pop(key))  # nosec B301

    def items(self) -> Iterator[tuple[Any, Any]]:
        with self._lock:
            pairs = list(self._data.items())
        random.shuffle(pairs)
        return iter([(key, pickle.loads(data)) for key, data in pairs])  # nosec B301


def standin_dicts() -> dict[str, InMemoryDict]:
    return {name: InMemoryDict() for name in DICT_NAMES}


def standin_state(layouts_dir: Path) -> ModalState:
    """Modal Dicts as stand-ins; layout images in a real (local) blob store."""
    return ModalState(**standin_dicts(), layouts=LocalStore(layouts_dir))


def standin_job_store(layouts_dir: Path) -> DictJobStore:
    return DictJobStore(standin_state(layouts_dir))
