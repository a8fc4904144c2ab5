"""IVF-PQ sizing as autofaiss sizes it: nlist from the corpus, an HNSW coarse quantizer at
thousands of lists, the PQ code the memory budget holds, 39 training vectors per centroid (the
sample grows, nlist is lowered, or an explicit nlist is refused), and nprobe chosen at build time
to reach the recall target. Real FAISS, real Parquet, the build in this process (no Ray)."""

import numpy as np
import pyarrow as pa
import pytest

from actors.score import scored_to_arrow
from align.config import IndexConfig, ModelConfig
from align.data.contracts import SCORED, SCORER_COLUMN_PREFIX, conform
from align.errors import UserError
from align.search.build import write_index
from align.search.corpus import Corpus, faiss_ivf
from align.search.index import (
    TWO_LEVEL_MIN_NLIST,
    choose_index,
    proportional_shares,
    recall_at_k,
    train_index,
)
from align.storage import io

FAISS_WARNING = "WARNING clustering"


@pytest.mark.parametrize(
    ("n", "nlist", "quantizer", "m"),
    [
        (100_000, 1024, "flat", 128),  # 4 sqrt(n) = 1265: the nearest power of two; d/4 bytes
        (1_000_000, 16_384, "hnsw", 128),
        (20_000_000, 65_536, "hnsw", 128),
        # 500M codes in one 8 GiB shard: 8 bytes a code (+ 8 of id) is the largest that fits.
        (500_000_000, 131_072, "hnsw", 8),
    ],
)
def test_sizing_table_gives_nlist_quantizer_and_the_code_the_budget_holds(n, nlist, quantizer, m):
    spec = choose_index(n, 512, IndexConfig(type="ivfpq"))
    assert (spec.params["nlist"], spec.params["quantizer"], spec.params["m"]) == (
        nlist,
        quantizer,
        m,
    )
    assert spec.sizing["shard_bytes"] <= spec.sizing["budget_bytes"] == 8192 * 2**20
    assert spec.params["train"] == max(262_144, 39 * nlist)  # index.train_sample, grown
    assert spec.params["nprobe"] is None  # chosen by the build


def test_explicit_nlist_and_nprobe_override_and_a_budget_too_small_is_refused():
    spec = choose_index(20_000_000, 512, IndexConfig(type="ivfpq", ivf_nlist=2048, ivf_nprobe=16))
    assert spec.params["nlist"] == 2048 and spec.params["quantizer"] == "flat"
    assert spec.params["nprobe"] == 16 and spec.sizing["nlist_rule"] == "index.ivf_nlist"
    assert (
        choose_index(5_000, 512, IndexConfig(type="ivfpq", ivf_nlist=4096)).params["quantizer"]
        == "hnsw"
    )
    with pytest.raises(UserError, match="index.memory_budget_mb=100 cannot hold"):
        choose_index(20_000_000, 512, IndexConfig(type="ivfpq", memory_budget_mb=100))


def clustered(n, d, seed, clusters=64, noise=0.4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(clusters, d))[rng.integers(0, clusters, n)] + noise * rng.normal(
        size=(n, d)
    )
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_scored(root, x, per_file):
    """Scored Parquet files of the vectors (float16 embeddings, as index_corpus writes them)."""
    files = []
    for f, start in enumerate(range(0, len(x), per_file)):
        part = x[start : start + per_file]
        batch = {
            "image_id": np.array([f"img{start + i:06d}" for i in range(len(part))], dtype=object),
            "embedding": part.astype(np.float16),
            "status": np.full(len(part), "ok", dtype=object),
            "error": np.full(len(part), "", dtype=object),
        }
        aesthetic = pa.array(np.zeros(len(part), np.float32))
        table = scored_to_arrow(batch).append_column("aesthetic", aesthetic)
        files.append(f"{root}/scored/part-{f:05d}.parquet")
        io.write_parquet(conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX), files[-1])
    return files


@pytest.fixture(scope="module")
def scored_files(tmp_path_factory):
    """Three scored files of 8,000 clustered vectors each (d = 16)."""
    root = tmp_path_factory.mktemp("sizing")
    return write_scored(root, clustered(24_000, 16, seed=0), per_file=8000)


def build(files, root, **settings):
    cfg = IndexConfig(**{"type": "ivfpq", "recall_queries": 100, **settings})
    return write_index(files, f"{root}/index", cfg, ModelConfig(name="tiny-clip"), remote=False)


def test_training_sample_grows_to_39_vectors_per_list(scored_files, tmp_path, capfd):
    """index.train_sample 2,000 under 512 lists: the sample grows to 39 x 512 training vectors
    (the corpus has them), and FAISS never warns of too few points per centroid."""
    manifest = build(scored_files, tmp_path, ivf_nlist=512, ivf_nprobe=32, train_sample=2000)
    params, sizing = manifest["spec"]["params"], manifest["spec"]["sizing"]
    assert params["nlist"] == 512 and params["train"] == sizing["train_target"] == 39 * 512
    assert params["nbits"] == 8 and manifest["recall"]["queries"] == 100
    assert sizing["factory"] == f"IVF512,PQ{params['m']}x8"
    assert FAISS_WARNING not in capfd.readouterr().err


def test_nlist_is_lowered_to_what_a_small_corpus_trains(scored_files, tmp_path, capfd):
    """8,000 vectors: the table's 256 lists need 9,984 training vectors, the corpus supplies
    7,900 (100 held back for recall): 128 lists (39 x 128 = 4,992), PQ at 7 bits (39 x 128)."""
    manifest = build(scored_files[:1], tmp_path, ivf_nprobe=16)
    params, sizing = manifest["spec"]["params"], manifest["spec"]["sizing"]
    assert params["nlist"] == 128 and params["nbits"] == 7 and params["train"] == 7900
    assert sizing["nlist_rule"].endswith(": 256, lowered to the 7900 training vectors at 39 a list")
    assert FAISS_WARNING not in capfd.readouterr().err


