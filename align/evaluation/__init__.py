"""Evaluation of retrieval systems, without Ray: what the evaluate job computes and writes.

- `metrics`: the numbers of `metrics.json` (recall@k, mean@k, HPIR agreement, judge verdicts),
  pure functions over numpy arrays; re-exported here (`evaluation.recall_at_k`);
- `systems`: the configured systems resolved to models, rewrite and query-time baselines;
- `gallery`: the searched images with their embeddings, scores and ground truth;
- `hpir`: the HPIR protocol over a gallery;
- `judge`: the judge's paired calls, the oracle's answers and the verdict rates;
- `views`: the tables reported, one per gallery (images no training step saw; the training
  corpus, 'seen') and query split, and metrics.json's layout;
- `report`: `report.html` and the terminal table.

May import every other subpackage of align (it is the top of the library).
"""

from align.evaluation.metrics import (
    FIRST,
    SECOND,
    SIMILAR,
    VERDICTS,
    consistent_verdict,
    hpir_agreement,
    mean_at_k,
    oracle_answer,
    oracle_row_quality,
    parse_ranker_answer,
    recall_at_k,
    similarity_preference,
    verdict_rates,
)

__all__ = [
    "FIRST",
    "SECOND",
    "SIMILAR",
    "VERDICTS",
    "consistent_verdict",
    "hpir_agreement",
    "mean_at_k",
    "oracle_answer",
    "oracle_row_quality",
    "parse_ranker_answer",
    "recall_at_k",
    "similarity_preference",
    "verdict_rates",
]
