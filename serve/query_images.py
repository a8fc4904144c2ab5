"""Query images (the `image` of /search and /knn-service) -> model-ready pixels, off the event
loop.

A query image is untrusted bytes that a client sends as often as it likes, so it is held to more
than the corpus decoder (align.data.images.decode_image): only JPEG, PNG and WebP; a pixel limit of its
own (`max_query_image_pixels`, far under the corpus's), read from the header before anything is
decoded; and the image made small before its mode is converted (a JPEG decoded at reduced scale,
any other reduced by an integer factor towards twice the model's size). Decoding runs on a few
threads of the ingress's own (`QueryImageDecoder`), so a large image costs its own request time,
not every other request's on the replica. Every refusal is a `BadRequest` (400) naming the
`image` field.
"""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from align.data.images import to_rgb
from serve.search import BadRequest, shown

QUERY_FORMATS = ("JPEG", "PNG", "WEBP")
FORMAT_NAMES = "JPEG, PNG or WebP"
# Modes Image.reduce averages correctly; others (palettes, 1-bit, 16-bit greyscale) are
# converted first, as averaging palette indices or packed bits would give other colours.
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "F")


def decode_query_image(data: bytes, size: int, max_pixels: int, field: str = "image") -> np.ndarray:
    """Decode a query image as CLIP sees it: RGB, short side resized to `size`, centre-cropped.

    Args:
        data: the encoded image.
        size: the model's input side length.
        max_pixels: most pixels the header may declare (`max_query_image_pixels`).
        field: the request field the image came in, for messages.
    Returns:
        uint8 array (size, size, 3).
    Raises:
        BadRequest: 400 naming `field`: not JPEG, PNG or WebP, over max_pixels, or corrupt.
    """
    try:
        img = Image.open(io.BytesIO(data), formats=QUERY_FORMATS)
        width, height = img.size
        if width * height > max_pixels:
            raise BadRequest(
                400,
                f"'{field}' is {width}x{height} pixels; query images may have at most "
                f"{max_pixels} (max_query_image_pixels)",
            )
        if width < 1 or height < 1:
            raise BadRequest(400, f"'{field}' has no pixels ({width}x{height})")
        # A JPEG decodes at 1/2, 1/4 or 1/8 scale, still at least `size` on each side.
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (size, size))
        img.load()
        # Box-averaged to at least twice the model's size (PIL's reducing_gap): the bicubic
        # resize after it then sees what the corpus decoder's full-size resize sees.
        factor = min(img.size) // (2 * size)
        if factor > 1:
            if img.mode not in REDUCIBLE_MODES:
                img = to_rgb(img)
            img = img.reduce(factor)
        img = to_rgb(ImageOps.exif_transpose(img))
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)
    except BadRequest:
        raise
    except Image.UnidentifiedImageError:
        raise BadRequest(
            400, f"'{field}' is not a {FORMAT_NAMES} image (the formats query images may have)"
        ) from None
    except Image.DecompressionBombError:  # PIL's own guard, past twice its MAX_IMAGE_PIXELS
        raise BadRequest(
            400, f"'{field}' has over {max_pixels} pixels (max_query_image_pixels)"
        ) from None
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError) as e:
        raise BadRequest(
            400, f"'{field}' does not decode: {type(e).__name__}: {shown(str(e))}"
        ) from None


class QueryImageDecoder:
    """Query images decoded on `threads` threads of their own, at most that many at once: the
    event loop answers other requests meanwhile, and further images wait for a slot on the loop
    (not in the pool's queue, holding a thread)."""

    def __init__(self, threads: int, max_pixels: int):
        self.max_pixels = max_pixels
        self.slots = asyncio.Semaphore(threads)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="query-image")

    async def decode(self, data: bytes, size: int, field: str = "image") -> np.ndarray:
        """decode_query_image on the pool. Raises: BadRequest as decode_query_image."""
        async with self.slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.pool, decode_query_image, data, size, self.max_pixels, field
            )
