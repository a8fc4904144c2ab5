import io

import numpy as np
import pytest
from PIL import Image

from align.data.images import ImageDecodeError, decode_image

from ..conftest import SHARED_ASSETS

SIZE, LIMIT = 32, 10_000_000


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb(mode="RGB", size=(40, 30)):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize(
    "data",
    [
        encode(rgb(), "JPEG"),
        encode(rgb("CMYK"), "JPEG"),
        encode(rgb("L"), "PNG"),
        encode(rgb("LA"), "PNG"),
        encode(rgb("RGBA"), "PNG"),
        encode(rgb().convert("P"), "PNG"),
        encode(rgb().convert("P"), "PNG", transparency=0),
        encode(rgb(), "WEBP"),
    ],
    ids=["jpeg", "cmyk", "grey", "grey-alpha", "rgba", "palette", "palette-transparent", "webp"],
)
def test_convertible_modes_decode_to_rgb(data):
    out = decode_image(data, SIZE, LIMIT)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


def test_sixteen_bit_png_is_rescaled_not_clipped():
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    out = decode_image(data, SIZE, LIMIT)
    assert out.min() < 20 and out.max() > 235  # full range kept, not saturated at 255


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert (decode_image(encode(img, "PNG"), 8, LIMIT) == 255).all()


def test_real_photo_decodes():
    photo = SHARED_ASSETS / "laion-improved-aesthetic-predictor" / "sample-photo.jpeg"
    if not photo.exists():
        pytest.skip("shared assets not beside the repo")
    out = decode_image(photo.read_bytes(), 224, LIMIT)
    assert out.shape == (224, 224, 3) and out.std() > 10


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"hello, I am a text file", "not an image"),
        (encode(rgb(size=(300, 300)), "JPEG")[:400], "corrupt image"),
        (encode(rgb(size=(400, 400)), "PNG"), "too large"),
    ],
    ids=["zero-bytes", "text", "truncated-jpeg", "bomb-guard"],
)
def test_bad_bytes_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(data, SIZE, max_pixels=100_000)


def test_formats_outside_the_allowlist_are_refused_before_any_decoder_runs():
    """EPS would make PIL run Ghostscript on untrusted bytes."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageDecodeError, match="allowed format"):
        decode_image(eps, SIZE, LIMIT)
    ico = encode(rgb(size=(16, 16)), "ICO")  # a real image, in a format we do not accept
    with pytest.raises(ImageDecodeError, match="allowed format"):
        decode_image(ico, SIZE, LIMIT)


def test_a_conversion_failure_is_a_refusal_not_a_crash(monkeypatch):
    import align.data.images

    def broken(img):
        raise ValueError("conversion not supported")

    monkeypatch.setattr(align.data.images, "to_rgb", broken)
    with pytest.raises(ImageDecodeError, match="conversion not supported"):
        decode_image(encode(rgb(), "PNG"), SIZE, LIMIT)