def test_explicit_nlist_the_corpus_cannot_train_is_refused(scored_files, tmp_path):
    with pytest.raises(UserError, match=r"index.ivf_nlist=512 needs 19968 .*index.train_sample"):
        build(scored_files[:1], tmp_path, ivf_nlist=512)


def test_faiss_warns_when_the_rule_is_broken(capfd):
    """The control for the assertions above: fd 2 does carry FAISS's warning when k-means gets
    fewer than 39 points a centroid (here 20)."""
    import faiss

    x = clustered(640, 16, seed=1)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 32, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    assert FAISS_WARNING in capfd.readouterr().err


def test_train_index_fits_a_small_sample_without_warnings(capfd):
    x = clustered(3000, 16, seed=2)
    spec = choose_index(len(x), 16, IndexConfig(type="ivfpq"))  # the table's 256 lists
    train_index(x, spec)
    assert spec.params["nlist"] == 64 and spec.params["nbits"] == 6  # 3000 // 39 = 76 centroids
    assert FAISS_WARNING not in capfd.readouterr().err


def test_thousands_of_lists_train_in_two_levels_with_39_vectors_a_list(capfd):
    """From TWO_LEVEL_MIN_NLIST lists the coarse centroids come from two-level k-means: exactly
    nlist of them, every list used by the training vectors, an HNSW quantizer over them, the rule
    recorded, and no FAISS warning (each sub-cluster gets centroids in proportion to its size)."""
    import faiss

    nlist = TWO_LEVEL_MIN_NLIST
    x = clustered(39 * nlist, 8, seed=5, clusters=500, noise=0.3)
    spec = choose_index(len(x), 8, IndexConfig(type="ivfpq", ivf_nlist=nlist))
    index = faiss.deserialize_index(np.frombuffer(train_index(x, spec), dtype=np.uint8))
    quantizer = faiss.downcast_index(faiss_ivf(index).quantizer)
    assert isinstance(quantizer, faiss.IndexHNSWFlat) and quantizer.ntotal == nlist
    assert spec.sizing["coarse_training"].startswith("two-level k-means")
    _, lists = quantizer.search(x, 1)
    assert len(np.unique(lists)) > 0.9 * nlist  # the centroids sit where the vectors are
    assert FAISS_WARNING not in capfd.readouterr().err


def test_proportional_shares_sum_to_the_total_and_never_exceed_a_group():
    sizes = np.array([1, 2, 7, 40, 950])
    for total in (5, 17, 100, 1000):
        shares = proportional_shares(sizes, total)
        assert shares.sum() == total and (shares <= sizes).all()
        assert (np.abs(shares - sizes * total / sizes.sum()) < 1).all()


def test_chosen_nprobe_reaches_the_target_recall(tmp_path, capfd):
    """20,000 clustered vectors (d = 32): nprobe is the smallest power of two whose recall@10,
    exact re-scoring included, reaches index.target_recall on the held-back sample vectors; the
    corpus search every consumer opens uses it and finds as much on other queries."""
    x = clustered(20_000, 32, seed=3, clusters=200, noise=0.6)
    files = write_scored(tmp_path, x, per_file=5000)
    manifest = build(files, tmp_path, num_shards=2, refine_factor=4, recall_queries=200)
    params, sizing = manifest["spec"]["params"], manifest["spec"]["sizing"]
    tried = {int(p): r for p, r in sizing["nprobe_recall"].items()}
    assert list(tried) == [2**i for i in range(len(tried))] and params["nprobe"] == max(tried)
    assert tried[params["nprobe"]] >= 0.95 and all(
        r < 0.95 for p, r in tried.items() if p < max(tried)
    )
    assert params["nprobe"] > 1  # the target needed more than one list
    assert manifest["recall"]["queries"] == 200 and manifest["recall_at_10"] >= 0.95
    corpus = Corpus(f"{tmp_path}/index", refine_factor=4)
    (group,) = corpus.groups
    assert [faiss_ivf(index).nprobe for index in group.indexes] == [params["nprobe"]] * 2
    stored = x.astype(np.float16).astype(np.float32)  # what the exact re-scoring reads
    q = stored[np.random.default_rng(4).choice(len(x), 200, replace=False)]
    truth = np.argsort(-(q @ stored.T), axis=1)[:, :10]
    assert recall_at_k(corpus.search(q, 10)[1], truth) >= 0.93
    assert FAISS_WARNING not in capfd.readouterr().err


def test_nprobe_doubles_to_the_target_and_stops_where_recall_stops_rising():
    """A hand-made recall curve (found rows per nprobe): the smallest power of two reaching the
    target; short of it, the smallest reaching the best, the doubling stopped after two flat
    steps (the codes, not the lists, bound it)."""
    from align.search.index import choose_nprobe

    truth = np.tile(np.arange(10), (4, 1))
    found_per_nprobe = {1: 5, 2: 7, 4: 8, 8: 8, 16: 8, 32: 9, 64: 10}

    def search(nprobe):
        found = np.full((4, 10), -1)
        found[:, : found_per_nprobe[nprobe]] = np.arange(found_per_nprobe[nprobe])
        return found

    assert choose_nprobe(search, truth, 64, 0.7) == (2, {"1": 0.5, "2": 0.7})
    nprobe, tried = choose_nprobe(search, truth, 64, 0.95)
    assert nprobe == 4 and list(tried) == ["1", "2", "4", "8", "16"]
    assert choose_nprobe(search, truth, 2, 0.95) == (2, {"1": 0.5, "2": 0.7})  # up to nlist
