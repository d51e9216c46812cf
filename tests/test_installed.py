"""The package as `pip install .` leaves it works away from the repository.

The wheel is built once per session from a copy of the sources (offline: no build
isolation, the venv's setuptools) and installed into a scratch folder; the commands run
from another scratch folder with `python -S`, so neither the repository nor the venv's
editable install of it can be imported: only the installed copy, and the venv's
dependencies through PYTHONPATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import make_layout_image

ROOT = Path(__file__).resolve().parent.parent


def _pip(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the installed package, built from this checkout's sources."""
    scratch = tmp_path_factory.mktemp("wheel")
    source = scratch / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "magicmix", source / "magicmix", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    _pip(
        "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(scratch), str(source)
    )
    (wheel,) = scratch.glob("magicmix-*.whl")
    target = scratch / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    return target


def magicmix(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`magicmix ARGS` from the installed copy's console script, run in `cwd`."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "PYTHONPATH": os.pathsep.join([str(installed), sysconfig.get_paths()["purelib"]]),
        "HF_HUB_OFFLINE": "1",
        "MAGICMIX_DATA_DIR": str(cwd / "data"),
    }
    return subprocess.run(
        [sys.executable, "-S", str(installed / "bin" / "magicmix"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


@pytest.fixture
def elsewhere(tmp_path: Path) -> Path:
    """A working folder with no repository beside it."""
    assert not (tmp_path / "benchmarks").exists() and not (tmp_path / "magicmix").exists()
    return tmp_path


def test_the_installed_copy_is_the_one_imported(installed: Path, elsewhere: Path) -> None:
    done = magicmix(installed, elsewhere, "--help")
    assert done.returncode == 0, done.stderr
    assert "plan" in done.stdout and "mix" in done.stdout
    assert not (installed / "magicmix" / "planner" / "calibrate.py").exists()  # benchmarks'


def test_installed_plan_finds_its_shipped_profile(installed: Path, elsewhere: Path) -> None:
    done = magicmix(installed, elsewhere, "plan", "--burst", "200", "--json")
    assert done.returncode == 0, done.stderr
    assert '"requests": 200' in done.stdout
    shipped = installed / "magicmix" / "planner" / "profiles" / "profile-h200-2026-11-27.json"
    assert shipped.is_file()


def test_installed_mix_runs_the_shipped_toy_model(installed: Path, elsewhere: Path) -> None:
    make_layout_image(256, 256).save(elsewhere / "layout.png")
    out = elsewhere / "out.png"
    done = magicmix(
        installed,
        elsewhere,
        "mix",
        "--image", "layout.png",
        "--prompt", "a red circle",
        "--out", str(out),
        "--width", "256",
        "--height", "256",
        "--steps", "4",
        "--seed", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(b"\x89PNG") and "256x256, seed 1" in done.stderr
