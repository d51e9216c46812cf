"""The `magicmix` commands. Heavy imports (torch, uvicorn) happen inside the commands."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from magicmix.cli.options import ImageOption, PromptOption, fail, mix_params, option
from magicmix.cli.sweep import sweep_command
from magicmix.config import Settings, get_settings
from magicmix.errors import MagicMixError
from magicmix.planner.cli import plan_command
from magicmix.request import default

app = typer.Typer(
    help="MagicMix semantic image mixing: keep an image's layout, give it a prompt's content.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("sweep")(sweep_command)
app.command("plan")(plan_command)


@app.command()
def mix(
    image: ImageOption,
    prompt: PromptOption,
    out: Annotated[Path, typer.Option(help="Where to write the PNG.")],
    negative_prompt: Annotated[str, option("negative_prompt")] = default("negative_prompt"),
    seed: Annotated[int | None, typer.Option(help="Seed; omitted = random (printed).")] = None,
    steps: Annotated[int, option("steps")] = default("steps"),
    kmin: Annotated[float, option("kmin")] = default("kmin"),
    kmax: Annotated[float, option("kmax")] = default("kmax"),
    mix_factor: Annotated[float, option("mix_factor")] = default("mix_factor"),
    width: Annotated[int, option("width")] = default("width"),
    height: Annotated[int, option("height")] = default("height"),
    guidance_scale: Annotated[float, option("guidance_scale")] = default("guidance_scale"),
) -> None:
    """Mix one image with a prompt and write the result as a PNG (progress on stderr)."""
    from magicmix.inputs.images import png_bytes
    from magicmix.inputs.sources import read_image_source
    from magicmix.request import ENGINE_FIELDS, MixRequest, validate_request

    settings = get_settings()
    try:
        params = mix_params(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            kmin=kmin,
            kmax=kmax,
            mix_factor=mix_factor,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )
        request = MixRequest(
            image=read_image_source(image, settings),
            **params.model_dump(include=set(ENGINE_FIELDS)),
        )
        validate_request(request)  # before the model loads: bad values fail in a blink
        from magicmix.engine.configure import load_engine

        (result,) = load_engine(settings).mix([request], progress=True)
    except MagicMixError as err:
        raise fail(f"{err.field}: {err.message}" if err.field else err.message) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png_bytes(result.image))
    typer.echo(
        f"wrote {out} ({result.image.width}x{result.image.height}, seed {result.seed})", err=True
    )


@app.command("build-tiny")
def build_tiny(directory: Annotated[Path, typer.Argument(help="Output directory.")]) -> None:
    """Write the embedded tiny model (random weights, SD 1.x layout) as a diffusers folder."""
    from magicmix.engine.builder import build_random_model

    build_random_model(directory, "tiny")
    typer.echo(f"wrote the tiny model to {directory}", err=True)


@app.command("build-random")
def build_random(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    arch: Annotated[str, typer.Option(help="'tiny' or 'sd15' (full-size SD 1.5).")] = "sd15",
) -> None:
    """Write a random-weight model of a real architecture, to measure speed without a hub."""
    from magicmix.engine.builder import build_random_model

    if arch not in ("tiny", "sd15"):
        raise fail(f"--arch must be 'tiny' or 'sd15', got {arch!r}")
    build_random_model(directory, arch)  # type: ignore[arg-type]
    typer.echo(f"wrote a random {arch} model to {directory}", err=True)


keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    admin: Annotated[bool, typer.Option(help="May call clear_queue, restart_server...")] = False,
) -> None:
    """Print a new API key and its webhook signing secret (shown once, stored hashed)."""
    from magicmix.backends.local.compose import open_key_store

    new = open_key_store(get_settings()).create(admin=admin)
    typer.echo(new.key)
    typer.echo(f"key id: {new.key_id}{' (admin)' if new.admin else ''}", err=True)
    typer.echo(f"webhook signing secret: {new.webhook_secret}", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List keys: id, role, created, revoked (never the keys themselves)."""
    from magicmix.backends.local.compose import open_key_store

    for info in open_key_store(get_settings()).list():
        created = "from MAGICMIX_API_KEYS" if info.static else _when(info.created_at)
        revoked = f"  revoked {_when(info.revoked_at)}" if info.revoked_at else ""
        typer.echo(f"{info.key_id}  {'admin' if info.admin else 'user '}  {created}{revoked}")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (keys list).")]) -> None:
    """Refuse a key from now on (its jobs and S3 details are kept)."""
    from magicmix.backends.local.compose import open_key_store

    if not open_key_store(get_settings()).revoke(key_id):
        raise fail(f"no active key {key_id!r} (static keys are removed from MAGICMIX_API_KEYS)")
    typer.echo(f"revoked {key_id}", err=True)


def _when(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp or 0, UTC).strftime("%Y-%m-%d %H:%M UTC")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    print_curl: Annotated[
        bool, typer.Option(help="Create a key and print a ready-to-paste curl first.")
    ] = False,
) -> None:
    """Serve the ModelsLab-compatible API with uvicorn."""
    import uvicorn

    from magicmix.backends.local.compose import build_local_service, open_key_store
    from magicmix.http.app import create_app

    settings = get_settings()
    if print_curl:
        print_quickstart(open_key_store(settings).create(admin=True).key, settings)
    uvicorn.run(
        create_app(build_local_service(settings)),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        access_log=False,
    )


def print_quickstart(key: str, settings: Settings) -> None:
    """The key and a curl of the seed's example body, for a first request.

    With private URLs allowed (as `make run` does), the layout image is the sample this
    server ships, so the curl works offline; otherwise it is the seed's own image URL.
    """
    import json

    from magicmix.http.schemas import SEED_EXAMPLE

    public_url = settings.public_url
    image = (
        f"{public_url}/static/sample-layout.jpg"
        if settings.allow_private_urls
        else SEED_EXAMPLE["image"]
    )
    body = json.dumps({**SEED_EXAMPLE, "key": key, "image": image}, indent=1)
    typer.echo(f"\nAPI key (admin): {key}")
    typer.echo(f"Playground: {public_url}/  (paste the key there)\n")
    typer.echo("Try it (the tiny model's images are noise; see README for real weights):")
    typer.echo(
        f"curl -s -X POST {public_url}/api/v1/enterprise/image_editing/magic_mix \\\n"
        f"  -H 'Content-Type: application/json' -d '{body}'\n"
    )


@app.command()
def cleanup() -> None:
    """Delete service-store outputs older than MAGICMIX_RETENTION_HOURS; expire their jobs."""
    from magicmix.backends.local.compose import open_lifecycle
    from magicmix.outputs.store import open_store
    from magicmix.service import sweep

    settings = get_settings()
    report = sweep(open_lifecycle(settings), open_store(settings), settings)
    for name in report.removed:
        typer.echo(f"removed {name}")
    typer.echo(
        f"removed {len(report.removed)} outputs, expired {len(report.expired)} jobs,"
        f" failed {len(report.failed)} stuck jobs",
        err=True,
    )


def main() -> None:
    """Entry point for `python -m magicmix`."""
    app(prog_name="magicmix")
