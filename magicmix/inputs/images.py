"""Turn untrusted image bytes into a clean RGB `PIL.Image`, and images into PNG bytes.

Only PNG, JPEG and WebP are accepted (no GIF, SVG, TIFF...: fewer decoders, fewer bugs).
The pixel count is checked from the header before any pixel is decoded, so a tiny file
claiming huge dimensions (a decompression bomb) costs nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from magicmix.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*)?,(?P<data>.*)$", re.S)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> Image.Image:
    """Validate and decode: format, size, EXIF orientation; alpha composited on white."""
    if not data:
        raise InvalidInput("the image is empty (0 bytes)", field=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"the image is {width}x{height} pixels; the limit is {max_pixels} pixels",
                    field=field,
                )
            if getattr(image, "n_frames", 1) > 1:
                raise InvalidInput(
                    "animated images are not accepted; send a still image", field=field
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refuses absurd sizes while opening, before our own check can name them
        raise PayloadTooLarge(
            f"the image claims more pixels than PIL decodes safely; the limit is {max_pixels}"
            " pixels",
            field=field,
        ) from err
    except UnidentifiedImageError as err:
        raise InvalidInput(
            "the image is not a readable PNG, JPEG or WebP file", field=field
        ) from err
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt data
        raise InvalidInput(f"the image could not be decoded: {err}", field=field) from err
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (grey, CMYK, 16-bit, palette, alpha) to 8-bit RGB; transparency becomes white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        image = background
    return image.convert("RGB")


def decode_inline_image(value: str, *, max_bytes: int, field: str = "image") -> bytes | None:
    """Bytes of a `data:` URI or bare base64 string; None when `value` is neither (a URL)."""
    text = value.strip()
    match = _DATA_URI.match(text)
    if match:
        if ";base64" not in (match.group("params") or ""):
            raise InvalidInput("only base64 data URIs are accepted", field=field)
        payload = match.group("data")
    elif text.lower().startswith(("http://", "https://")) or not _BASE64_CHARS.match(text[:4096]):
        return None
    else:
        payload = text
    # base64 is 4/3 of the bytes: refuse early instead of decoding something huge
    if len(payload) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"the image is larger than {max_bytes} bytes", field=field)
    try:
        return base64.b64decode(
            "".join(payload.split()),
            altchars=b"-_" if "-" in payload or "_" in payload else None,
            validate=True,
        )
    except (binascii.Error, ValueError) as err:
        raise InvalidInput("the image is not valid base64", field=field) from err


def png_bytes(image: Image.Image) -> bytes:
    """PNG-encode without metadata, so equal pixels give equal bytes.

    zlib level 1: on a GPU an image takes ~0.2 s of compute, so encoding time counts more
    than a somewhat larger file (the encode runs while the GPU container is held).
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
