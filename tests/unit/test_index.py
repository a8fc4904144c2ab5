import numpy as np
import pytest

from align.config import IndexConfig
from align.index import ShardedIndex, build_index, choose_index, measure_recall


def unit_vectors(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_type_follows_size_and_memory_budget():
    cfg = IndexConfig(flat_max_vectors=1000, memory_budget_mb=100)
    assert choose_index(1000, 64, cfg).type == "flat"
    assert choose_index(100_000, 64, cfg).type == "hnsw"  # 100k x (256 + 256) B = 49 MB
    spec = choose_index(1_000_000, 64, cfg)  # ~490 MB of HNSW: over budget
    assert spec.type == "ivfpq" and 64 % spec.params["m"] == 0 and spec.params["nlist"] == 4000
    assert choose_index(10, 64, IndexConfig(type="hnsw")).type == "hnsw"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_indexes_find_the_exact_neighbours(kind):
    x = unit_vectors(20_000, 32)
    spec = choose_index(len(x), 32, IndexConfig(type=kind, ivf_nprobe=64))
    index = build_index(x, spec)
    recall = measure_recall(index, x, n_queries=100)
    assert recall["queries"] == 100 and recall["k"] == 10
    floor = {"flat": 1.0, "hnsw": 0.9, "ivfpq": 0.3}[kind]  # PQ codes are lossy on random data
    assert recall["recall_at_k"] >= floor


def test_sharded_search_merges_to_the_single_index_answer():
    x = unit_vectors(3000, 16, seed=1)
    spec = choose_index(len(x), 16, IndexConfig(type="flat"))
    whole = build_index(x, spec)
    parts = [
        build_index(x[:1000], spec),
        build_index(x[1000:2200], spec),
        build_index(x[2200:], spec),
    ]
    sharded = ShardedIndex(parts, [0, 1000, 2200])
    q = unit_vectors(20, 16, seed=2)
    s1, r1 = whole.search(q, 7)
    s2, r2 = sharded.search(q, 7)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2, rtol=1e-6)
    assert sharded.ntotal == 3000
