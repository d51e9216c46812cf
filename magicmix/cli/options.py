"""What the CLI's commands share: options derived from `magicmix.request`, one-line errors."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from magicmix.config import Settings
from magicmix.errors import MagicMixError
from magicmix.families import ModelFamily
from magicmix.request import ENGINE_FIELDS, MixParams, MixRequest, describe, validated


def fail(message: str) -> typer.Exit:
    """Print a one-line error on stderr; the caller raises the returned exit."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def failure(err: MagicMixError) -> typer.Exit:
    """The CLI's one mapping of an error: `error: FIELD: why` on stderr, exit code 2."""
    return fail(f"{err.field}: {err.message}" if err.field else err.message)


def option(name: str, **extra: Any) -> Any:
    """A typer option whose help text is the request field's own description."""
    return typer.Option(help=describe(name), **extra)


def mix_request(
    image: str, params: MixParams, family: ModelFamily, settings: Settings
) -> MixRequest:
    """The engine's request from CLI values: sized by the model's family, image decoded as
    the service decodes uploads."""
    from magicmix.inputs.sources import read_image_source

    width, height = params.size_for(family)
    return MixRequest(
        image=read_image_source(image, settings, reduce_to=(width, height)),
        **{**params.model_dump(include=set(ENGINE_FIELDS)), "width": width, "height": height},
    )


def mix_params(**values: Any) -> MixParams:
    """Validate CLI values exactly as the API validates a request body (the schema's
    code), once, before anything loads."""
    return validated(MixParams, values)


ImageOption = Annotated[str, typer.Option(help="Layout image: a local path or an http(s) URL.")]
PromptOption = Annotated[str, typer.Option(help="Content prompt.")]
