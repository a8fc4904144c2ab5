"""Evaluation metrics: retrieval, aesthetics of the top-k, the HPIR protocol and judge verdicts.

Pure functions over numpy arrays, so the evaluate job (pipelines/evaluate.py) and the tests share
one definition of every number in `metrics.json`:

- `recall_at_k`: text-to-image recall, each caption's own image among the top k;
- `mean_at_k`: the mean of a per-image value (a scorer, the ground-truth aesthetic, relevance)
  over each query's top k;
- `hpir_agreement`: confidence-weighted agreement with the people of an HPIR file, for a
  retrieval model (which row its mean similarity prefers) or a judge (which row it picked);
- `consistent_verdict`: the LMM judge's order-consistency rule (two calls, rows swapped);
- `oracle_row_quality`: the synthetic world's judge, from ground truth.
"""

from __future__ import annotations

import numpy as np

# What a judge call answers: the row shown first is better, the second is, or they are similar.
FIRST, SECOND, SIMILAR = "first", "second", "similar"
VERDICTS = ("win", "similar", "loss")


def parse_ranker_answer(text: str | None) -> str:
    """FIRST, SECOND or SIMILAR from a judge's free-text answer (unreadable: SIMILAR)."""
    t = (text or "").strip().lower()
    first = "row 1" in t or "row1" in t or t.startswith("1")
    second = "row 2" in t or "row2" in t or t.startswith("2")
    if first and not second:
        return FIRST
    if second and not first:
        return SECOND
    return SIMILAR


def recall_at_k(
    similarity: np.ndarray, target: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """Text-to-image recall@k: the share of queries whose target image ranks in the top k.

    Args:
        similarity: (Q, N) query-to-image similarities.
        target: (Q,) column of each query's own image.
    The rank counts images strictly more similar than the target, so ties favour the target
    (as FAISS' order would not be defined for them either).
    """
    rank = target_ranks(similarity, target)
    return {f"recall@{k}": float((rank < k).mean()) for k in ks}


def target_ranks(similarity: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(Q,) rank of each query's target image (column `target`) in its row of `similarity`: the
    images strictly more similar than it, so ties favour the target."""
    own = similarity[np.arange(len(target)), target]
    return (similarity > own[:, None]).sum(axis=1)


def mean_at_k(values: np.ndarray, top: np.ndarray) -> float:
    """Mean of a per-image value over every query's top-k rows (top: (Q, k), -1 = no result;
    missing results and NaN values (an image a scorer did not score) are left out)."""
    taken = np.asarray(values, dtype=np.float64)[np.maximum(top, 0)]
    taken = taken[(top >= 0) & ~np.isnan(taken)]
    return float(taken.mean()) if taken.size else float("nan")


def hpir_agreement(
    prefers_a: np.ndarray, preferred: np.ndarray, confidence: np.ndarray
) -> float | None:
    """Confidence-weighted agreement with people on one HPIR dimension.

    Args:
        prefers_a: (M,) float: 1 when the model or judge prefers row A, 0 for row B, 0.5 when it
            has no preference (a judge's "similar", equal similarities).
        preferred: (M,) 'a', 'b' or None (people had no preference: the item is left out).
        confidence: (M,) share of people who preferred that row.
    Returns:
        sum(conf * agreement) / sum(conf) over decided items; None when there are none.
    """
    decided = np.array([p in ("a", "b") for p in preferred], dtype=bool)
    if not decided.any():
        return None
    people_a = np.array([p == "a" for p in preferred], dtype=float)[decided]
    agree = np.where(people_a == 1.0, prefers_a[decided], 1.0 - prefers_a[decided])
    weight = np.asarray(confidence, dtype=float)[decided]
    return float((weight * agree).sum() / weight.sum())


def similarity_preference(mean_sim_a: np.ndarray, mean_sim_b: np.ndarray) -> np.ndarray:
    """A retrieval model's HPIR answer: row A when its mean similarity to the query is higher."""
    return np.where(mean_sim_a > mean_sim_b, 1.0, np.where(mean_sim_a < mean_sim_b, 0.0, 0.5))


def consistent_verdict(shown_first: str, shown_swapped: str) -> str:
    """Order consistency for the LMM judge: system A's row is shown first, then (second call)
    second. A win only when both calls prefer A's row, a loss only when both prefer B's row;
    anything else (disagreement, "similar", an unreadable answer) counts as similar."""
    if shown_first == FIRST and shown_swapped == SECOND:
        return "win"
    if shown_first == SECOND and shown_swapped == FIRST:
        return "loss"
    return "similar"


def verdict_rates(verdicts: list[str]) -> dict[str, float]:
    """{"win": x, "similar": x, "loss": x, "win+similar": x, "n": count}: the share of each
    verdict, and the paper's second figure, the share that is not a loss."""
    n = len(verdicts)
    rates = {v: (sum(1 for x in verdicts if x == v) / n if n else 0.0) for v in VERDICTS}
    return {**rates, "win+similar": rates["win"] + rates["similar"], "n": n}


def oracle_row_quality(relevant: np.ndarray, true_aesthetic: np.ndarray) -> np.ndarray:
    """The oracle judge's view of a row: the mean over its images of the true aesthetic of the
    relevant ones (an irrelevant image is worth nothing, however beautiful). Shape (..., k) ->
    (...)."""
    return (relevant * true_aesthetic).mean(axis=-1)


def oracle_answer(
    quality_first: np.ndarray, quality_second: np.ndarray, margin: float
) -> list[str]:
    """The oracle's answer for rows shown first and second: the better row, or similar when the
    qualities differ by less than `margin`."""
    diff = np.asarray(quality_first) - np.asarray(quality_second)
    return [FIRST if d > margin else SECOND if d < -margin else SIMILAR for d in diff]
