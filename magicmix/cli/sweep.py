"""Parameter sweeps: every (kmin, kmax, mix_factor) combination with one seed, on one sheet.

MagicMix is tuned by eye, so a sweep renders the grid through the engine (which batches
the requests that share a schedule) and lays the results out as a contact sheet with the
axes and values printed on it, plus a JSON of the runs so any cell can be reproduced.

Combinations with kmin > kmax are not runnable (the layout phase would end before it
starts); they are skipped, reported on stderr and listed under `skipped` in the JSON. The
sheet has one row per runnable (kmin, kmax) pair and one column per mix_factor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from PIL import Image, ImageDraw, ImageFont

from magicmix.cli.options import (
    ImageOption,
    PromptOption,
    failure,
    mix_params,
    mix_request,
    option,
)
from magicmix.config import get_settings
from magicmix.errors import InvalidInput, MagicMixError
from magicmix.request import MixRequest, default, validate_request

if TYPE_CHECKING:
    from magicmix.engine import MagicMixEngine  # torch: imported only when a sweep runs

SWEEP_SIZE = 256  # cells are small by default: a grid of 768 px runs would take minutes
MAX_CELL = 256  # longest side of a cell on the sheet; bigger outputs are scaled down
GAP = 6
LABEL_WIDTH = 124
TITLE_HEIGHT = 30
HEADER_HEIGHT = 26
FONT_SIZE = 13
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def parse_values(text: str, name: str) -> list[float]:
    """`"0.2, 0.3,0.4"` → `[0.2, 0.3, 0.4]`, refusing blanks, non-numbers and values off [0, 1]."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in parts):
        raise InvalidInput(f"expected comma-separated numbers, got {text!r}", field=name)
    values: list[float] = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise InvalidInput(f"{part!r} is not a number", field=name) from None
        if not 0.0 <= value <= 1.0:  # also refuses nan and inf
            raise InvalidInput(f"{value} is outside [0, 1]", field=name)
        if value not in values:
            values.append(value)
    return values


@dataclass(frozen=True)
class SweepPlan:
    """The sheet's axes: rows are runnable (kmin, kmax) pairs, columns are mix factors."""

    rows: list[tuple[float, float]]
    mix_factors: list[float]
    skipped: list[tuple[float, float]]

    @classmethod
    def from_values(
        cls, kmins: list[float], kmaxs: list[float], mix_factors: list[float]
    ) -> SweepPlan:
        pairs = [(kmin, kmax) for kmin in kmins for kmax in kmaxs]
        rows = [pair for pair in pairs if pair[0] <= pair[1]]
        if not rows:
            raise InvalidInput("every kmin is above every kmax: nothing to run", field="kmin")
        return cls(rows, mix_factors, [pair for pair in pairs if pair[0] > pair[1]])

    def requests(self, base: MixRequest) -> list[MixRequest]:
        """One request per cell, row by row, all with `base`'s seed and settings."""
        return [
            dataclasses.replace(base, kmin=kmin, kmax=kmax, mix_factor=mix_factor)
            for kmin, kmax in self.rows
            for mix_factor in self.mix_factors
        ]


@dataclass(frozen=True)
class SweepCell:
    row: int
    column: int
    kmin: float
    kmax: float
    mix_factor: float
    seed: int
    image: Image.Image


