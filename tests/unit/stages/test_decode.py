"""actors/decode.py on dict batches: every row comes out, bad bytes as error rows."""

import numpy as np
import pytest

from actors.decode import check_decode_batch, concat_checks, decode_batch, decode_columns
from align.data.images import ImageDecodeError
from tests.unit.stages.conftest import jpeg

SIZE = 32


def _batch():
    good = jpeg(0)
    return {
        "image_id": np.array(["good", "truncated", "text", "empty"], dtype=object),
        "image": np.array([good, good[: len(good) // 2], b"not an image", b""], dtype=object),
        "caption": np.array(["a red star", "x", "   ", None], dtype=object),
    }


def test_decode_keeps_every_row_and_says_why_a_row_failed():
    out = decode_batch(_batch(), image_size=SIZE, max_pixels=10**8)
    assert list(out["status"]) == ["ok", "error", "error", "error"]
    assert out["pixels"].shape == (4, SIZE, SIZE, 3) and out["pixels"].dtype == np.uint8
    assert out["pixels"][0].any() and not out["pixels"][1:].any()  # failed rows stay zero
    assert all(out["error"][1:]) and not out["error"][0]


def test_the_pixel_guard_refuses_large_images():
    out = decode_batch(_batch(), image_size=SIZE, max_pixels=100)
    assert out["status"][0] == "error" and "max_image_pixels" in out["error"][0]


def test_check_stage_reports_captions_and_sizes_and_drops_pixels():
    batch = _batch()
    out = check_decode_batch(batch, image_size=SIZE, max_pixels=10**8)
    assert "pixels" not in out and "image" not in out
    assert list(out["has_caption"]) == [True, True, False, False]
    assert list(out["nbytes"]) == [len(b) for b in batch["image"]]
    kept = check_decode_batch(batch, image_size=SIZE, max_pixels=10**8, keep_bytes=True)
    assert kept["image"] is batch["image"]
    assert concat_checks([]).num_rows == 0 and "has_caption" in concat_checks([]).column_names


def test_decode_columns_decodes_each_named_column_and_raises_on_a_changed_image():
    batch = {"a": np.array([jpeg(1)], dtype=object), "b": np.array([jpeg(2)], dtype=object)}
    out = decode_columns(
        batch, columns={"a": "a_pixels", "b": "b_pixels"}, image_size=SIZE, max_pixels=10**8
    )
    assert "a" not in out and out["a_pixels"].shape == (1, SIZE, SIZE, 3)
    assert not np.array_equal(out["a_pixels"], out["b_pixels"])
    with pytest.raises(ImageDecodeError):  # the check stage vouched for it: not the user's row
        decode_columns(
            {"a": np.array([b"x"], dtype=object)},
            columns={"a": "a_pixels"}, image_size=SIZE, max_pixels=10**8,
        )  # fmt: skip
