"""Query reading, checking and completion fallback of build_preferences (no Ray needed)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.rewrite import checked_completion
from align.contracts import ContractError
from pipelines.build_preferences import check_queries, read_queries


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
