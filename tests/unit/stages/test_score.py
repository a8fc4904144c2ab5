"""actors/score.py on a dict batch: one raw score column per scorer (NaN on error rows), the
pixels dropped; then the batch as the Arrow table index_corpus stages."""

import numpy as np
import pyarrow as pa

from actors.score import AestheticScorer, scored_to_arrow
from align.models.aesthetics import lowlevel_score


def _batch():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(3, 8)).astype(np.float16)
    return {
        "image_id": np.array(["a", "b", "c"], dtype=object),
        "pixels": rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
        "embedding": emb,
        "status": np.array(["ok", "error", "ok"], dtype=object),
        "error": np.array(["", "not an image", ""], dtype=object),
    }


def test_scores_ok_rows_with_each_scorer_and_drops_the_pixels():
    batch = _batch()
    out = AestheticScorer({"lowlevel": None}, embed_dim=8)(batch)
    assert "pixels" not in out
    scores = out["aesthetic_lowlevel"]
    np.testing.assert_allclose(scores[[0, 2]], lowlevel_score(batch["pixels"][[0, 2]]), rtol=1e-5)
    assert np.isnan(scores[1])


def test_the_staged_table_holds_float16_embeddings_and_nulls_on_error_rows():
    out = AestheticScorer({"lowlevel": None}, embed_dim=8)(_batch())
    table = scored_to_arrow(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float16())
    assert table["embedding"].to_pylist()[1] is None
    np.testing.assert_array_equal(
        np.array(table["embedding"].to_pylist()[2], np.float16), out["embedding"][2]
    )
    assert table["error"].to_pylist() == [None, "not an image", None]
    assert table.schema.field("aesthetic_lowlevel").type == pa.float32()
