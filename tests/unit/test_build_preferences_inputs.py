"""Query reading, checking and completion fallback of build_preferences (no Ray needed)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.rewrite import checked_completion
from align.data.contracts import ContractError
from align.data.queries import check_queries, read_queries


def test_text_file_one_query_per_line_with_an_undecodable_line(tmp_path):
    path = tmp_path / "q.txt"
    path.write_bytes(b"a red star\n\xff\xfe broken\n  \na blue ring\n")
    table, errors = read_queries(str(path), split=None)
    assert table["query"].to_pylist() == ["a red star", "  ", "a blue ring"]
    assert errors == [
        {"row_id": "line0000002", "stage": "read", "error": "not UTF-8: invalid start byte"}
    ]


def test_jsonl_with_a_bad_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        json.dumps({"query_id": "a", "query": "a cat"}) + "\n{oops\n" + json.dumps({"q": 1}) + "\n"
    )
    table, errors = read_queries(str(path), split=None)
    assert table.to_pylist() == [{"query_id": "a", "query": "a cat"}]
    assert [e["row_id"] for e in errors] == ["line0000002", "line0000003"]
    assert all("bad JSON line" in e["error"] for e in errors)


def test_jsonl_queries_that_are_not_strings_are_error_rows(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [{"query": "a cat"}, {"query": 7}, {"query": ["a", "list"]}, {"query": None}, [1, 2]]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    table, errors = read_queries(str(path), split=None)
    assert table["query"].to_pylist() == ["a cat"]
    assert [e["error"] for e in errors[:3]] == [
        "'query' is int, not a string",
        "'query' is list, not a string",
        "'query' is NoneType, not a string",
    ]
    assert errors[3]["row_id"] == "line0000005" and "bad JSON line" in errors[3]["error"]
    pq.write_table(pa.table({"query": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(ContractError, match="ints.parquet: column 'query' holds int64"):
        read_queries(str(tmp_path / "ints.parquet"), split=None)


def test_parquet_split_filter_and_missing_column(tmp_path):
    pq.write_table(
        pa.table({"query_id": ["1", "2"], "query": ["x", "y"], "split": ["train", "heldout"]}),
        tmp_path / "q.parquet",
    )
    table, _ = read_queries(str(tmp_path / "q.parquet"), split="train")
    assert table["query_id"].to_pylist() == ["1"]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(ContractError, match="'query'.*make_world"):
        read_queries(str(tmp_path / "bad.parquet"), split=None)


def test_empty_and_duplicate_queries_are_dropped_and_named():
    table = pa.table(
        {"query_id": ["a", "b", "c", "d", "e"], "query": ["a cat", "   ", "A  Cat", None, "a dog "]}
    )
    kept, errors = check_queries(table)
    assert kept.to_pylist() == [
        {"query_id": "a", "query": "a cat"},
        {"query_id": "e", "query": "a dog"},
    ]
    assert errors == [
        {"row_id": "b", "stage": "check", "error": "empty or whitespace query"},
        {"row_id": "c", "stage": "check", "error": "duplicate of a"},
        {"row_id": "d", "stage": "check", "error": "empty or whitespace query"},
    ]


@pytest.mark.parametrize(
    ("completion", "error", "expected", "reason"),
    [
        ("a cat, golden hour", None, "a cat, golden hour", None),
        ('"a cat, sharp"', None, "a cat, sharp", None),
        ("", None, "a cat", "empty completion"),
        ("x" * 50, None, "a cat", "completion over 20 characters (50)"),
        ("ignored", "HTTP 500\ntrace", "a cat", "llm error: HTTP 500"),
    ],
)
def test_unusable_completions_fall_back_to_the_query(completion, error, expected, reason):
    assert checked_completion("a cat", completion, error, max_chars=20) == (expected, reason)


def test_an_index_built_before_its_checkpoint_was_rewritten_is_refused(tmp_path):
    import os

    import torch

    from align.config import ModelConfig, load_config
    from align.errors import UserError
    from align.models.clip import ModelLoadError, build_clip, weights_fingerprint
    from align.search.stored import check_index

    ckpt = tmp_path / "model.pt"
    torch.save(build_clip(ModelConfig(name="micro-clip")).model.state_dict(), ckpt)
    config = load_config(None, ["model.name=micro-clip", f"model.pretrained={ckpt}"])
    (tmp_path / "index").mkdir()
    manifest = {
        "model": config.model.model_dump(),
        "dim": 32,
        "weights": weights_fingerprint(config.model),
    }
    (tmp_path / "index" / "_index.json").write_text(json.dumps(manifest))
    check_index(config.model, str(tmp_path))  # the weights it was built with: fine
    # An index without per-shard rows and embeddings files: refused, naming the rebuild.
    old = {**manifest, "shards": [{"file": "shard-000.faiss", "count": 5, "offset": 0}]}
    (tmp_path / "index" / "_index.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"index_corpus.steps=\[index\]"):
        check_index(config.model, str(tmp_path))
    (tmp_path / "index" / "_index.json").write_text(json.dumps(manifest))
    os.utime(ckpt, ns=(1, 1))  # a retrained model.pt at the same path
    with pytest.raises(ModelLoadError, match="was rewritten after the index"):
        check_index(config.model, str(tmp_path))


def test_a_model_of_the_same_image_tower_searches_the_index_another_does_not(tmp_path):
    """An index built with the base: a checkpoint whose text tower alone changed (a fine-tune
    with finetune.lock_image) passes, one whose image tower changed is refused, naming both."""
    import torch

    from align.config import ModelConfig
    from align.models.clip import (
        ModelLoadError,
        build_clip,
        export_checkpoint,
        image_tower_digest,
        weights_fingerprint,
    )
    from align.search.stored import check_index

    base = ModelConfig(name="micro-clip", pretrained=str(tmp_path / "base.pt"))
    model = build_clip(ModelConfig(name="micro-clip")).model
    export_checkpoint(model, base.pretrained)
    (tmp_path / "index").mkdir()
    manifest = {
        "model": base.model_dump(),
        "weights": weights_fingerprint(base),
        "image_tower": image_tower_digest(base),
        "dim": 32,
    }
    (tmp_path / "index" / "_index.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        model.text_projection.mul_(-1.0)
    text_only = base.model_copy(update={"pretrained": str(tmp_path / "text.pt")})
    export_checkpoint(model, text_only.pretrained)
    check_index(text_only, str(tmp_path))
    with torch.no_grad():
        model.visual.proj.mul_(-1.0)
    both = base.model_copy(update={"pretrained": str(tmp_path / "both.pt")})
    export_checkpoint(model, both.pretrained)
    with pytest.raises(ModelLoadError, match="whose image tower is not the one") as e:
        check_index(both, str(tmp_path))
    assert f"pretrained='{base.pretrained}'" in str(e.value) and both.pretrained in str(e.value)
    # An index that records no image tower: only its own model searches it.
    (tmp_path / "index" / "_index.json").write_text(json.dumps({**manifest, "image_tower": None}))
    with pytest.raises(ModelLoadError, match="image tower"):
        check_index(text_only, str(tmp_path))
