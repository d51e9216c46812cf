"""Which packages an emulated container may import: those its image installs.

A Modal container runs its image, not the deploying machine's environment, so an import
of a package the image does not install fails there with `ImportError`; inside an
`image.imports()` block of another image that failure is recorded and suppressed
(modal/_image.py, `imports`). The rehearsal runs every container on this machine's
environment, so it refuses such imports itself:

- in a container of an image that declares its packages (`pip_install`,
  `pip_install_from_requirements`, `uv_pip_install`), a top-level module that belongs
  to an installed distribution outside those packages and their dependencies is refused,
  unless the image adds it as local source (`add_local_python_source`);
- an image that declares none, or builds in ways the rehearsal cannot read (commands, a
  registry image, a pyproject), is this machine's environment: nothing is refused;
- the control plane is in no image's container: every import inside an `imports()`
  block that is not already loaded is refused there, so it never loads torch.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ENV_REFUSED = "REHEARSAL_REFUSED_IMPORTS"  # comma-separated top-level names, for a container


def read_requirements(path: Path) -> list[Requirement]:
    """The requirements of a pip requirements file (`-r` followed; options skipped)."""
    found: list[Requirement] = []
    text = path.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("-r ", "--requirement ")):
            found += read_requirements(path.parent / line.split(None, 1)[1])
            continue
        if line.startswith("-"):
            continue  # -c, -e, --hash, --index-url ...: nothing this check needs
        try:
            found.append(Requirement(line.split(" --", 1)[0]))
        except InvalidRequirement:
            continue
    return found


def with_dependencies(requirements: Iterable[Requirement]) -> set[str]:
    """Canonical names of the requirements and, as installed here, their dependencies."""
    seen: set[str] = set()
    todo = [(req, frozenset(req.extras)) for req in requirements]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            dep = Requirement(line)
            wanted = dep.marker is None or any(
                dep.marker.evaluate({"extra": extra}) for extra in (extras or {""})
            )
            if wanted:
                todo.append((dep, frozenset(dep.extras)))
    return seen


def refused_names(installs: set[str], local: Sequence[str], exempt: Iterable[str]) -> list[str]:
    """Top-level module names of distributions installed here but not in `installs`."""
    allowed = set(local) | set(exempt)
    return sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module not in allowed and not any(canonicalize_name(d) in installs for d in dists)
    )


class _Hiding(importlib.abc.MetaPathFinder):
    """The path finder, blind to the top-level modules `names` (to all, for `None`).

    It stands in for `importlib.machinery.PathFinder`, so a hidden module is one that is
    not installed: `import` raises `ModuleNotFoundError` and `importlib.util.find_spec`
    answers None (libraries probe optional dependencies that way)."""

    def __init__(self, names: frozenset[str] | None) -> None:
        self.names = names

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if self.names is None or fullname.partition(".")[0] in self.names:
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, path, target)

    def invalidate_caches(self) -> None:
        importlib.machinery.PathFinder.invalidate_caches()

    def find_distributions(self, *args: Any, **kwargs: Any) -> Any:
        """Distribution metadata as the path finder has it (`importlib.metadata` asks here)."""
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)


def _swap(old: Any, new: Any) -> None:
    sys.meta_path[sys.meta_path.index(old)] = new


def guard_container() -> None:
    """In a container: what its image does not install (`ENV_REFUSED`) is not there."""
    names = os.environ.get(ENV_REFUSED)
    if names:
        _swap(importlib.machinery.PathFinder, _Hiding(frozenset(names.split(","))))


@contextlib.contextmanager
def nothing_new() -> Iterator[None]:
    """No module that is not loaded yet can be found in the block: the control plane
    inside `imports()`."""
    hiding = _Hiding(None)
    _swap(importlib.machinery.PathFinder, hiding)
    try:
        yield
    finally:
        _swap(hiding, importlib.machinery.PathFinder)
