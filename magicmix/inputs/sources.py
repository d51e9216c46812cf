"""Where a layout image comes from: an http(s) URL, a data URI, bare base64, or (CLI) a path."""

from __future__ import annotations

import asyncio
from pathlib import Path

from PIL import Image

from magicmix.config import Settings
from magicmix.errors import InvalidInput, PayloadTooLarge
from magicmix.inputs.fetch import fetch_image_bytes
from magicmix.inputs.images import decode_image, decode_inline_image


async def image_bytes_from_field(
    value: str, settings: Settings, *, field: str = "image", within_s: float | None = None
) -> bytes:
    """Raw bytes of the API's `image` field: inline data, or a URL fetched behind the SSRF guard."""
    inline = decode_inline_image(value, max_bytes=settings.max_image_bytes, field=field)
    if inline is not None:
        return inline
    return await fetch_image_bytes(value.strip(), settings, field=field, within_s=within_s)


def read_image_source(
    value: str, settings: Settings, *, reduce_to: tuple[int, int] | None = None
) -> Image.Image:
    """The CLI's `--image`: a local file, or anything the API's `image` field accepts.

    Decoded as the service decodes an upload (same limits, same early reduction), so the
    CLI and the API give the same image for the same input.
    """
    path = Path(value).expanduser()
    lowered = value.lower()
    if not lowered.startswith(("http://", "https://", "data:")) and path.exists():
        if path.stat().st_size > settings.max_image_bytes:
            raise PayloadTooLarge(
                f"{path} is larger than {settings.max_image_bytes} bytes", field="image"
            )
        try:
            data = path.read_bytes()
        except OSError as err:
            raise InvalidInput(f"cannot read {path}: {err.strerror}", field="image") from err
    elif "://" not in value and not lowered.startswith("data:") and len(value) < 1024:
        raise InvalidInput(f"no such file: {value}", field="image")
    else:
        data = asyncio.run(image_bytes_from_field(value, settings))
    return decode_image(
        data,
        max_pixels=settings.max_image_pixels,
        max_decoded_bytes=settings.max_image_decoded_bytes,
        reduce_to=reduce_to,
    )
