import numpy as np
import pytest

from align.config import IndexConfig
from align.search.index import build_index, choose_index, exact_top_k, measure_recall, train_index


def unit_vectors(n, d, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_index_type_follows_size_and_memory_budget():
    cfg = IndexConfig(flat_max_vectors=1000, memory_budget_mb=100)
    assert choose_index(1000, 64, cfg).type == "flat"
    assert choose_index(100_000, 64, cfg).type == "hnsw"  # 100k x (256 + 256) B = 49 MB
    spec = choose_index(1_000_000, 64, cfg)  # ~490 MB of HNSW: over budget
    assert spec.type == "ivfpq" and 64 % spec.params["m"] == 0 and spec.params["nlist"] == 16384
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


def test_streamed_exact_search_equals_one_pass_over_all_vectors():
    x = unit_vectors(3000, 16, seed=1)
    q = unit_vectors(20, 16, seed=2)
    chunks = (x[i : i + 700] for i in range(0, len(x), 700))  # uneven chunks, merged as they come
    scores, rows = exact_top_k(chunks, q, 7)
    truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, truth, axis=1), rtol=1e-5)


def test_ivfpq_shards_share_one_trained_quantizer():
    x = unit_vectors(12_000, 32, seed=3)
    spec = choose_index(len(x), 32, IndexConfig(type="ivfpq", ivf_nlist=32, ivf_nprobe=32))
    trained = train_index(x[::2], spec)
    parts = [
        build_index(x[:6000], spec, trained=trained),
        build_index(x[6000:], spec, trained=trained),
    ]
    assert spec.params["nlist"] == 32 and spec.params["train"] == 6000  # the sample
    for part in parts:  # the same centroids in both: no shard trained its own
        centroids = part.quantizer.reconstruct_n(0, 32)
        np.testing.assert_array_equal(centroids, parts[0].quantizer.reconstruct_n(0, 32))
    assert sum(p.ntotal for p in parts) == len(x)


def test_hnsw_coarse_quantizer_trains_searches_and_reads_back_memory_mapped(tmp_path):
    """The quantizer the sizing picks from 4,096 lists (forced here at 64, to stay small): trained,
    added to, its search as deep as twice nprobe, and read back as the corpus reads a shard."""
    import faiss

    from align.search.index import set_nprobe

    x = unit_vectors(6000, 16, seed=4)
    spec = choose_index(len(x), 16, IndexConfig(type="ivfpq", ivf_nlist=64, ivf_nprobe=8))
    flat = build_index(x, spec)
    spec.params["quantizer"] = "hnsw"
    index = build_index(x, spec)
    quantizer = faiss.downcast_index(index.quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.ntotal == 64
    assert quantizer.hnsw.efSearch == 16 and index.nprobe == 8
    hnsw_recall = measure_recall(index, x, n_queries=100)["recall_at_k"]
    assert hnsw_recall >= measure_recall(flat, x, n_queries=100)["recall_at_k"] - 0.05
    faiss.write_index(index, str(tmp_path / "shard.faiss"))
    mapped = faiss.read_index(str(tmp_path / "shard.faiss"), faiss.IO_FLAG_MMAP)
    set_nprobe(mapped, 32)
    assert faiss.downcast_index(faiss.extract_index_ivf(mapped).quantizer).hnsw.efSearch == 64
    assert measure_recall(mapped, x, n_queries=100)["recall_at_k"] >= hnsw_recall
