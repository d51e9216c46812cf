#!/usr/bin/env python3
"""Break one piece of MagicMix's Algorithm 1 at a time and list the tests that catch it.

Each sabotage is a one-line edit of the engine's source, made in a throw-away copy of the
working tree (the real one is never touched); the semantic tests then run against that copy.
A sabotage that no test catches is a hole in the suite, and this script exits 1.

    .venv/bin/python scripts/sabotage.py            # every sabotage, a Markdown table
    .venv/bin/python scripts/sabotage.py --only nu   # the ones whose name contains "nu"
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess  # nosec B404 - runs pytest on a copy of this repo
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = "magicmix/engine/pipeline.py"
REQUEST = "magicmix/request.py"
TESTS = "tests/test_semantics.py"


@dataclass(frozen=True)
class Sabotage:
    name: str
    path: str
    old: str
    new: str


SABOTAGES = (
    Sabotage(
        "swap ν and 1-ν in the layout mix",
        PIPELINE,
        "return mix_factor * denoised + (1.0 - mix_factor) * layout",
        "return (1.0 - mix_factor) * denoised + mix_factor * layout",
    ),
    Sabotage(
        "noise the layout to t=999, not kmax",
        PIPELINE,
        "latents = scheduler.add_noise(z0, self._noise(generators, z0), timesteps[:1])",
        "latents = scheduler.add_noise(z0, self._noise(generators, z0), torch.tensor([999]))",
    ),
    Sabotage(
        "noise the layout to kmin's t, not kmax",
        PIPELINE,
        "latents = scheduler.add_noise(z0, self._noise(generators, z0), timesteps[:1])",
        "latents = scheduler.add_noise(z0, self._noise(generators, z0),"
        " timesteps[first.layout_steps : first.layout_steps + 1])",
    ),
    Sabotage(
        "mix the layout noised to t, not t-1",
        PIPELINE,
        "prev_t = int(t) - step_size",
        "prev_t = int(t)",
    ),
    Sabotage(
        "mix the layout noised to t-2, not t-1",
        PIPELINE,
        "prev_t = int(t) - step_size",
        "prev_t = int(t) - 2 * step_size",
    ),
    Sabotage(
        "mix the clean layout z0, not noised",
        PIPELINE,
        "scheduler.add_noise(z0, self._noise(generators, z0), torch.tensor([prev_t]))",
        "z0",
    ),
    Sabotage(
        "swap conditional and unconditional text",
        PIPELINE,
        "uncond, cond = noise.chunk(2)",
        "cond, uncond = noise.chunk(2)",
    ),
    Sabotage(
        "ignore the negative prompt",
        PIPELINE,
        "texts = [r.negative_prompt for r in requests] + [r.prompt for r in requests]",
        'texts = ["" for r in requests] + [r.prompt for r in requests]',
    ),
    Sabotage(
        "no content phase (kmin ignored)",
        REQUEST,
        "return run, run - int(kmin * steps)",
        "return run, run",
    ),
    Sabotage(
        "no layout phase",
        REQUEST,
        "return run, run - int(kmin * steps)",
        "return run, 0",
    ),
)


def copy_env(tree: Path) -> dict[str, str]:
    """This environment, importing `magicmix` from `tree` (ahead of the editable install)."""
    return {**os.environ, "PYTHONPATH": str(tree)}


def failed_tests(tree: Path) -> list[str]:
    """Run the semantic tests in `tree`; the names of those that failed."""
    result = subprocess.run(  # nosec B603 - fixed argv
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", TESTS],
        cwd=tree,
        env=copy_env(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    names = re.findall(r"^FAILED \S+::(\S+)", result.stdout, flags=re.MULTILINE)
    if result.returncode not in (0, 1) or (result.returncode == 1 and not names):
        raise RuntimeError(f"pytest did not run cleanly:\n{result.stdout[-3000:]}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the sabotages whose name has this")
    args = parser.parse_args()
    chosen = [s for s in SABOTAGES if args.only in s.name]
    with tempfile.TemporaryDirectory(prefix="sabotage-") as scratch:
        tree = Path(scratch) / "repo"
        shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".venv", ".git", ".magicmix"))
        where = subprocess.run(  # nosec B603 - fixed argv
            [sys.executable, "-c", "import magicmix; print(magicmix.__file__)"],
            cwd=tree,
            env=copy_env(tree),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        if not where.startswith(str(tree)):
            raise RuntimeError(f"the copy imports magicmix from {where.strip()}, not {tree}")
        honest = failed_tests(tree)
        if honest:
            print(f"the honest engine already fails: {honest}", file=sys.stderr)
            return 1
        print("| sabotage | tests that failed |\n|---|---|")
        holes = 0
        for sabotage in chosen:
            target = tree / sabotage.path
            original = target.read_text()
            if original.count(sabotage.old) != 1:
                raise RuntimeError(f"{sabotage.name}: the line to break is not in {sabotage.path}")
            target.write_text(original.replace(sabotage.old, sabotage.new))
            try:
                caught = failed_tests(tree)
            finally:
                target.write_text(original)
            holes += not caught
            print(f"| {sabotage.name} | {', '.join(caught) or '**none**'} |", flush=True)
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main())
