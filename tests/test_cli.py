"""The `magicmix` command line, run as a real process (as a user would) or, where a fresh
process adds nothing but torch's import time, in this one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import make_layout_image, run_cli


def magicmix(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "magicmix", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MAGICMIX_DATA_DIR": str(tmp_path / "data"), "MAGICMIX_DEVICE": "cpu"}


def test_build_tiny_then_mix_in_two_processes_gives_identical_pngs(
    tmp_path: Path, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same seed gives the same bytes in a fresh process as in this one."""
    model = tmp_path / "tiny"
    built = run_cli(monkeypatch, cli_env, "build-tiny", str(model))
    assert built.exit_code == 0, built.output
    assert (model / "model_index.json").exists()
    layout = tmp_path / "layout.jpg"
    make_layout_image().save(layout)
    env = {**cli_env, "MAGICMIX_MODEL": str(model)}
    args = ["--image", str(layout), "--prompt", "Bed", "--seed", "1", "--width", "256"]
    args += ["--height", "259"]
    run = magicmix("mix", *args, "--out", str(tmp_path / "a.png"), env=env)
    assert run.returncode == 0, run.stderr
    assert "seed 1" in run.stderr
    here = run_cli(monkeypatch, env, "mix", *args, "--out", str(tmp_path / "b.png"))
    assert here.exit_code == 0, here.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert Image.open(tmp_path / "a.png").size == (256, 256)  # 259 rounded down to 256


def test_mix_defaults_to_768_and_reports_its_random_seed(
    tmp_path: Path, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "layout.png"
    make_layout_image().save(layout)
    out = tmp_path / "out.png"
    args = ["--image", str(layout), "--prompt", "Bed", "--steps", "4", "--out", str(out)]
    # the named tiny model: built into the data dir on first use
    run = run_cli(monkeypatch, {**cli_env, "MAGICMIX_MODEL": "tiny"}, "mix", *args)
    assert run.exit_code == 0, run.output
    assert Image.open(out).size == (768, 768)
    assert "seed " in run.output
    assert (tmp_path / "data" / "tiny-model" / "model_index.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kmin", "0.6", "--kmax", "0.5"], "kmax"),
        (["--steps", "0"], "steps"),
        (["--image", "/no/such/file.png"], "no such file"),
        (["--mix-factor", "3"], "mix_factor"),
    ],
)
def test_bad_values_give_a_one_line_error_and_nonzero_exit(
    tmp_path: Path, cli_env: dict[str, str], args: list[str], message: str
) -> None:
    layout = tmp_path / "layout.png"
    make_layout_image().save(layout)
    base = {"--image": str(layout), "--prompt": "p", "--out": str(tmp_path / "o.png")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    run = magicmix("mix", *[x for pair in base.items() for x in pair], env=cli_env)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], run.stderr
    assert "Traceback" not in run.stderr


def test_unreadable_image_is_a_clear_error(tmp_path: Path, cli_env: dict[str, str]) -> None:
    bogus = tmp_path / "bogus.png"
    bogus.write_bytes(b"definitely not a png")
    run = magicmix(
        "mix", "--image", str(bogus), "--prompt", "p", "--out", str(tmp_path / "o.png"), env=cli_env
    )
    assert run.returncode != 0 and "error: image:" in run.stderr


def test_keys_create_prints_a_key_that_the_service_accepts(cli_env: dict[str, str]) -> None:
    run = magicmix("keys", "create", env=cli_env)
    assert run.returncode == 0, run.stderr
    key = run.stdout.strip()
    assert key.startswith("mm_") and "whsec_" in run.stderr

    from magicmix.backends.local.compose import open_key_store
    from magicmix.config import Settings

    settings = Settings(data_dir=Path(cli_env["MAGICMIX_DATA_DIR"]))
    assert open_key_store(settings).authenticate(key).key_id in run.stderr


def test_keys_list_and_revoke_print_the_clis_lines(
    cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    made = run_cli(monkeypatch, cli_env, "keys", "create", "--admin")
    key_id = made.output.split("key id: ", 1)[1].split()[0]
    listed = run_cli(monkeypatch, cli_env, "keys", "list").output
    assert f"{key_id}  admin  " in listed and "UTC" in listed
    assert run_cli(monkeypatch, cli_env, "keys", "revoke", key_id).output.strip() == (
        f"revoked {key_id}"
    )
    again = run_cli(monkeypatch, cli_env, "keys", "revoke", key_id)
    assert again.exit_code == 2 and f"error: no active key '{key_id}'" in again.output


def test_the_modal_key_manager_loads_the_clis_lines_without_typer() -> None:
    """The Modal app's `manage_keys` prints the CLI's lines: loading them needs no typer."""
    probe = (
        "import sys, magicmix.cli.keys as k, magicmix.backends.modal.compose as c; "
        "assert k.key_action and c.manage_keys; "
        "assert 'typer' not in sys.modules, 'typer was imported'"
    )
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_every_command_has_help(cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    run = magicmix("--help", env=cli_env)  # the installed entry point, as a user runs it
    assert run.returncode == 0 and "Usage" in run.stdout
    for command in (
        ["mix"],
        ["serve"],
        ["keys", "create"],
        ["cleanup"],
        ["build-tiny"],
        ["build-toy"],
        ["build-random"],
    ):
        here = run_cli(monkeypatch, cli_env, *command, "--help")
        assert here.exit_code == 0 and "Usage" in here.output, command


def test_cleanup_removes_only_expired_outputs(tmp_path: Path, cli_env: dict[str, str]) -> None:
    outputs = tmp_path / "data" / "outputs"
    outputs.mkdir(parents=True)
    old, new = outputs / "1-oldtoken.png", outputs / "2-newtoken.png"
    for path in (old, new):
        make_layout_image(8, 8).save(path)
    past = time.time() - 25 * 3600
    os.utime(old, (past, past))
    run = magicmix("cleanup", env=cli_env)
    assert run.returncode == 0, run.stderr
    assert "removed 1-oldtoken.png" in run.stdout and "2-newtoken" not in run.stdout
    assert not old.exists() and new.exists()
