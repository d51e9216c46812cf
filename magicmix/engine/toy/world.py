"""The toy world: one flat shape on white, and what a test can measure in an image of it.

Each image is one circle, square or triangle, in red, green, blue or yellow, at a random
place and size, captioned "a {colour} {shape}". Layout (where, how big) and content (which
colour, which shape) then have plain pixel meanings: the object mask's centroid and extent
are layout, the hue of its pixels is content. Every image is a pure function of
(seed, index, size): nothing is stored, nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

BACKGROUND = (255, 255, 255)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
# Object extent (the shape's bounding square) as a fraction of the image side.
MIN_SIZE, MAX_SIZE = 0.18, 0.6
SUPERSAMPLE = 4  # render at 4x and downsample with a box filter: anti-aliased edges


@dataclass(frozen=True)
class Shape:
    """One object: content (colour, shape) and layout (centre and size, fractions of the side)."""

    colour: str
    shape: str
    cx: float
    cy: float
    size: float

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"


def render(spec: Shape, size: int = 256) -> Image.Image:
    """Draw `spec` on the plain background, `size` x `size` pixels, RGB."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = spec.size * big / 2
    cx, cy = spec.cx * big, spec.cy * big
    fill = COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif spec.shape == "square":
        side = half * 0.9  # a square looks bigger than a circle of the same extent
        draw.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    elif spec.shape == "triangle":
        # Equilateral, pointing up, centred on its bounding box.
        height = 2 * half * math.sqrt(3) / 2
        top, bottom = cy - height / 2, cy + height / 2
        draw.polygon([(cx, top), (cx + half, bottom), (cx - half, bottom)], fill=fill)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}")
    return image.resize((size, size), Image.Resampling.BOX)


def random_shape(rng: np.random.Generator) -> Shape:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    extent = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    margin = extent / 2 + 0.02
    cx, cy = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
    return Shape(colour, shape, cx, cy, extent)


def sample_spec(seed: int, index: int) -> Shape:
    """Sample `index` of the world seeded `seed`: the same pair always gives the same shape."""
    return random_shape(np.random.default_rng([seed, index]))


# -- measurements: what semantic tests read off an image ---------------------------------

# A pixel belongs to the object when it is this far (max over channels, 0-255) from the
# background. Anti-aliased edges and VAE blur sit below it; every toy colour is far above.
OBJECT_THRESHOLD = 80


def _array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    return np.asarray(image, dtype=np.float32)


def object_mask(image: Image.Image | np.ndarray, threshold: float = OBJECT_THRESHOLD) -> np.ndarray:
    """Boolean HxW mask of the pixels far from the background colour."""
    distance = np.abs(_array(image) - np.asarray(BACKGROUND, dtype=np.float32)).max(axis=-1)
    return distance > threshold


def centroid(image: Image.Image | np.ndarray) -> tuple[float, float] | None:
    """(x, y) in pixels of the object mask's centre of mass; None when there is no object."""
    mask = object_mask(image)
    if not mask.any():
        return None
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def centroid_distance(a: Image.Image, b: Image.Image) -> float:
    """Distance between the two objects' centroids, as a fraction of the image side."""
    ca, cb = centroid(a), centroid(b)
    if ca is None or cb is None:
        return math.inf
    scale_b = a.width / b.width  # compare in a's pixel frame
    return math.dist(ca, (cb[0] * scale_b, cb[1] * scale_b)) / a.width


# Colour names as hue bands (degrees) of saturated, not-too-dark pixels. A half-way blend
# of two toy colours (red + green = olive/brown, green + blue = teal, ...) falls between
# bands and counts as "other"; guidance's over-saturated colours (pure 255/0) still count.
HUE_BANDS: dict[str, tuple[float, float]] = {
    "red": (330.0, 20.0),  # wraps through 0; crimson (~340) is red, orange (~30) is not
    "yellow": (35.0, 70.0),
    "green": (85.0, 165.0),
    "blue": (195.0, 255.0),
}
MIN_SATURATION, MIN_VALUE, MIN_YELLOW_VALUE = 0.45, 0.35, 0.6


def colour_names(pixels: np.ndarray) -> np.ndarray:
    """Per RGB pixel (N x 3, 0-255), the index into list(HUE_BANDS) + ["other"]."""
    rgb = pixels.astype(np.float32) / 255.0
    high, low = rgb.max(axis=1), rgb.min(axis=1)
    chroma = high - low
    saturation = np.where(high > 0, chroma / np.maximum(high, 1e-6), 0.0)
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    safe = np.maximum(chroma, 1e-6)
    hue = (
        np.select(
            [high == r, high == g],
            [((g - b) / safe) % 6, (b - r) / safe + 2],
            (r - g) / safe + 4,
        )
        * 60.0
    )
    names = list(HUE_BANDS)
    result = np.full(len(rgb), len(names))
    usable = (saturation >= MIN_SATURATION) & (high >= MIN_VALUE) & (chroma > 0)
    for index, (name, (lo, hi)) in enumerate(HUE_BANDS.items()):
        inside = (hue >= lo) | (hue < hi) if lo > hi else (hue >= lo) & (hue < hi)
        if name == "yellow":
            inside &= high >= MIN_YELLOW_VALUE
        result[usable & inside] = index
    return result


def colour_shares(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Per colour name, the share of object pixels of that colour; "other" takes the rest
    (all zero when there is no object)."""
    array = _array(image)
    pixels = array[object_mask(array)]
    names = [*HUE_BANDS, "other"]
    if len(pixels) == 0:
        return dict.fromkeys(names, 0.0)
    counts = np.bincount(colour_names(pixels), minlength=len(names)) / len(pixels)
    return {n: float(c) for n, c in zip(names, counts, strict=True)}


def dominant_colour(image: Image.Image | np.ndarray) -> str | None:
    shares = colour_shares(image)
    best = max(shares, key=lambda name: shares[name])
    return best if shares[best] > 0 and best != "other" else None


def _sized_like(b: Image.Image, a: Image.Image) -> Image.Image:
    """`b` at `a`'s size, so two images compare pixel by pixel."""
    return b if b.size == a.size else b.resize(a.size, Image.Resampling.BICUBIC)


def pixel_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference in [0, 1]; b is resized to a's size first."""
    return float(np.abs(_array(a) - _array(_sized_like(b, a))).mean() / 255.0)


def mask_iou(a: Image.Image, b: Image.Image) -> float:
    """Intersection over union of the two object masks (b resized to a's size)."""
    ma, mb = object_mask(a), object_mask(_sized_like(b, a))
    union = (ma | mb).sum()
    return float((ma & mb).sum() / union) if union else 1.0
