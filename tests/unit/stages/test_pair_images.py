"""actors/pair_images.py on a pyarrow batch: both images of each pair attached from broadcast
blocks in Ray's object store (a real local Ray) and decoded; a pair whose image is not among
the checked ones fails loudly (the checks ran before, so this is a bug, not a bad row)."""

import numpy as np
import pyarrow as pa
import pytest

from actors.decode import decode_batch
from actors.pair_images import PairImageDecoder
from tests.unit.stages.conftest import jpeg

SIZE = 24


def test_pairs_get_both_images_decoded_from_the_broadcast_blocks(ray_session):
    images = {f"img{i}": jpeg(i) for i in range(4)}
    block = pa.table(
        {
            "image_id": list(images),
            "image": pa.array(list(images.values()), pa.binary()),
            "status": ["ok", "ok", "ok", "error"],
        }
    )
    decoder = PairImageDecoder([ray_session.put(block)], image_size=SIZE, max_pixels=10**8)
    pairs = pa.table({"query": ["q", "q"], "chosen_id": ["img0", "img2"],
                      "rejected_id": ["img1", "img0"]})  # fmt: skip
    out = decoder(pairs)
    assert "chosen_image" not in out and out["chosen_pixels"].shape == (2, SIZE, SIZE, 3)

    def decoded(image_id):
        one = {"image_id": np.array(["x"], dtype=object)}
        return decode_batch({**one, "image": np.array([images[image_id]], dtype=object)},
                            image_size=SIZE, max_pixels=10**8)["pixels"][0]  # fmt: skip

    # img0 is chosen in one pair and rejected in the other (decoded once, attached twice).
    for side, ids in (("chosen", ["img0", "img2"]), ("rejected", ["img1", "img0"])):
        for row, image_id in enumerate(ids):
            np.testing.assert_array_equal(out[f"{side}_pixels"][row], decoded(image_id))
    with pytest.raises(KeyError, match="img3"):  # an image whose check failed is not attached
        decoder(pa.table({"query": ["q"], "chosen_id": ["img3"], "rejected_id": ["img0"]}))
