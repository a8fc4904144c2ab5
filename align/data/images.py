"""Decoding untrusted image bytes into model-ready pixels, with a reason for every refusal."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

# torch is imported inside the functions that use it (1.8 s here): decode tasks import this
# module and never touch it.

if TYPE_CHECKING:  # torch is imported where tensors are made, not by the decode tasks
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# The only decoders PIL may use on untrusted bytes. Never EPS/PS (PIL runs Ghostscript on them)
# or the long tail of rarely used, rarely fuzzed plug-ins.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB where that is sound: alpha is composited on white, 16-bit
    and float greyscale are rescaled to 8 bits, CMYK and palettes are converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes | None, size: int, max_pixels: int) -> np.ndarray:
    """Decode, convert to RGB, resize the short side to `size` and centre-crop (as CLIP does).

    Args:
        data: encoded image bytes.
        size: output side length.
        max_pixels: decompression-bomb guard, checked on the header before decoding.
    Returns:
        uint8 array (size, size, 3).
    Raises:
        ImageDecodeError: empty, not an image, truncated, too large, or unconvertible.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image too large: {width}x{height} exceeds max_image_pixels={max_pixels}"
                )
            if width < 1 or height < 1:
                raise ImageDecodeError(f"image has no pixels: {width}x{height}")
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode at reduced scale: much faster for big JPEGs
            img.load()
            img = ImageOps.exif_transpose(img)
            # Conversion and resizing inside the guard too: a frame that decodes but cannot be
            # converted (odd modes, broken palettes) is a refusal, not a crash of the batch.
            img = to_rgb(img)
            img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image too large (decompression-bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(
            f"not an image of an allowed format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError) as e:
        raise ImageDecodeError(f"corrupt image: {type(e).__name__}: {e}") from None


def jpeg_thumbnail(data: bytes | None, size: int, max_pixels: int, quality: int = 90) -> bytes:
    """A square JPEG thumbnail (CLIP's resize and centre crop) for a judge or a report page.

    Raises:
        ImageDecodeError: as decode_image.
    """
    out = io.BytesIO()
    Image.fromarray(decode_image(data, size, max_pixels)).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pixels_to_tensor(pixels: np.ndarray, mean, std, device, dtype=None) -> torch.Tensor:
    """uint8 (N, S, S, 3) from a decode stage -> CLIP-normalised float (N, 3, S, S). The one
    conversion index_corpus's embedder and the fine-tune share, so training sees exactly the
    pixels the stored embeddings and reference similarities were made from."""
    import torch

    pixels = np.asarray(pixels, dtype=np.uint8)
    if not pixels.flags.writeable:  # Ray hands out read-only arrays; torch wants writable ones
        pixels = pixels.copy()
    x = torch.as_tensor(pixels, device=device)
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ((x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).to(dtype or torch.float32)
