"""From raw sample bytes to a training example: filter, decode, convert to RGB, resize, crop.

Pixels travel as uint8 (3, H, W) and become [-1, 1] floats where the model consumes them
(`to_model_range`): a float32 512-px image is 3 MiB, four times the uint8 one, and that
difference decides the throughput of the object store.

Each function either returns a value or raises `BadSample` with a short reason; the reason
becomes the name of a counter ("corrupt_image", "too_small", ...). Images that can be
converted sensibly (grayscale, CMYK, alpha, palette, 16-bit) are converted, not dropped.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


class BadSample(ValueError):
    """A sample that cannot be used; ``reason`` names its counter."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class SampleFilter:
    """What to keep (DataConfig): smallest side, aspect ratio, CLIP similarity, watermark probability."""

    min_side: int = 1
    max_aspect_ratio: float = float("inf")
    min_similarity: float | None = None
    max_pwatermark: float | None = None
    max_pixels: int = 64_000_000  # decompression-bomb guard

    @classmethod
    def from_config(cls, data_config) -> "SampleFilter":
        return cls(min_side=data_config.min_side, max_aspect_ratio=data_config.max_aspect_ratio,
                   min_similarity=data_config.min_similarity, max_pwatermark=data_config.max_pwatermark)

    def check_metadata(self, caption: str | None, meta: dict) -> None:
        """Cheap checks before decoding: caption present, similarity and watermark scores when known."""
        if caption is None or not caption.strip():
            raise BadSample("missing_caption")
        similarity, pwatermark = meta.get("similarity"), meta.get("pwatermark")
        if self.min_similarity is not None and similarity is not None and similarity < self.min_similarity:
            raise BadSample("low_similarity")
        if self.max_pwatermark is not None and pwatermark is not None and pwatermark > self.max_pwatermark:
            raise BadSample("watermark")

    def check_size(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise BadSample("decompression_bomb", f"{width}x{height}")
        if min(width, height) < self.min_side:
            raise BadSample("too_small", f"{width}x{height}")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise BadSample("aspect_ratio", f"{width}x{height}")


def decode_rgb(data: bytes | None, sample_filter: SampleFilter) -> Image.Image:
    """Decode image bytes into an 8-bit RGB image, converting what can be converted."""
    if not data:
        raise BadSample("missing_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            # The header gives the size before any pixel is decoded: refuse bombs here.
            sample_filter.check_size(*image.size)
            image.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample("decompression_bomb", str(exc)[:80]) from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise BadSample("corrupt_image", f"{type(exc).__name__}") from None
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit and float scaled down, alpha composited on white, CMYK/L/P converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, crop: str = "center",
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """Resize the short side to ``resolution`` (bicubic, antialiased), crop a square; uint8 (H, W, 3)."""
    return resize_and_crop_with_origin(image, resolution, crop, rng)[0]


def resize_and_crop_with_origin(image: Image.Image, resolution: int, crop: str = "center",
                                rng: np.random.Generator | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """`resize_and_crop` and the crop's (top, left) in the resized image: SDXL's crop conditioning."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        resample = Image.BOX if scale < 1 and resolution * 4 <= min(width, height) else Image.BICUBIC
        image = image.resize(new_size, resample)
    width, height = image.size
    if crop == "random":
        rng = rng or np.random.default_rng()
        left, top = int(rng.integers(0, width - resolution + 1)), int(rng.integers(0, height - resolution + 1))
    elif crop == "center":
        left, top = (width - resolution) // 2, (height - resolution) // 2
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8), (top, left)


def original_size(meta: dict, decoded: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the picture before anything resized it: img2dataset's ``original_height`` /
    ``original_width`` when it resized on download, else the decoded image's (``decoded`` = (width, height))."""
    width, height = meta.get("original_width"), meta.get("original_height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
        return int(height), int(width)
    return decoded[1], decoded[0]


def to_chw(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (3, H, W): what the pipeline ships (4x less than float32)."""
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def to_model_range(pixels):
    """uint8 pixels (numpy or torch, any layout) -> float32 in [-1, 1], where the model needs them."""
    return pixels.astype(np.float32) / 127.5 - 1.0 if isinstance(pixels, np.ndarray) else pixels.float() / 127.5 - 1.0
