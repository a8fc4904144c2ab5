"""actors/retrieve.py on a dict batch over a real 20-vector FAISS index: the candidates are the
exact top-k of the retrieval query, scored against the ORIGINAL query, and every pair comes
from the u x v grid."""

import numpy as np
import pyarrow as pa

from actors.retrieve import CandidateRetriever
from actors.score import scored_to_arrow
from align.config import IndexConfig, ModelConfig
from align.data.contracts import SCORED, SCORER_COLUMN_PREFIX, conform
from align.method.pairing import pair_count
from align.search.build import write_index
from align.storage import io

N, D, K = 20, 8, 8


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _corpus(tmp_path, rng):
    emb = _unit(rng, N, D).astype(np.float16)
    batch = {
        "image_id": np.array([f"img{i:02d}" for i in range(N)], dtype=object),
        "embedding": emb,
        "status": np.array(["ok"] * N, dtype=object),
        "error": np.array([""] * N, dtype=object),
    }
    aesthetic = rng.normal(size=N).astype(np.float32)
    table = scored_to_arrow(batch).append_column("aesthetic", pa.array(aesthetic))
    io.write_parquet(
        conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX),
        f"{tmp_path}/scored/part-00000.parquet",
    )
    write_index(
        [f"{tmp_path}/scored/part-00000.parquet"], f"{tmp_path}/index",
        IndexConfig(type="flat", recall_queries=5), ModelConfig(name="tiny-clip"), remote=False,
    )  # fmt: skip
    return emb.astype(np.float32), aesthetic


def test_candidates_are_the_exact_top_k_scored_against_the_original_query(tmp_path):
    rng = np.random.default_rng(0)
    emb, aesthetic = _corpus(tmp_path, rng)
    original, rewritten = _unit(rng, 2, D), _unit(rng, 2, D)
    batch = {
        "query_id": np.array(["q1", "q2"], dtype=object),
        "query": np.array(["a red star", "a blue disc"], dtype=object),
        "query_embedding": original,
        "rewritten_embedding": rewritten,
    }
    retriever = CandidateRetriever(str(tmp_path), top_k=K, u=2, v=2, stride=2)
    out = retriever(batch).to_pylist()
    assert "query_embedding" not in out[0]
    for i, row in enumerate(out):
        rows = [int(c.removeprefix("img")) for c in row["candidate_ids"]]
        assert set(rows) == set(np.argsort(-(emb @ rewritten[i]))[:K])  # the rewritten query's
        np.testing.assert_allclose(row["candidate_semantic"], emb[rows] @ original[i], atol=1e-5)
        np.testing.assert_allclose(row["candidate_aesthetic"], aesthetic[rows], atol=1e-6)
        assert row["status"] == "ok" and len(row["chosen_id"]) == pair_count(2, 2)
        assert set(row["chosen_id"]) | set(row["rejected_id"]) <= set(row["candidate_ids"])


def test_a_query_with_too_few_candidates_is_skipped_with_the_reason(tmp_path):
    rng = np.random.default_rng(1)
    _corpus(tmp_path, rng)
    q = _unit(rng, 1, D)
    batch = {"query_id": np.array(["q"], dtype=object), "query_embedding": q,
             "rewritten_embedding": q}  # fmt: skip
    row = CandidateRetriever(str(tmp_path), top_k=3, u=4, v=4, stride=2)(batch).to_pylist()[0]
    assert row["status"] == "error" and row["error"].startswith("skipped")
    assert row["chosen_id"] == [] and len(row["candidate_ids"]) == 3
