"""The query-time baselines (align/method/ranking.py) against computations written out here."""

import numpy as np
import pytest

from align.method.ranking import aesthetic_direction, blend, rank, rerank_rows, steer


def test_blend_is_z_similarity_and_aesthetic_weighted():
    sim = np.array([0.9, 0.5, 0.4, 0.8])
    aes = np.array([-1.0, 2.0, 0.5, np.nan])
    z = (sim - sim.mean()) / sim.std()
    np.testing.assert_allclose(blend(sim, aes, 0.25), 0.75 * z + 0.25 * np.array([-1, 2, 0.5, 0]))
    assert rank(sim, aes, 4, rerank=False, weight=0.9).tolist() == [0, 3, 1, 2]
    assert rank(sim, aes, 4, rerank=True, weight=0.0).tolist() == [0, 3, 1, 2]
    assert rank(sim, aes, 2, rerank=True, weight=1.0).tolist() == [1, 2]
    # Equal similarities: z is 0, aesthetics decide; one candidate: finite.
    assert rank(np.array([0.2, 0.2]), np.array([0.0, 1.0]), 2, True, 0.5).tolist() == [1, 0]
    assert np.isfinite(blend(np.array([0.2]), np.array([1.0]), 0.5)).all()


def test_rerank_rows_matches_a_per_query_loop_and_skips_padding():
    rng = np.random.default_rng(0)
    corpus_aes = rng.normal(size=50)
    corpus_aes[7] = np.nan
    candidates = np.stack([rng.permutation(50)[:12] for _ in range(4)])
    candidates[1, 0] = 7  # an unscored candidate counts as the corpus mean
    similarity = -np.sort(-rng.uniform(0.1, 0.9, size=(4, 12)), axis=1)
    candidates[3, 9:] = -1  # FAISS's padding: fewer results than asked
    similarity[3, 9:] = -3.4e38
    got = rerank_rows(candidates, similarity, corpus_aes, k=5, weight=0.6)
    for q in range(4):
        real = candidates[q] >= 0
        sim = similarity[q][real]
        aes = np.nan_to_num(corpus_aes[candidates[q][real]], nan=0.0)
        score = 0.4 * (sim - sim.mean()) / sim.std() + 0.6 * aes
        expected = candidates[q][real][np.argsort(-score, kind="stable")[:5]]
        assert got[q].tolist() == expected.tolist()
    # Fewer real candidates than k: the padding stays at the end, never chosen before a result.
    few = rerank_rows(candidates[3:, :], np.where(candidates[3:] >= 0, similarity[3:], -3.4e38),
                      corpus_aes, k=12, weight=0.6)  # fmt: skip
    assert (few[0, :9] >= 0).all() and (few[0, 9:] == -1).all()
    # Weight 0 keeps the retrieval order.
    assert (rerank_rows(candidates, similarity, corpus_aes, 5, 0.0) == candidates[:, :5]).all()


def test_steering_adds_the_mean_of_the_best_rated_and_renormalises():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    aes = rng.normal(size=40)
    aes[[3, 5]] = np.nan
    direction = aesthetic_direction(emb.astype(np.float16), aes, top_share=0.1)
    scored = [i for i in range(40) if not np.isnan(aes[i])]
    best = sorted(scored, key=lambda i: -aes[i])[: round(0.1 * len(scored))]
    np.testing.assert_allclose(direction, emb[best].mean(axis=0), atol=2e-3)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    moved = steer(q, direction, 0.5)
    expected = q + 0.5 * direction
    np.testing.assert_allclose(moved, expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-6)
    assert (moved @ direction > q @ direction).all()  # towards the best-rated images
    np.testing.assert_allclose(steer(q, direction, 0.0), q, atol=1e-6)
    with pytest.raises(ValueError, match="no image"):
        aesthetic_direction(emb, np.full(40, np.nan), 0.1)
    with pytest.raises(ValueError, match="top_share"):
        aesthetic_direction(emb, aes, 0.0)


