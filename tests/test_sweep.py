"""`magicmix sweep`: every combination rendered with one seed, on a labelled contact sheet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from magicmix.cli import app
from magicmix.cli.sweep import (
    BACKGROUND,
    HEADER_HEIGHT,
    LABEL_WIDTH,
    TITLE_HEIGHT,
    SweepPlan,
    cell_origin,
    cell_size,
    contact_sheet,
    parse_values,
    run_sweep,
    sheet_size,
)
from magicmix.config import get_settings
from magicmix.engine import MagicMixEngine
from magicmix.errors import InvalidInput
from magicmix.request import MixRequest
from tests.conftest import make_layout_image


def test_parse_values_accepts_spaces_and_drops_repeats() -> None:
    assert parse_values(" 0.2, 0.3 ,0.2,1", "kmin") == [0.2, 0.3, 1.0]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected comma-separated numbers"),
        ("0.2,,0.3", "expected comma-separated numbers"),
        ("0.2,abc", "'abc' is not a number"),
        ("1.5", "outside [0, 1]"),
        ("nan", "outside [0, 1]"),
    ],
)
def test_parse_values_refuses_with_the_option_name(text: str, why: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_values(text, "kmax")
    assert why in caught.value.message and caught.value.field == "kmax"


def test_plan_skips_pairs_with_kmin_above_kmax_and_refuses_when_none_is_left() -> None:
    plan = SweepPlan.from_values([0.2, 0.6], [0.5, 0.7], [0.3, 0.5])
    assert plan.rows == [(0.2, 0.5), (0.2, 0.7), (0.6, 0.7)]
    assert plan.skipped == [(0.6, 0.5)]
    with pytest.raises(InvalidInput, match="nothing to run"):
        SweepPlan.from_values([0.8], [0.5], [0.5])


def count_cells_along(sheet: Image.Image, y: int, x_from: int) -> int:
    """Runs of non-background pixels at least 16 px wide along row `y`: the rendered cells."""
    row = np.asarray(sheet)[y, x_from:] != np.array(BACKGROUND)
    filled = row.any(axis=-1)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], filled.astype(int), [0]])))
    return sum(1 for start, end in zip(edges[::2], edges[1::2], strict=True) if end - start >= 16)


def test_sweep_renders_one_labelled_cell_per_combination(engine: MagicMixEngine) -> None:
    plan = SweepPlan.from_values([0.2, 0.3], [0.5, 0.6], [0.3, 0.5, 0.7])
    base = MixRequest(make_layout_image(), "coffee machine", width=128, height=96, steps=10, seed=3)
    calls_before = engine.unet_calls
    cells = run_sweep(engine, base, plan)
    assert len(cells) == 12 and {c.seed for c in cells} == {3}
    # Four (kmin, kmax) schedules, three mix factors each: batched, not twelve separate runs.
    assert engine.unet_calls - calls_before == sum(int(kmax * 10) for _, kmax in plan.rows)
    assert [(c.row, c.column, c.mix_factor) for c in cells[:4]] == [
        (0, 0, 0.3),
        (0, 1, 0.5),
        (0, 2, 0.7),
        (1, 0, 0.3),
    ]

    sheet = contact_sheet(cells, plan, "coffee machine · seed 3")
    cell = cell_size(128, 96)
    assert (
        sheet.size
        == sheet_size(plan, cell)
        == (LABEL_WIDTH + 3 * (128 + 6), TITLE_HEIGHT + HEADER_HEIGHT + 4 * (96 + 6))
    )
    x0, y0 = cell_origin(0, 0, cell)
    assert count_cells_along(sheet, y0 + cell[1] // 2, x0) == 3
    column = sheet.transpose(Image.Transpose.TRANSPOSE)
    assert count_cells_along(column, x0 + cell[0] // 2, y0) == 4
    pasted = sheet.crop((*cell_origin(1, 2, cell), *np.add(cell_origin(1, 2, cell), cell)))
    assert np.array_equal(np.asarray(pasted), np.asarray(cells[5].image))
    ink = np.asarray(sheet.convert("L"))
    assert (ink[:TITLE_HEIGHT] < 128).sum() > 100, "the title is printed"
    assert (ink[TITLE_HEIGHT:y0, x0:] < 128).sum() > 50, "mix_factor values head the columns"
    assert (ink[y0:, :LABEL_WIDTH] < 128).sum() > 200, "kmin/kmax label the rows"


def test_sweep_command_writes_the_sheet_and_the_runs(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAGICMIX_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("MAGICMIX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MAGICMIX_DEVICE", "cpu")
    get_settings.cache_clear()
    layout = tmp_path / "layout.png"
    make_layout_image().save(layout)
    out = tmp_path / "grid.png"
    args = ["sweep", "--image", str(layout), "--prompt", "bed", "--out", str(out)]
    args += ["--kmin", "0.2,0.7", "--kmax", "0.5,0.6", "--mix-factor", "0.3,0.7", "--steps", "10"]
    args += ["--width", "256", "--height", "256"]
    try:
        result = CliRunner().invoke(app, [*args, "--seed", "11"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "skipped kmin=0.7 > kmax=0.5" in result.output
    sheet = Image.open(out)
    plan_rows = [(0.2, 0.5), (0.2, 0.6)]
    assert sheet.size == (LABEL_WIDTH + 2 * (256 + 6), TITLE_HEIGHT + HEADER_HEIGHT + 2 * (256 + 6))
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["axes"]["rows"] == [{"kmin": a, "kmax": b} for a, b in plan_rows]
    assert report["skipped"] == [
        {"kmin": 0.7, "kmax": 0.5, "why": "kmin > kmax"},
        {"kmin": 0.7, "kmax": 0.6, "why": "kmin > kmax"},
    ]
    assert [(r["kmin"], r["kmax"], r["mix_factor"], r["seed"]) for r in report["runs"]] == [
        (0.2, 0.5, 0.3, 11),
        (0.2, 0.5, 0.7, 11),
        (0.2, 0.6, 0.3, 11),
        (0.2, 0.6, 0.7, 11),
    ]
    assert report["runs"][0]["steps"] == 10 and report["prompt"] == "bed"


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--kmin", "0.2,x", "error: kmin: 'x' is not a number"),
        ("--mix-factor", "", "error: mix_factor: expected comma-separated numbers"),
        ("--kmin", "0.9", "error: kmin: every kmin is above every kmax: nothing to run"),
    ],
)
def test_sweep_command_refuses_bad_lists_in_one_line(
    tmp_path: Path, option: str, value: str, message: str
) -> None:
    args = ["sweep", "--image", "x.png", "--prompt", "p", "--out", str(tmp_path / "g.png")]
    result = CliRunner().invoke(app, [*args, option, value])
    assert result.exit_code == 2
    assert result.output.startswith(message) and result.output.count("\n") == 1
