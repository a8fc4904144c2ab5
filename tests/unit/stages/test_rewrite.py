"""actors/rewrite.py on dict batches: the keywords backend rewrites every query; an LLM's
completion is kept only when usable, otherwise the query stays and the reason is recorded."""

import numpy as np
import pytest

from actors.rewrite import checked_completion, keyword_rewrite_batch, rewrite_messages
from align.config import RewriteConfig
from align.method.rewrite import keyword_rewrite


def test_keyword_rewriting_rewrites_every_row_and_keeps_the_columns():
    batch = {
        "query_id": np.array(["q1", "q2"], dtype=object),
        "query": np.array(["a red star", "a blue disc"], dtype=object),
    }
    out = keyword_rewrite_batch(batch, variant="k_phrase", keywords=5)
    assert list(out["rewritten"]) == [keyword_rewrite(q, "k_phrase", 5) for q in batch["query"]]
    assert list(out["fallback"]) == ["", ""] and out["query_id"] is batch["query_id"]
    with pytest.raises(ValueError, match="query"):
        keyword_rewrite_batch({"query_id": batch["query_id"]}, variant="k_phrase", keywords=5)


@pytest.mark.parametrize(
    "completion, error, kept",
    [
        ('"a lovely red star"', None, "a lovely red star"),
        ("", None, None),
        ("x" * 50, None, None),
        ("fine", "HTTP 500\ntrace", None),
    ],
)
def test_an_unusable_completion_keeps_the_query(completion, error, kept):
    rewritten, reason = checked_completion("a red star", completion, error, max_chars=40)
    assert rewritten == (kept or "a red star")
    assert (reason is None) == (kept is not None)
    if error:
        assert "\n" not in reason


def test_messages_carry_the_system_prompt_and_the_variant_template():
    cfg = RewriteConfig(backend="http", variant="detail")
    messages = rewrite_messages("a red star", cfg)
    assert messages[0] == {"role": "system", "content": cfg.system_prompt}
    assert "a red star" in messages[1]["content"]
