"""actors/text_embed.py on a dict batch with tiny-clip: one embedding column per text column,
each the model's own, and the truncation flag for texts past the context."""

import numpy as np
import torch

from actors.text_embed import ClipTextEmbedder


def test_embeds_each_text_column_and_flags_truncated_texts(tiny_clip):
    model, clip = tiny_clip
    long = " ".join(["word"] * (clip.context_length + 10))
    batch = {
        "query_id": np.array(["q1", "q2"], dtype=object),
        "query": np.array(["a red star", "a blue disc"], dtype=object),
        "rewritten": np.array(["a beautiful red star", long], dtype=object),
    }
    out = ClipTextEmbedder(model, threads=1)(batch)
    with torch.inference_mode():
        tokens = clip.tokenizer(list(batch["query"]))
        expected = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1).numpy()
    np.testing.assert_allclose(out["query_embedding"], expected, atol=1e-5)
    assert out["rewritten_embedding"].shape == expected.shape
    assert not np.allclose(out["rewritten_embedding"], out["query_embedding"])
    assert list(out["truncated"]) == [False, True]
