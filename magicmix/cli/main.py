"""The `magicmix` command line: thin wrappers over the engine and the service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from magicmix.config import Settings, get_settings
from magicmix.errors import MagicMixError

app = typer.Typer(
    help="MagicMix semantic image mixing: keep an image's layout, give it a prompt's content.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str) -> typer.Exit:
    """Print a one-line error on stderr; the caller raises the returned exit."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


@app.command()
def mix(
    image: Annotated[str, typer.Option(help="Layout image: a local path or an http(s) URL.")],
    prompt: Annotated[str, typer.Option(help="Content prompt.")],
    out: Annotated[Path, typer.Option(help="Where to write the PNG.")],
    negative_prompt: Annotated[str, typer.Option(help="Unconditional text for guidance.")] = "",
    seed: Annotated[int | None, typer.Option(help="Seed; omitted = random (printed).")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps of the full schedule.")] = 20,
    kmin: Annotated[float, typer.Option(help="Where the content phase starts.")] = 0.3,
    kmax: Annotated[float, typer.Option(help="Noise level the layout is noised to.")] = 0.5,
    mix_factor: Annotated[float, typer.Option(help="Weight of the denoised latents.")] = 0.5,
    width: Annotated[
        int, typer.Option(help="Output width (rounded down to a multiple of 8).")
    ] = 768,
    height: Annotated[
        int, typer.Option(help="Output height (rounded down to a multiple of 8).")
    ] = 768,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance.")] = 7.5,
) -> None:
    """Mix one image with a prompt and write the result as a PNG (progress on stderr)."""
    from magicmix.images import png_bytes
    from magicmix.mix_request import MixRequest, validate_request
    from magicmix.sources import read_image_source

    settings = get_settings()
    try:
        request = MixRequest(
            image=read_image_source(image, settings),
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width // 8 * 8,
            height=height // 8 * 8,
            kmin=kmin,
            kmax=kmax,
            mix_factor=mix_factor,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )
        validate_request(request)  # before the model loads: bad values fail in a blink
        from magicmix.local import load_engine

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
    from magicmix.model_builder import build_random_model

    build_random_model(directory, "tiny")
    typer.echo(f"wrote the tiny model to {directory}", err=True)


@app.command("build-random")
def build_random(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    arch: Annotated[str, typer.Option(help="'tiny' or 'sd15' (full-size SD 1.5).")] = "sd15",
) -> None:
    """Write a random-weight model of a real architecture, to measure speed without a hub."""
    from magicmix.model_builder import build_random_model

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
    from magicmix.local import open_key_store

    new = open_key_store(get_settings()).create(admin=admin)
    typer.echo(new.key)
    typer.echo(f"key id: {new.key_id}{' (admin)' if new.admin else ''}", err=True)
    typer.echo(f"webhook signing secret: {new.webhook_secret}", err=True)


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

    from magicmix.local import build_local_service, open_key_store
    from magicmix.server import create_app

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

    from magicmix.schemas import SEED_EXAMPLE

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
    from magicmix.db import Database
    from magicmix.jobs import SqliteJobStore
    from magicmix.service import expire_outputs
    from magicmix.storage import open_store

    settings = get_settings()
    jobs = SqliteJobStore(Database(settings.database_path))
    removed, expired = expire_outputs(jobs, open_store(settings), settings.retention_hours)
    for name in removed:
        typer.echo(f"removed {name}")
    typer.echo(f"removed {len(removed)} outputs, expired {len(expired)} jobs", err=True)


from magicmix.sweep import sweep_command  # noqa: E402  (sweep's module imports nothing heavy)

app.command("sweep")(sweep_command)


def main() -> None:
    """Entry point for `python -m magicmix`."""
    app(prog_name="magicmix")


if __name__ == "__main__":
    main()
