"""align.search.corpus over a corpus split into several index shards (real FAISS, real Ray actors): the
search over every shard equals one flat index over everything, reference similarities equal
numpy, one quantizer search over IVF shards finds what searching each shard alone finds, and the
in-process and search-actor paths give the same answer."""

import numpy as np
import pyarrow as pa
import pytest

from actors.score import scored_to_arrow
from align.config import IndexConfig, ModelConfig
from align.data.contracts import SCORED, SCORER_COLUMN_PREFIX, conform
from align.search.build import write_index
from align.search.corpus import Corpus, MergedShards, ShardGroup, start_shard_actors
from align.storage import io

pytestmark = pytest.mark.integration
FILES, PER_FILE, D = 4, 300, 16


def _scored(root, rng):
    """Four scored files of clustered unit vectors (float16, as index_corpus writes them)."""
    centres = rng.normal(size=(12, D))
    x = centres[rng.integers(0, 12, FILES * PER_FILE)] + 0.3 * rng.normal(
        size=(FILES * PER_FILE, D)
    )
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    ids = np.array([f"img{i:05d}" for i in range(len(x))], dtype=object)
    aesthetic = rng.normal(size=len(x)).astype(np.float32)
    for f in range(FILES):
        part = slice(f * PER_FILE, (f + 1) * PER_FILE)
        batch = {"image_id": ids[part], "embedding": x[part],
                 "status": np.full(PER_FILE, "ok", dtype=object),
                 "error": np.full(PER_FILE, "", dtype=object)}  # fmt: skip
        table = scored_to_arrow(batch).append_column("aesthetic", pa.array(aesthetic[part]))
        io.write_parquet(conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX),
                         f"{root}/scored/part-{f:05d}.parquet")  # fmt: skip
    return io.list_files(f"{root}/scored", ".parquet"), x.astype(np.float32), ids, aesthetic


