"""The `magicmix` commands. Heavy imports (torch, uvicorn) happen inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from magicmix.cli.db import db_app
from magicmix.cli.options import (
    ImageOption,
    PromptOption,
    fail,
    failure,
    mix_params,
    mix_request,
    option,
)
from magicmix.cli.plan import plan_command
from magicmix.cli.sweep import sweep_command
from magicmix.config import Settings, get_settings
from magicmix.errors import MagicMixError
from magicmix.families import FAMILIES, TOY
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
    width: Annotated[int | None, option("width")] = default("width"),
    height: Annotated[int | None, option("height")] = default("height"),
    guidance_scale: Annotated[float, option("guidance_scale")] = default("guidance_scale"),
) -> None:
    """Mix one image with a prompt and write the result as a PNG (progress on stderr)."""
    from magicmix.inputs.images import png_bytes

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
        request = mix_request(image, params, settings.resolved_family(), settings)
        from magicmix.engine.configure import load_engine

        (result,) = load_engine(settings).mix([request], progress=True)
    except MagicMixError as err:
        raise failure(err) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png_bytes(result.image))
    typer.echo(
        f"wrote {out} ({result.image.width}x{result.image.height}, seed {result.seed})", err=True
    )


@app.command("build-tiny")
def build_tiny(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    arch: Annotated[
        str, typer.Option(help=f"The model family's layout: {', '.join(FAMILIES)}.")
    ] = "sd1",
) -> None:
    """Write a tiny random-weight model (SD 1.x or SDXL layout) as a diffusers folder."""
    from magicmix.engine.builder import TINY_ARCH, build_random_model

    if arch not in TINY_ARCH:
        raise fail(f"--arch must be one of {', '.join(TINY_ARCH)}, got {arch!r}")
    build_random_model(directory, TINY_ARCH[arch])
    typer.echo(f"wrote the tiny {arch} model to {directory}", err=True)


@app.command("build-toy")
def build_toy(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    seed: Annotated[int, typer.Option(help="Training seed (the shipped model: 0).")] = 0,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads (the shipped model: 1).")] = 1,
) -> None:
    """Train the toy model from scratch (minutes on a CPU) and compare it with the shipped one."""
    import dataclasses
    import json

    from magicmix.engine.toy import MODEL_DIR, read_manifest
    from magicmix.engine.toy.train import Recipe, train_toy_model

    timings = train_toy_model(
        directory, seed=seed, recipe=dataclasses.replace(Recipe(), threads=threads)
    )
    typer.echo(json.dumps({k: round(v, 1) for k, v in timings.items()}), err=True)
    built, shipped = read_manifest(directory), read_manifest(MODEL_DIR)
    differ = sorted(
        name for name in built.keys() | shipped.keys() if built.get(name) != shipped.get(name)
    )
    if differ:
        typer.echo(
            f"wrote the toy model to {directory}; it differs from the shipped one in "
            f"{', '.join(differ)} (weights are reproducible per seed, thread count and CPU)",
            err=True,
        )
    else:
        typer.echo(f"wrote the toy model to {directory}: identical to the shipped one", err=True)


@app.command("build-random")
def build_random(
    directory: Annotated[Path, typer.Argument(help="Output directory.")],
    arch: Annotated[
        str, typer.Option(help="'sd15' (full-size SD 1.5), 'sdxl' (SDXL base), or a tiny one.")
    ] = "sd15",
) -> None:
    """Write a random-weight model of a real architecture, to measure speed without a hub."""
    from magicmix.engine.builder import ARCHES, build_random_model

    if arch not in ARCHES:
        raise fail(f"--arch must be one of {', '.join(ARCHES)}, got {arch!r}")
    build_random_model(directory, arch)
    typer.echo(f"wrote a random {arch} model to {directory}", err=True)


keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
OnModal = Annotated[
    bool, typer.Option("--modal", help="The deployed Modal app's keys, not the local ones.")
]


def _keys(action: str, *, on_modal: bool, key_id: str = "", admin: bool = False) -> str:
    """Run a key action locally, or in the deployed app (`modal_app.manage_keys`)."""
    if on_modal:
        import modal

        function = modal.Function.from_name("magicmix", "manage_keys")
        return str(function.remote(action, key_id, admin))
    from magicmix.backends.local.compose import open_key_store
    from magicmix.cli.keys import key_action

    try:
        return key_action(open_key_store(get_settings()), action, key_id=key_id, admin=admin)
    except MagicMixError as err:
        raise failure(err) from err
    except ValueError as err:  # a setting that cannot work, said plainly
        raise fail(str(err)) from err


@keys_app.command("create")
def keys_create(
    admin: Annotated[bool, typer.Option(help="May call clear_queue, restart_server...")] = False,
    on_modal: OnModal = False,
) -> None:
    """Print a new API key and its webhook signing secret (shown once, stored hashed)."""
    key, *details = _keys("create", on_modal=on_modal, admin=admin).splitlines()
    typer.echo(key)  # alone on stdout, so `KEY=$(magicmix keys create)` works
    for line in details:
        typer.echo(line, err=True)


@keys_app.command("list")
def keys_list(on_modal: OnModal = False) -> None:
    """List keys: id, role, created, revoked (never the keys themselves)."""
    typer.echo(_keys("list", on_modal=on_modal))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key id (keys list).")],
    on_modal: OnModal = False,
) -> None:
    """Refuse a key from now on (its jobs and S3 details are kept)."""
    typer.echo(_keys("revoke", on_modal=on_modal, key_id=key_id), err=True)


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
    from magicmix.http.server import uvicorn_config

    settings = get_settings()
    if print_curl:
        print_quickstart(open_key_store(settings).create(admin=True).key, settings)
    app = create_app(build_local_service(settings))
    uvicorn.Server(uvicorn_config(app, host=host, port=port, settings=settings)).run()


def quickstart_body(key: str, settings: Settings) -> dict[str, object]:
    """The seed's example body, made to work here: with private URLs allowed (as `make run`
    does) the layout is the sample this server ships (a green square), so it works offline,
    and on the toy model the prompt is one it can draw."""
    from magicmix.http.schemas import SEED_EXAMPLE

    body: dict[str, object] = {**SEED_EXAMPLE, "key": key}
    if settings.allow_private_urls:
        body["image"] = f"{settings.public_url}/static/sample-layout.png"
    if settings.model == TOY:
        body.update(prompt="a red circle", negative_prompt="", width=256, height=256)
    return body


def print_quickstart(key: str, settings: Settings) -> None:
    """The key, the playground's address and a curl of `quickstart_body`."""
    import json

    public_url = settings.public_url
    typer.echo(f"\nAPI key (admin): {key}")
    typer.echo(f"Playground: {public_url}/  (paste the key there)\n")
    if settings.model == TOY:
        typer.echo("The toy model draws one red, green, blue or yellow circle, square or")
        typer.echo("triangle on white; see the README for real Stable Diffusion weights.")
    body = json.dumps(quickstart_body(key, settings), indent=1)
    typer.echo("Try it:")
    typer.echo(
        f"curl -s -X POST {public_url}/api/v1/enterprise/image_editing/magic_mix \\\n"
        f"  -H 'Content-Type: application/json' -d '{body}'\n"
    )


@app.command()
def cleanup() -> None:
    """Delete service-store outputs older than MAGICMIX_RETENTION_HOURS; expire their jobs."""
    import asyncio

    from magicmix.backends.local.compose import open_sweeper

    report = asyncio.run(open_sweeper(get_settings()).run_once())
    if not report.ran:
        raise fail("another process is sweeping this database right now; try again shortly")
    for name in report.removed:
        typer.echo(f"removed {name}")
    typer.echo(
        f"removed {len(report.removed)} outputs, expired {len(report.expired)} jobs,"
        f" requeued {len(report.requeued)} and failed {len(report.failed)} stuck jobs",
        err=True,
    )
    if report.errors:
        raise fail(f"some steps failed: {', '.join(report.errors)} (see the log)")


def main() -> None:
    """Entry point for `python -m magicmix`."""
    app(prog_name="magicmix")
