"""actors/tokenize.py on dict batches: token ids equal open_clip's own tokenizer's, row for row
(repeated texts too), the other columns pass through, a missing column is named."""

import numpy as np
import open_clip
import pytest

from actors.tokenize import tokenize_columns
from align.models.clip import register_model_configs


def test_texts_become_the_models_token_ids_row_for_row():
    texts = ["a red star", "a blue circle on a striped background", "a red star", "x"]
    batch = {"caption": np.array(texts, dtype=object), "pixels": np.arange(4)}
    out = tokenize_columns(batch, model="tiny-clip", columns={"caption": "caption_tokens"})
    register_model_configs()
    expected = open_clip.get_tokenizer("tiny-clip")(texts).numpy()
    assert "caption" not in out and out["caption_tokens"].dtype == np.int32
    np.testing.assert_array_equal(out["caption_tokens"], expected)
    np.testing.assert_array_equal(out["pixels"], batch["pixels"])


def test_a_missing_text_column_is_named():
    with pytest.raises(ValueError, match="stage tokenize needs column.*'query'"):
        tokenize_columns({"caption": np.array(["a"])}, model="tiny-clip",
                         columns={"query": "query_tokens"})  # fmt: skip
