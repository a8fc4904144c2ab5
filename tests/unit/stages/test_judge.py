"""actors/judge.py on a dict batch: each request's images become JPEG data URLs, an image that
does not decode is left out and named; the ranker messages carry the prompt and every image."""

import base64
import io

import numpy as np
from PIL import Image

from actors.judge import attach_data_urls, ranker_messages
from tests.unit.stages.conftest import jpeg


def test_images_become_data_urls_and_a_broken_one_is_named():
    batch = {
        "request_id": np.array(["r1", "r2"], dtype=object),
        "query": np.array(["a red star", "a blue disc"], dtype=object),
        "images": np.array([[jpeg(0), jpeg(1)], [jpeg(2), b"broken"]], dtype=object),
    }
    out = attach_data_urls(batch, image_size=24, max_pixels=10**8)
    assert "images" not in out and list(out["request_id"]) == ["r1", "r2"]
    assert [len(u) for u in out["image_urls"]] == [2, 1]
    assert out["image_errors"][0] == "" and out["image_errors"][1].startswith("image 1:")
    head, data = out["image_urls"][0][0].split(",", 1)
    assert head == "data:image/jpeg;base64"
    assert max(Image.open(io.BytesIO(base64.b64decode(data))).size) <= 24


def test_ranker_messages_hold_the_prompt_then_every_image():
    messages = ranker_messages("a red star", ["data:a", "data:b"], 1, "Rank for {query}, top {k}")
    content = messages[0]["content"]
    assert content[0] == {"type": "text", "text": "Rank for a red star, top 1"}
    assert [c["image_url"]["url"] for c in content[1:]] == ["data:a", "data:b"]