def test_rating_embeddings_from_shards_equal_the_corpus_means():
    """Level sums of two shards add up to the corpus's mean normalised embedding per level."""
    from align.method.ranking import rating_edges, rating_embeddings, rating_level_sums

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(200, 6))
    aesthetic = rng.normal(size=200)
    aesthetic[7] = np.nan  # unscored: in no level
    edges = rating_edges(aesthetic)
    parts = [
        rating_level_sums(emb[s], aesthetic[s], edges) for s in (slice(0, 90), slice(90, None))
    ]
    sums, counts = parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    got = rating_embeddings(sums, counts)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    order = np.argsort(np.where(np.isnan(aesthetic), np.inf, aesthetic))[:199]
    top_tenth = order[-20:]  # 199 scored: the best 20 or so sit in level 9
    assert counts.sum() == 199 and got.shape == (10, 6)
    level9 = unit[np.isfinite(aesthetic) & (aesthetic > edges[-1])]
    np.testing.assert_allclose(got[9], level9.mean(axis=0), atol=1e-6)
    assert set(np.flatnonzero(np.isfinite(aesthetic) & (aesthetic > edges[-1]))) <= set(top_tenth)


def test_near_duplicates_join_the_first_leader_not_a_chain():
    from align.method.ranking import near_duplicates

    base = np.eye(4)
    rows = np.stack([base[0], base[1], base[0] + 0.05 * base[2], base[3], base[1] + 0.01])
    # row 2 ~ row 0, row 4 ~ row 1; rows 0, 1 and 3 lead their groups.
    assert near_duplicates(rows, 0.94).tolist() == [False, False, True, False, True]
    assert not near_duplicates(rows, 0.9999).any()
    # A chain a ~ b ~ c with a and c apart: c leads its own group (transitive grouping would
    # drop it), and adding rows after them never changes who leads.
    angle = np.radians([0, 15, 30])
    chain = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    assert near_duplicates(chain, np.cos(np.radians(20))).tolist() == [False, True, False]
    assert near_duplicates(chain[:2], np.cos(np.radians(20))).tolist() == [False, True]


def test_result_filters_keep_the_most_aesthetic_of_each_group():
    """dedup keeps the most aesthetic of a group (not the first, as clip-back does), after
    min_aesthetic dropped what is under it; checked against a loop over groups."""
    from align.method.ranking import filter_candidates, near_duplicates

    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 16))
    group = rng.integers(0, 6, size=60)
    vectors = centres[group] + 0.01 * rng.normal(size=(60, 16))
    aesthetic = rng.normal(size=60)
    aesthetic[[4, 9]] = np.nan  # unscored: lowest priority, dropped by min_aesthetic

    keep, counts = filter_candidates(aesthetic, vectors, dedup_threshold=0.95)
    score = np.nan_to_num(aesthetic, nan=-np.inf)
    expected = {int(np.flatnonzero(group == g)[np.argmax(score[group == g])]) for g in set(group)}
    assert set(np.flatnonzero(keep)) == expected
    assert counts == {"below_min_aesthetic": 0, "duplicates": 60 - len(expected)}

    keep, counts = filter_candidates(aesthetic, vectors, min_aesthetic=0.0, dedup_threshold=0.95)
    passing = score >= 0.0
    expected = {
        int(np.flatnonzero((group == g) & passing)[np.argmax(score[(group == g) & passing])])
        for g in set(group[passing])
    }
    assert set(np.flatnonzero(keep)) == expected
    assert counts["below_min_aesthetic"] == int((~passing).sum())

    # clip-back's rule: the first of each group.
    first = filter_candidates(aesthetic, vectors, dedup_threshold=0.95, keep_most_aesthetic=False)
    assert set(np.flatnonzero(first[0])) == {int(np.flatnonzero(group == g)[0]) for g in set(group)}
    assert (~first[0]).tolist() == near_duplicates(vectors, 0.95).tolist()
    # min_aesthetic alone needs no vectors.
    keep, _ = filter_candidates(aesthetic, None, min_aesthetic=0.5)
    assert keep.tolist() == (score >= 0.5).tolist()
