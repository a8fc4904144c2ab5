"""build_preferences end to end: real Ray Data, real open_clip, real FAISS, a real HTTP server
speaking the OpenAI chat-completions wire format for the http backend."""

import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from align.config import load_config
from align.data import world
from align.data.contracts import PAIRS, REWRITES
from align.method.pairing import candidates_needed, pair_count
from align.models.clip import ModelLoadError, build_clip
from pipelines.build_preferences import build_preferences
from tests.helpers import JsonHandler
from tests.helpers import indexed_world as make_indexed_world

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def indexed_world(ray_session, tmp_path_factory):
    """A small world indexed with a fixed micro-clip checkpoint (the reference model)."""
    root = tmp_path_factory.mktemp("bp")
    return root, make_indexed_world(root, 800)


def run(indexed_world, *extra):
    root, overrides = indexed_world
    config = load_config(REPO / "configs/demo.yaml", [*overrides, *extra])
    manifest = build_preferences(config)
    out = root / "build_preferences"
    read = lambda name: pq.read_table(out / name) if any((out / name).glob("*.parquet")) else None  # noqa: E731
    return config, manifest, read


def test_keyword_pairs_carry_exact_reference_similarities(indexed_world):
    config, manifest, read = run(indexed_world)
    queries = pq.read_table(indexed_world[0] / "world" / "queries.parquet").to_pylist()
    train = [q for q in queries if q["split"] == "train"]
    pairs, rewrites = read("pairs"), read("rewrites")
    assert pairs.schema == PAIRS.schema and rewrites.schema == REWRITES.schema
    assert manifest["counts"] == {"rows_in": len(train), "rows_out": len(train), "rows_error": 0}
    grid = config.build_preferences.grid
    assert pairs.num_rows == manifest["pairs"] == len(train) * pair_count(grid.u, grid.v)
    assert rewrites.num_rows == len(train)
    assert all("well-composed" in r for r in rewrites["rewritten"].to_pylist())

    p = pairs.to_pylist()
    assert all(tuple(x["chosen_cell"]) != tuple(x["rejected_cell"]) for x in p)
    assert all(
        x["chosen_cell"][0] <= x["rejected_cell"][0]
        and x["chosen_cell"][1] <= x["rejected_cell"][1]
        for x in p
    )
    keys = {(x["query_id"], x["chosen_id"], x["rejected_id"]) for x in p}
    assert not any((q, r, c) in keys for q, c, r in keys)

    # No pair comes from the evaluation gallery or from a family the alignment may not see: its
    # queries are training queries, its images corpus images of trained families.
    assert {x["query_id"] for x in p} <= {q["query_id"] for q in train}
    world_dir = indexed_world[0] / "world"
    corpus = pq.read_table(world_dir / "ground_truth.parquet").to_pylist()
    family = {r["image_id"]: (r["colour"], r["shape"]) for r in corpus}
    gallery = set(pq.read_table(world_dir / "eval_images")["image_id"].to_pylist())
    unseen = world.unseen_families(config.world)
    assert gallery and unseen
    for image in {x["chosen_id"] for x in p} | {x["rejected_id"] for x in p}:
        assert image in family and image not in gallery and family[image] not in unseen

    # The stored reference similarity is the reference model's cosine(ORIGINAL query, image).
    clip = build_clip(config.model)
    scored = pq.read_table(indexed_world[0] / "index_corpus" / "scored").to_pylist()
    emb = {r["image_id"]: np.array(r["embedding"], dtype=np.float32) for r in scored}
    sample = p[:: max(1, len(p) // 25)]
    with torch.no_grad():
        text = clip.model.encode_text(clip.tokenizer([x["query"] for x in sample]))
        text = torch.nn.functional.normalize(text, dim=-1).numpy()
    for t, x in zip(text, sample, strict=True):
        assert x["chosen_ref_sim"] == pytest.approx(float(t @ emb[x["chosen_id"]]), abs=2e-3)
        assert x["rejected_ref_sim"] == pytest.approx(float(t @ emb[x["rejected_id"]]), abs=2e-3)

    # A re-run replaces its outputs rather than appending; searched through one Ray actor per
    # index shard (as a corpus over the in-process bound is), it finds the same pairs.
    _, _, read_again = run(indexed_world, "index_corpus.index.in_process_max_vectors=0")
    assert read_again("pairs").num_rows == pairs.num_rows
    columns = ("query_id", "chosen_id", "rejected_id")
    keys_again = {tuple(r[c] for c in columns) for r in read_again("pairs").to_pylist()}
    assert keys_again == {tuple(r[c] for c in columns) for r in p}
    np.testing.assert_allclose(
        sorted(read_again("pairs")["chosen_ref_sim"].to_pylist()),
        sorted(pairs["chosen_ref_sim"].to_pylist()), rtol=1e-6,
    )  # fmt: skip


def test_retrieve_with_chooses_the_query_that_finds_the_candidates(indexed_world):
    """The retrieve stage called on a dict batch: its candidates are the exact top K of the
    original, the rewritten, or the renormalised sum of both embeddings, computed here."""
    from actors.retrieve import CandidateRetriever

    root, _ = indexed_world
    scored = pq.read_table(root / "index_corpus" / "scored")
    ids = np.array(scored["image_id"].to_pylist(), dtype=object)
    emb = np.stack(scored["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 3, emb.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    batch = {"query_id": np.array(["a", "b", "c"], dtype=object),
             "query_embedding": q[0], "rewritten_embedding": q[1]}  # fmt: skip
    both = q[0] + q[1]
    both /= np.linalg.norm(both, axis=1, keepdims=True)
    for retrieve_with, query in (("original", q[0]), ("rewritten", q[1]),
                                 ("original+rewritten", both)):  # fmt: skip
        stage = CandidateRetriever(str(root / "index_corpus"), 40, 4, 4, 2, retrieve_with)
        got = stage(dict(batch))["candidate_ids"].to_pylist()
        expected = np.argsort(-(query @ emb.T), axis=1)[:, :40]
        for row, top in zip(got, expected, strict=True):
            assert set(row) == set(ids[top]), retrieve_with
    with pytest.raises(ValueError, match="retrieve_with"):
        CandidateRetriever(str(root / "index_corpus"), 40, 4, 4, 2, "neither")


def test_a_corpus_smaller_than_the_grid_skips_each_query_with_a_reason(indexed_world):
    # The config asks for enough candidates (checked when it loads); the 800-image index has
    # fewer than a 30 x 30 grid reads.
    grid_30 = ("build_preferences.grid.u=30", "build_preferences.grid.v=30")
    config, manifest, read = run(indexed_world, *grid_30, "build_preferences.grid.stride=1",
                                 "build_preferences.top_k=900")  # fmt: skip
    grid = config.build_preferences.grid
    needs = f"needs {candidates_needed(grid.u, grid.v, grid.stride)}"
    errors = read("errors").to_pylist()
    assert manifest["counts"]["rows_out"] == 0 and len(errors) == manifest["counts"]["rows_in"]
    assert all("skipped" in e["error"] and needs in e["error"] for e in errors)
    assert read("pairs") is None


def test_missing_index_fails_fast(indexed_world, tmp_path):
    with pytest.raises(FileNotFoundError, match="run index_corpus first"):
        run(indexed_world, f"build_preferences.index_corpus_dir={tmp_path}")


def test_mismatched_index_fails_fast_naming_both_models(indexed_world):
    with pytest.raises(ModelLoadError, match=r"built with model 'micro-clip'.*'tiny-clip'"):
        run(indexed_world, "model.name=tiny-clip", "model.pretrained=null")


class ChatCompletions(JsonHandler):
    """An OpenAI-compatible /v1/chat/completions: rewrites by rule, fails on request."""

    seen_auth: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.read_json()
        ChatCompletions.seen_auth.append(self.headers.get("Authorization"))
        query = body["messages"][-1]["content"].rsplit("Query: ", 1)[-1]
        if "fail" in query:  # a server error: retried, then the row falls back
            self.reply(503, {"error": {"message": "overloaded", "type": "server_error"}})
        elif "reject" in query:  # a client error: no retry, the row falls back
            self.reply(400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
        else:
            content = {"empty": "", "long": "x" * 2000}.get(
                query.split()[-1], f"{query}, golden hour"
            )
            self.reply(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                        }
                    ],
                },
            )


def test_http_backend_against_a_local_openai_compatible_server(
    indexed_world, monkeypatch, tmp_path
):
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TEST_LLM_KEY", "sk-test")
    queries = tmp_path / "queries.txt"
    long_query = "a red star " + "with many more words " * 8
    queries.write_text(
        "a red star\na blue ring\nplease fail\nmake it empty\nmake it long\na red star\n\n"
        + "please reject\n"
        + long_query
        + "\n"
    )
    try:
        _, manifest, read = run(
            indexed_world,
            f"build_preferences.queries={queries}",
            "build_preferences.rewrite.backend=http",
            "build_preferences.rewrite.variant=detail",
            f"build_preferences.rewrite.http.url=http://127.0.0.1:{server.server_port}/v1/chat/completions",
            "build_preferences.rewrite.http.api_key_env=TEST_LLM_KEY",
            "build_preferences.rewrite.http.max_retries=1",
        )
    finally:
        server.shutdown()
    rewrites = {r["query"]: r for r in read("rewrites").to_pylist()}
    assert rewrites["a red star"]["rewritten"] == "a red star, golden hour"
    assert rewrites["a red star"]["fallback"] is None
    assert rewrites["please fail"]["rewritten"] == "please fail"
    assert "HTTP 503" in rewrites["please fail"]["fallback"]
    assert "after 2 attempts" in rewrites["please fail"]["fallback"]
    assert rewrites["please reject"]["rewritten"] == "please reject"
    assert "bad request" in rewrites["please reject"]["fallback"]
    assert rewrites["make it empty"]["fallback"] == "empty completion"
    assert "over 400 characters" in rewrites["make it long"]["fallback"]
    assert manifest["rewrite"]["fallbacks"] == 4
    assert set(ChatCompletions.seen_auth) == {"Bearer sk-test"}
    errors = {e["error"] for e in read("errors").to_pylist()}
    assert errors == {"duplicate of line0000001", "empty or whitespace query"}
    assert manifest["counts"] == {"rows_in": 9, "rows_out": 7, "rows_error": 2}
    # Over the text tower's context (micro-clip: 16 tokens): truncated as CLIP does, recorded.
    assert rewrites[long_query.strip()]["truncated"] and not rewrites["a red star"]["truncated"]
    assert manifest["rewrite"]["truncated"] == 1
