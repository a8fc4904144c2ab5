"""actors/embed.py on a dict batch with tiny-clip: the model's own normalised embedding, in
float16, for ok rows; zeros for error rows."""

import numpy as np
import torch

from actors.embed import ClipImageEmbedder
from align.data.images import pixels_to_tensor


def test_embeds_ok_rows_as_the_model_does_and_skips_error_rows(tiny_clip):
    model, clip = tiny_clip
    rng = np.random.default_rng(0)
    size = clip.image_size
    pixels = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    batch = {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "pixels": pixels,
        "status": np.array(["ok", "error", "ok"], dtype=object),
    }
    out = ClipImageEmbedder(model, threads=1)(batch)
    emb = out["embedding"]
    assert emb.dtype == np.float16 and emb.shape == (3, clip.embed_dim)
    assert not emb[1].any()
    with torch.inference_mode():
        x = pixels_to_tensor(pixels[[0, 2]], clip.mean, clip.std, "cpu", torch.float32)
        expected = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1).numpy()
    np.testing.assert_allclose(emb[[0, 2]].astype(np.float32), expected, atol=2e-3)
    assert out["image_id"] is batch["image_id"]  # the other columns pass through
