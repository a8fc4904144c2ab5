"""Duplicate checks as Ray Data stages, where no process holds the dataset: build_preferences'
query files (the same rows and error rows as the in-process reader) and index_corpus' exact
duplicates (equal sha256), found across files and blocks."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.data import queries as Q
from align.runtime import stages
from align.search.build import exact_duplicates

pytestmark = pytest.mark.integration


def stage_rows(path, split=None):
    """(kept rows, error rows) from the Ray Data stage, in file order."""
    files = Q.query_files(str(path))
    checked = Q.check_query_dataset(Q.query_dataset(files, split), files).materialize()
    batches = checked.iter_batches(batch_format="pyarrow", batch_size=None)
    table = pa.concat_tables(list(batches)).sort_by("order")
    bad = table.filter(pa.compute.not_equal(table["error"], ""))
    good = table.filter(pa.compute.equal(table["error"], "")).select(["query_id", "query"])
    return good, Q.error_rows(bad)


def in_process_rows(path, split=None):
    raw, read_errors = Q.read_queries(str(path), split)
    kept, check_errors = Q.check_queries(raw)
    return kept, read_errors + check_errors


def test_parquet_folder_duplicates_across_files_and_blocks(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(Q, "ROWS_PER_BATCH", 3)  # several blocks per file
    monkeypatch.setattr(stages, "KEY_BLOCK_BYTES", 500)  # a hash repartition into several blocks
    folder = tmp_path / "queries"
    folder.mkdir()
    # No query_id column: ids are the row's position over every file (before the split filter).
    pq.write_table(pa.table({"query": ["a cat", "a dog", "  ", "A  CAT", "a fox"],
                             "split": ["train"] * 5}), folder / "part-0.parquet")  # fmt: skip
    pq.write_table(pa.table({"query": ["a dog ", "an owl", None, "held out", "an owl"],
                             "split": ["train"] * 3 + ["heldout", "train"]}),
                   folder / "part-1.parquet")  # fmt: skip
    good, errors = stage_rows(folder, split="train")
    assert good.to_pylist() == [
        {"query_id": "q0000000", "query": "a cat"},
        {"query_id": "q0000001", "query": "a dog"},
        {"query_id": "q0000004", "query": "a fox"},
        {"query_id": "q0000006", "query": "an owl"},
    ]
    assert errors == [
        {"row_id": "q0000002", "stage": "check", "error": "empty or whitespace query"},
        {"row_id": "q0000003", "stage": "check", "error": "duplicate of q0000000"},
        {"row_id": "q0000005", "stage": "check", "error": "duplicate of q0000001"},
        {"row_id": "q0000007", "stage": "check", "error": "empty or whitespace query"},
        {"row_id": "q0000009", "stage": "check", "error": "duplicate of q0000006"},
    ]
    kept, in_process_errors = in_process_rows(folder, split="train")
    assert kept.to_pylist() == good.to_pylist()
    assert sorted(in_process_errors, key=str) == sorted(errors, key=str)


def test_jsonl_read_errors_stay_rows(ray_session, tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [json.dumps({"query_id": "a", "query": "a cat"}), "{oops", json.dumps({"query": 7}),
             json.dumps({"query_id": "b", "query": "A cat"})]  # fmt: skip
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\n")
    good, errors = stage_rows(path)
    assert good.to_pylist() == [{"query_id": "a", "query": "a cat"}]
    assert [(e["row_id"], e["stage"]) for e in errors] == [
        ("line0000002", "read"), ("line0000003", "read"), ("b", "check"), ("line0000005", "read"),
    ]  # fmt: skip
    assert errors[2]["error"] == "duplicate of a" and errors[3]["error"].startswith("not UTF-8")
    kept, in_process_errors = in_process_rows(path)
    assert kept.to_pylist() == good.to_pylist()
    assert sorted(in_process_errors, key=str) == sorted(errors, key=str)


def test_exact_duplicates_across_files_and_partitions(ray_session, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "KEY_BLOCK_BYTES", 2000)  # several hash partitions
    rng = np.random.default_rng(0)
    rows = []  # (file, image_id, sha256, status) in file order
    for f in range(3):
        n = 40
        ids = [f"img{f}-{i:03d}" for i in range(n)]
        sha = [f"{h:064x}" for h in rng.integers(0, 30, n)]  # 30 distinct hashes: many copies
        status = ["ok" if rng.random() > 0.1 else "error" for _ in range(n)]
        if f == 1:
            sha[5] = None  # an ok row without a hash is no one's copy
        pq.write_table(pa.table({"image_id": ids, "sha256": sha, "status": status}),
                       tmp_path / f"part-{f}.parquet")  # fmt: skip
        rows += list(zip(ids, sha, status, strict=True))
    # Written before hashes were: no sha256 column, skipped.
    pq.write_table(pa.table({"image_id": ["old"], "status": ["ok"]}), tmp_path / "part-3.parquet")
    files = [str(tmp_path / f"part-{f}.parquet") for f in range(4)]
    first, expected = {}, set()
    for image_id, sha, status in rows:
        if status != "ok" or sha is None:
            continue
        if sha in first:
            expected.add((image_id, first[sha], sha))
        else:
            first[sha] = image_id
    found = exact_duplicates(files)
    assert found.column_names == ["image_id", "duplicate_of", "sha256"]
    got = set(zip(*(found[c].to_pylist() for c in found.column_names), strict=True))
    assert got == expected and len(expected) > 40
