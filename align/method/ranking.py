"""The query-time aesthetic baselines people run today, one implementation each, used by
evaluate's systems and by serving:

- re-rank (the cascade the paper argues against): retrieve the top `depth` by similarity, order
  them by (1 - w) z(similarity) + w aesthetic, keep k;
- steer (clip-retrieval's `aesthetic_score` / `aesthetic_weight`): add w times an "aesthetic
  direction" to the query embedding and renormalise. The direction is the mean embedding of the
  corpus's best-rated images (clip-retrieval ships such embeddings per LAION rating; we build it
  from the corpus's own aesthetic scores).

Both are cheap per query (no LLM call, no training) and both need the corpus's aesthetic scores.
"""

from __future__ import annotations

import numpy as np


def blend(
    similarity: np.ndarray, aesthetic: np.ndarray, weight: float, found: np.ndarray | None = None
) -> np.ndarray:
    """Re-rank score of candidates: (1 - weight) * z(similarity) + weight * aesthetic.

    Works on one query's candidates (N,) or a batch (Q, N): similarity is z-scored over each
    query's candidates, so the weight means the same for every query and model; index_corpus's
    aesthetic is already a z-score over the corpus. A missing aesthetic (NaN) counts as the
    corpus mean (0). `found` (bool, same shape) marks real candidates; the others (FAISS's
    padding) take no part in the z-score and score -inf.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    found = np.ones(sim.shape, dtype=bool) if found is None else np.asarray(found, dtype=bool)
    n = np.maximum(found.sum(axis=-1, keepdims=True), 1)
    mean = np.where(found, sim, 0.0).sum(axis=-1, keepdims=True) / n
    centred = np.where(found, sim - mean, 0.0)
    std = np.sqrt((centred**2).sum(axis=-1, keepdims=True) / n)
    z = np.divide(centred, std, out=np.zeros_like(sim), where=std > 0)
    aes = np.nan_to_num(np.asarray(aesthetic, dtype=np.float64), nan=0.0)
    return np.where(found, (1.0 - weight) * z + weight * aes, -np.inf)


def rank(
    similarity: np.ndarray, aesthetic: np.ndarray, k: int, rerank: bool, weight: float
) -> np.ndarray:
    """Positions of the top k candidates (last axis): by similarity, or by `blend` when
    re-ranking. Ties keep the retrieval order."""
    score = blend(similarity, aesthetic, weight) if rerank else np.asarray(similarity)
    return np.argsort(-score, axis=-1, kind="stable")[..., :k]


def rerank_rows(
    candidates: np.ndarray, similarity: np.ndarray, aesthetic: np.ndarray, k: int, weight: float
) -> np.ndarray:
    """The re-rank baseline for a batch of queries.

    Args:
        candidates: (Q, depth) corpus rows by similarity (-1: no result, as FAISS pads).
        similarity: (Q, depth) their similarities.
        aesthetic: (corpus,) aesthetic score of every corpus row (NaN: unscored).
        k, weight: rows kept and the blend's weight.
    Returns:
        (Q, k) corpus rows, -1 where fewer than k candidates were found.
    """
    found = candidates >= 0
    aes = np.where(found, aesthetic[np.maximum(candidates, 0)], np.nan)
    order = np.argsort(-blend(similarity, aes, weight, found), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


def aesthetic_direction(
    embeddings: np.ndarray, aesthetic: np.ndarray, top_share: float
) -> np.ndarray:
    """The mean L2-normalised embedding of the corpus's best-rated images: the `top_share` of
    scored images with the highest aesthetic score (float32, (d,), not normalised, as
    clip-retrieval adds its rating embeddings).

    Raises:
        ValueError: no image has a score, or top_share is outside (0, 1].
    """
    if not 0.0 < top_share <= 1.0:
        raise ValueError(f"top_share must be in (0, 1] (got {top_share})")
    scored = np.flatnonzero(np.isfinite(aesthetic))
    if not len(scored):
        raise ValueError("no image of the corpus has an aesthetic score to steer towards")
    take = max(1, int(round(top_share * len(scored))))
    best = scored[np.argsort(-aesthetic[scored], kind="stable")[:take]]
    emb = np.asarray(embeddings[best], dtype=np.float32)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return emb.mean(axis=0)


def steer(queries: np.ndarray, direction: np.ndarray, weight: float) -> np.ndarray:
    """clip-retrieval's aesthetic steering: q + weight * direction, renormalised (float32)."""
    steered = np.asarray(queries, dtype=np.float32) + weight * np.asarray(direction, np.float32)
    return steered / np.maximum(np.linalg.norm(steered, axis=-1, keepdims=True), 1e-12)