def run_sweep(
    engine: MagicMixEngine, base: MixRequest, plan: SweepPlan, *, progress: bool = False
) -> list[SweepCell]:
    """Render every cell in one `engine.mix` call so cells sharing a schedule share batches."""
    requests = plan.requests(base)
    results = engine.mix(requests, progress=progress)
    columns = len(plan.mix_factors)
    return [
        SweepCell(i // columns, i % columns, r.kmin, r.kmax, r.mix_factor, res.seed, res.image)
        for i, (r, res) in enumerate(zip(requests, results, strict=True))
    ]


def cell_size(width: int, height: int) -> tuple[int, int]:
    """The size of a cell on the sheet: the output, scaled so its longest side fits MAX_CELL."""
    scale = min(1.0, MAX_CELL / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def sheet_size(plan: SweepPlan, cell: tuple[int, int]) -> tuple[int, int]:
    return (
        LABEL_WIDTH + len(plan.mix_factors) * (cell[0] + GAP),
        TITLE_HEIGHT + HEADER_HEIGHT + len(plan.rows) * (cell[1] + GAP),
    )


def cell_origin(row: int, column: int, cell: tuple[int, int]) -> tuple[int, int]:
    """Top-left pixel of a cell on the sheet."""
    x = LABEL_WIDTH + column * (cell[0] + GAP)
    y = TITLE_HEIGHT + HEADER_HEIGHT + row * (cell[1] + GAP)
    return x, y


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """Shorten `text` with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _value(value: float) -> str:
    return f"{value:g}"


def contact_sheet(cells: list[SweepCell], plan: SweepPlan, title: str) -> Image.Image:
    """The labelled grid: title on top, mix_factor values over the columns, kmin/kmax per row."""
    cell = cell_size(*cells[0].image.size)
    sheet = Image.new("RGB", sheet_size(plan, cell), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=FONT_SIZE)
    draw.text((GAP, GAP), _fit(draw, title, font, sheet.width - 2 * GAP), fill=INK, font=font)
    header_y = TITLE_HEIGHT + 4
    draw.text((GAP, header_y), "mix_factor:", fill=INK, font=font)
    for column, mix_factor in enumerate(plan.mix_factors):
        x, _ = cell_origin(0, column, cell)
        draw.text((x, header_y), _value(mix_factor), fill=INK, font=font)
    for row, (kmin, kmax) in enumerate(plan.rows):
        _, y = cell_origin(row, 0, cell)
        draw.text((GAP, y), f"kmin {_value(kmin)}", fill=INK, font=font)
        draw.text((GAP, y + FONT_SIZE + 6), f"kmax {_value(kmax)}", fill=INK, font=font)
    for item in cells:
        sheet.paste(item.image.resize(cell), cell_origin(item.row, item.column, cell))
    return sheet


def sweep_report(
    cells: list[SweepCell], plan: SweepPlan, base: MixRequest, **extra: Any
) -> dict[str, Any]:
    """The JSON written beside the sheet: shared settings, axes, and each cell's parameters."""
    return {
        **extra,
        "prompt": base.prompt,
        "negative_prompt": base.negative_prompt,
        "width": base.width,
        "height": base.height,
        "steps": base.steps,
        "guidance_scale": base.guidance_scale,
        "seed": base.seed,
        "axes": {
            "rows": [{"kmin": kmin, "kmax": kmax} for kmin, kmax in plan.rows],
            "columns": {"mix_factor": plan.mix_factors},
        },
        "skipped": [
            {"kmin": kmin, "kmax": kmax, "why": "kmin > kmax"} for kmin, kmax in plan.skipped
        ],
        "runs": [
            {
                "row": c.row,
                "column": c.column,
                "kmin": c.kmin,
                "kmax": c.kmax,
                "mix_factor": c.mix_factor,
                "seed": c.seed,
                "steps": base.steps,
                "guidance_scale": base.guidance_scale,
                "width": base.width,
                "height": base.height,
            }
            for c in cells
        ],
    }


def sweep_command(
    image: ImageOption,
    prompt: PromptOption,
    out: Annotated[Path, typer.Option(help="Where to write the contact sheet PNG.")],
    kmin: Annotated[str, typer.Option(help="Comma-separated kmin values.")] = str(default("kmin")),
    kmax: Annotated[str, typer.Option(help="Comma-separated kmax values.")] = str(default("kmax")),
    mix_factor: Annotated[str, typer.Option(help="Comma-separated mix_factor values.")] = str(
        default("mix_factor")
    ),
    negative_prompt: Annotated[str, option("negative_prompt")] = default("negative_prompt"),
    seed: Annotated[int, typer.Option(help="One seed for every cell.")] = 0,
    steps: Annotated[int, option("steps")] = default("steps"),
    width: Annotated[int, option("width")] = SWEEP_SIZE,
    height: Annotated[int, option("height")] = SWEEP_SIZE,
    guidance_scale: Annotated[float, option("guidance_scale")] = default("guidance_scale"),
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Runs as JSON; default: OUT with .json.")
    ] = None,
) -> None:
    """Render every kmin x kmax x mix_factor combination with one seed as a labelled grid.

    Combinations with kmin > kmax are skipped (and listed in the JSON).
    """
    from magicmix.engine.configure import load_engine

    settings = get_settings()
    try:
        plan = SweepPlan.from_values(
            parse_values(kmin, "kmin"),
            parse_values(kmax, "kmax"),
            parse_values(mix_factor, "mix_factor"),
        )
        params = mix_params(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )
        family = settings.resolved_family()
        base = mix_request(image, params, family, settings)
        for request in plan.requests(base):  # refuse a bad cell before loading the model
            validate_request(request, vae_scale_factor=family.latent_factor)
        engine = load_engine(settings)
        for kmin_value, kmax_value in plan.skipped:
            typer.echo(f"skipped kmin={kmin_value:g} > kmax={kmax_value:g}", err=True)
        cells = run_sweep(engine, base, plan, progress=True)
    except MagicMixError as err:
        raise failure(err) from err
    title = f"{prompt!r} · seed {seed} · {steps} steps · cfg {guidance_scale:g} · {settings.model}"
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(cells, plan, title).save(out, format="PNG", optimize=True)
    json_path = json_out or out.with_suffix(".json")
    report = sweep_report(cells, plan, base, image=image, model=settings.model, sheet=str(out))
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    typer.echo(f"wrote {out} ({len(cells)} cells) and {json_path}", err=True)
