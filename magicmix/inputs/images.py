"""Turn untrusted image bytes into a clean RGB `PIL.Image`, and images into PNG bytes.

Only PNG, JPEG and WebP are accepted (no GIF, SVG, TIFF...: fewer decoders, fewer bugs).
Everything that costs is bounded before it is spent, from the header alone:
- the pixel count (a tiny file claiming huge dimensions, a decompression bomb, costs
  nothing), and the bytes the decoded pixels would take (`max_decoded_bytes`: a 170 KB
  6320x6320 RGBA PNG is 40 MP but 160 MB decoded, and its conversions cost more);
- JPEGs are decoded straight at a reduced scale when a smaller size is all that is needed
  (`reduce_to`, PIL's `draft`), and every image is shrunk to it before any conversion;
- at most `MAX_PARALLEL_DECODES` images are decoded at once in a process, so concurrent
  large uploads cannot add up; after a large decode freed memory goes back to the OS.
The service decodes an upload once, at submission, and keeps the reduced image.

Colour and metadata: an embedded ICC profile (a CMYK press profile, Display P3, Adobe
RGB) is applied with LittleCMS (Pillow's `ImageCms`) so the pixels are sRGB, what the
model was trained on and what a browser shows the user; a profile LittleCMS cannot read
or that does not fit the pixels is ignored, as browsers ignore it. Then the image keeps
no metadata at all: the layout a job stores is pixels only, as small as its pixels allow,
and always readable back (a 5 MB profile written into it made a 5 MB PNG that PIL
refuses to read: its MAX_TEXT_CHUNK).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import re
import threading
import warnings

from PIL import Image, ImageCms, ImageOps, PngImagePlugin, UnidentifiedImageError

from magicmix.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PARALLEL_DECODES = 2
_decoding = threading.BoundedSemaphore(MAX_PARALLEL_DECODES)
# bytes per pixel of each mode PIL can give these formats
_MODE_BYTES = {
    **dict.fromkeys(("1", "L", "P"), 1),
    **dict.fromkeys(("LA", "PA", "I;16", "I;16B", "I;16L"), 2),
    **dict.fromkeys(("RGB", "YCbCr", "LAB", "HSV"), 3),
}  # the rest (RGBA, CMYK, I, F) take 4
_TRIM_ABOVE_BYTES = 32 * 1024 * 1024
_DATA_URI = re.compile(
    r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.-]+)*)?,(?P<data>.*)$", re.S | re.I
)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_PROFILED_MODES = ("RGB", "CMYK", "L")  # what an embedded profile is applied to


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    max_decoded_bytes: int | None = None,
    reduce_to: tuple[int, int] | None = None,
    field: str = "image",
) -> Image.Image:
    """Validate and decode: format, size, memory, EXIF orientation; alpha on white.

    With `reduce_to`, the image comes back no larger than that box (aspect kept).
    """
    if not data:
        raise InvalidInput("the image is empty (0 bytes)", field=field)
    with _decoding:
        image, cost = _decode(data, max_pixels, max_decoded_bytes, reduce_to, field)
        result = to_rgb(ImageOps.exif_transpose(image))
        del image
    if cost > _TRIM_ABOVE_BYTES:
        _return_memory()
    return result


def _decode(
    data: bytes,
    max_pixels: int,
    max_decoded_bytes: int | None,
    reduce_to: tuple[int, int] | None,
    field: str,
) -> tuple[Image.Image, int]:
    """The decoded (and reduced) image, and the bytes its full decode took."""
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
            if reduce_to is not None and image.format == "JPEG":
                image.draft("RGB", reduce_to)  # decode at 1/2, 1/4 or 1/8 scale directly
            cost = _decoded_bytes(image)
            if max_decoded_bytes is not None and cost > max_decoded_bytes:
                raise PayloadTooLarge(
                    f"the image ({image.width}x{image.height} {image.mode}) would take"
                    f" {cost // 2**20} MiB to decode; the limit is"
                    f" {max_decoded_bytes // 2**20} MiB",
                    field=field,
                )
            image.load()
            if reduce_to is not None:
                image.thumbnail(reduce_to, Image.Resampling.LANCZOS)
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
        if "MAX_TEXT" in str(err):  # PIL's bound on a PNG's zTXt/iTXt/iCCP chunks
            raise InvalidInput(
                "the image carries metadata (a PNG text or ICC profile chunk) larger than"
                f" {PngImagePlugin.MAX_TEXT_CHUNK // 2**20} MiB once decompressed, or"
                f" {PngImagePlugin.MAX_TEXT_MEMORY // 2**20} MiB in all; save it without it",
                field=field,
            ) from err
        raise InvalidInput(f"the image could not be decoded: {err}", field=field) from err
    return image, cost


def _decoded_bytes(image: Image.Image) -> int:
    """What the decoded pixels of `image` take in memory, from its header."""
    return image.width * image.height * _MODE_BYTES.get(image.mode, 4)


def _return_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise); a no-op elsewhere."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (grey, CMYK, 16-bit, palette, alpha) to 8-bit sRGB; transparency becomes
    white; an embedded ICC profile applied; no metadata left (`info` is empty)."""
    profile = image.info.get("icc_profile")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda value: value / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        flat = "L" if image.mode == "LA" else "RGB"  # grey stays grey for a grey profile
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        background.alpha_composite(image.convert("RGBA"))
        image = background.convert(flat)
    if profile and image.mode in _PROFILED_MODES:
        image = _to_srgb(image, profile)
    rgb = image.convert("RGB")
    rgb.info = {}
    return rgb


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    """`image` converted from its embedded profile to sRGB; as it was if that cannot be."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):  # unreadable, or not for
        return image  # these pixels (an RGB profile on CMYK): ignored, as browsers do
    assert converted is not None  # nosec B101 - None only with inPlace=True
    return converted


def decode_inline_image(value: str, *, max_bytes: int, field: str = "image") -> bytes | None:
    """Bytes of a `data:` URI or bare base64 string; None when `value` is neither (a URL)."""
    text = value.strip()
    match = _DATA_URI.match(text)
    if match:
        if ";base64" not in (match.group("params") or "").lower():
            raise InvalidInput("only base64 data URIs are accepted", field=field)
        payload = match.group("data")
    elif text.lower().startswith(("http://", "https://")) or not _BASE64_CHARS.match(text[:4096]):
        return None
    else:
        payload = text
    # base64 is 4/3 of the bytes: refuse early instead of decoding something huge
    if len(payload) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"the image is larger than {max_bytes} bytes", field=field)
    compact = "".join(payload.split()).rstrip("=")
    compact += "=" * (-len(compact) % 4)  # padding is optional (base64url usually has none)
    try:
        return base64.b64decode(
            compact,
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
    if image.info:  # PNG's encoder writes some of `info` (an ICC profile, transparency)
        image = image.copy()
        image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