@pytest.fixture(scope="module")
def corpus(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    files, x, ids, aesthetic = _scored(root, np.random.default_rng(0))
    model = ModelConfig(name="tiny-clip")
    ivf = {"type": "ivfpq", "ivf_nlist": 8, "ivf_nprobe": 4}
    for name, extra in (("flat", {"type": "flat"}), ("ivfpq", ivf),
                        ("merged", {**ivf, "merge_ondisk": True})):  # fmt: skip
        cfg = IndexConfig(num_shards=3, recall_queries=100, **extra)
        write_index(files, f"{root}/{name}", cfg, model)
    return root, x, ids, aesthetic


def _queries(x, seed):
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), 6)] + 0.2 * rng.normal(size=(6, D))
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_shards_merged_equal_one_flat_index_and_numpy(corpus):
    import faiss

    root, x, ids, aesthetic = corpus
    whole = faiss.IndexFlatIP(D)
    whole.add(x)
    local = Corpus(f"{root}/flat")
    assert len(local.manifest["shards"]) == 3 and local.ntotal == len(x)
    q, reference = _queries(x, 1), _queries(x, 2)
    found = local.candidates(q, 10, reference=reference)
    scores, rows = whole.search(q, 10)
    np.testing.assert_array_equal(found.rows, rows)
    np.testing.assert_allclose(found.scores, scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        found.reference, np.einsum("qkd,qd->qk", x[found.rows], reference), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(found.ids, ids[found.rows])
    np.testing.assert_allclose(found.aesthetic, aesthetic[found.rows])
    np.testing.assert_allclose(local.vectors(found.rows[0]), x[found.rows[0]], atol=1e-3)
    info = local.row_info(np.array([len(x) - 1, 0, 450]))
    assert info["image_id"] == [ids[-1], ids[0], ids[450]]


def test_search_actors_holding_shares_of_the_shards_answer_as_the_shards_in_process(corpus):
    root, x, ids, _ = corpus
    for kind, actors in (("flat", 2), ("ivfpq", None)):  # None: one per node (this one)
        started = start_shard_actors(f"{root}/{kind}", 0.1, refine_factor=4, actors=actors)
        assert len(started.handles) == (actors or 1)
        remote, local = (
            Corpus(f"{root}/{kind}", shard_actors=started.names),
            Corpus(f"{root}/{kind}", refine_factor=4),  # as the actors re-score
        )
        q, reference = _queries(x, 3), _queries(x, 4)
        a = remote.candidates(q, 10, reference=reference)
        b = local.candidates(q, 10, reference=reference)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_allclose(a.reference, b.reference, rtol=1e-6)
        np.testing.assert_array_equal(a.ids, ids[a.rows])
        rows = np.array([len(x) - 1, 0, 450, 899])  # rows of every share, out of order
        np.testing.assert_allclose(remote.vectors(rows), x[rows], atol=1e-3)
        assert remote.row_info(rows)["image_id"] == list(ids[rows])
        assert [m["peak_rss_mb"] > 0 for m in remote.memory()] == [True] * (actors or 1)


def test_one_quantizer_search_over_ivf_shards_finds_what_each_shard_finds_alone(corpus):
    """The group assigns a query to lists once and scans each shard's part: the candidates it
    re-scores are the best by PQ score of what every shard finds searched by itself (its own
    quantizer), as one index over them all would find them; one quantizer is kept."""
    import faiss

    root, x, _, _ = corpus
    corpus = Corpus(f"{root}/ivfpq")
    group = corpus.groups[0]
    assert isinstance(group, ShardGroup) and len(group.indexes) == 3
    quantizers = {int(faiss.extract_index_ivf(i).quantizer.this) for i in group.indexes}
    assert len(quantizers) == 1
    shards, spec = corpus.manifest["shards"], corpus.manifest["spec"]
    alone = [ShardGroup(f"{root}/ivfpq", [entry], spec) for entry in shards]
    q, depth = _queries(x, 9), 40
    scores, rows = group._approximate(q, depth)
    parts = [s._approximate(q, depth) for s in alone]
    every = np.concatenate([p[0] for p in parts], axis=1)
    every_rows = np.concatenate([p[1] + s.offset for p, s in zip(parts, alone, strict=True)], 1)
    best = np.take_along_axis(every_rows, np.argsort(-every, axis=1)[:, :depth], 1)
    assert rows.shape == (len(q), depth)
    assert [set(a) for a in rows] == [set(b) for b in best]


def assert_exact_scores(found, x, q, reference):
    """The returned scores and reference similarities are exact cosines of the stored vectors,
    not PQ approximations."""
    np.testing.assert_allclose(
        found.scores, np.einsum("qkd,qd->qk", x[found.rows], q), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        found.reference, np.einsum("qkd,qd->qk", x[found.rows], reference), rtol=1e-5, atol=1e-6
    )


def test_ivfpq_shards_rescore_exactly_and_report_streamed_recall(corpus):
    root, x, _, _ = corpus
    ivf = Corpus(f"{root}/ivfpq")
    manifest = ivf.manifest
    assert manifest["spec"]["type"] == "ivfpq" and manifest["spec"]["params"]["nlist"] == 8
    assert manifest["recall"]["queries"] == 100 and manifest["recall_at_10"] >= 0.9
    q, reference = _queries(x, 5), _queries(x, 6)
    found = ivf.candidates(q, 10, reference=reference)
    assert_exact_scores(found, x, q, reference)
    assert (np.diff(found.scores, axis=1) <= 1e-6).all()
    id_map = io.read_parquet(f"{root}/ivfpq/id_map.parquet")
    assert id_map["row"].to_pylist() == list(range(len(x)))


def test_ondisk_merge_searches_every_shard_in_one_index(corpus):
    """index.merge_ondisk: one FAISS index over every shard's lists (OnDiskInvertedLists), global
    rows, the same exact scores and reference similarities; a rebuild without it removes it."""
    root, x, ids, aesthetic = corpus
    merged = Corpus(f"{root}/merged")
    assert isinstance(merged.groups[0], MergedShards) and len(merged.groups) == 1
    assert merged.manifest["merged"]["count"] == len(x) and merged.manifest["recall_at_10"] >= 0.9
    params = merged.manifest["spec"]["params"]
    code_bytes = -(-params["m"] * params["nbits"] // 8)
    assert (root / "merged" / "merged.ivfdata").stat().st_size >= len(x) * (code_bytes + 8)
    q, reference = _queries(x, 7), _queries(x, 8)
    found = merged.candidates(q, 10, reference=reference)
    assert_exact_scores(found, x, q, reference)
    assert (found.ids == ids[found.rows]).all()
    np.testing.assert_allclose(found.aesthetic, aesthetic[found.rows])
    np.testing.assert_allclose(merged.vectors(found.rows[0]), x[found.rows[0]], atol=1e-3)
    # The shards searched one by one find (nearly) the same top-10 from the same lists.
    shards = Corpus(f"{root}/merged", merged=False).candidates(q, 10)
    overlap = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(found.rows, shards.rows, strict=True)]
    )
    assert overlap >= 0.9
    files, _, _, _ = _scored(root / "rebuilt", np.random.default_rng(0))
    cfg = IndexConfig(type="ivfpq", num_shards=3, ivf_nlist=8, ivf_nprobe=4, recall_queries=20)
    write_index(files, f"{root}/merged", cfg, ModelConfig(name="tiny-clip"))
    assert not (root / "merged" / "merged.faiss").exists()
    assert not (root / "merged" / "merged.ivfdata").exists()
    assert not isinstance(Corpus(f"{root}/merged").groups[0], MergedShards)