# clip-retrieval's `aesthetic_score` names a rating level, 0 (worst) to 9 (best), and steers the
# query towards the mean embedding of images people rated at that level. Built here from the
# corpus's own aesthetic scores: level l holds the images between the l-th and (l+1)-th
# quantile of the combined score (level 9: the best-rated tenth).
RATING_LEVELS = 10


def rating_edges(aesthetic: np.ndarray, levels: int = RATING_LEVELS) -> np.ndarray:
    """The (levels - 1,) score quantiles that split the scored images into rating levels.

    Raises:
        ValueError: no image has a score.
    """
    scored = np.asarray(aesthetic, dtype=np.float64)
    scored = scored[np.isfinite(scored)]
    if not len(scored):
        raise ValueError("no image of the corpus has an aesthetic score to rate")
    return np.quantile(scored, np.arange(1, levels) / levels)


def rating_level_sums(
    embeddings: np.ndarray, aesthetic: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per rating level, the sum of its images' L2-normalised embeddings (float64, (levels, d))
    and their count: sums of shards add up, so shards built apart give the corpus's means."""
    levels = len(edges) + 1
    emb = np.asarray(embeddings, dtype=np.float64)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    scored = np.isfinite(aesthetic)
    level = np.searchsorted(edges, np.asarray(aesthetic)[scored], side="right")
    sums = np.zeros((levels, emb.shape[1]))
    np.add.at(sums, level, emb[scored])
    return sums, np.bincount(level, minlength=levels)


def rating_embeddings(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The mean embedding of each rating level (float32, not renormalised, as clip-retrieval's
    rating embeddings); a level without images is zero (steering towards it changes nothing)."""
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def near_duplicates(embeddings: np.ndarray, threshold: float, priority=None) -> np.ndarray:
    """Bool per row: a near-duplicate, not the one of its group that stays. Rows come best
    first; each row joins the group of the first earlier group leader within cosine
    `threshold`, or leads a group of its own (not transitive, unlike clip-retrieval's connected
    components: a chain of near neighbours does not merge distinct images, and looking at more
    rows never merges groups, so a deeper search never keeps fewer). Of each group the leader
    stays or, given `priority`, the row with the highest (the earlier on ties; NaN lowest)."""
    emb = np.asarray(embeddings, dtype=np.float32)
    n = len(emb)
    if n == 0:
        return np.zeros(0, dtype=bool)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    near = emb @ emb.T >= threshold
    group = np.arange(n)
    leader = np.zeros(n, dtype=bool)
    for i in range(n):  # greedy and sequential by definition: one vector op per row
        hits = np.flatnonzero(near[i, :i] & leader[:i])
        if len(hits):
            group[i] = hits[0]
        else:
            leader[i] = True
    place = np.arange(n)
    if priority is not None:
        key = np.nan_to_num(np.asarray(priority, dtype=np.float64), nan=-np.inf)
        place[np.lexsort((np.arange(n), -key))] = np.arange(n)  # highest first
    best = np.full(n, n)
    np.minimum.at(best, group, place)
    return place != best[group]


def filter_candidates(
    aesthetic: np.ndarray,
    vectors: np.ndarray | None,
    *,
    min_aesthetic: float | None = None,
    dedup_threshold: float | None = None,
    keep_most_aesthetic: bool = True,
) -> tuple[np.ndarray, dict]:
    """The result filters of a search, on candidates in rank order: drop those under
    `min_aesthetic` (and unscored ones), then collapse near-duplicates (cosine >=
    `dedup_threshold`, `vectors` needed) keeping the most aesthetic of each group, or the first
    when not `keep_most_aesthetic` (clip-back's choice). Returns (keep mask, how many each
    filter dropped)."""
    aesthetic = np.asarray(aesthetic, dtype=np.float64)
    keep = np.ones(len(aesthetic), dtype=bool)
    if min_aesthetic is not None:
        keep &= np.nan_to_num(aesthetic, nan=-np.inf) >= min_aesthetic
    below = int((~keep).sum())
    duplicates = 0
    if dedup_threshold is not None and keep.any():
        rows = np.flatnonzero(keep)
        priority = aesthetic[rows] if keep_most_aesthetic else None
        duplicate = near_duplicates(np.asarray(vectors)[rows], dedup_threshold, priority)
        keep[rows[duplicate]] = False
        duplicates = int(duplicate.sum())
    return keep, {"below_min_aesthetic": below, "duplicates": duplicates}
