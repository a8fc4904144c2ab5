"""Query files: read (Parquet, JSONL or text), checked (empty and duplicate queries become error
rows), and the ground truth of what each query asks for on the synthetic world.

build_preferences and evaluate read their queries through here, so both account for a bad line
the same way.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align import io
from align.contracts import QUERIES, ContractError, require_columns


def read_queries(path: str, split: str | None) -> tuple[pa.Table, list[dict]]:
    """Read queries from Parquet, JSONL or text; return (rows, error rows) before any checks.

    Rows are (query_id, query). Lines that do not decode become error rows.
    """
    errors: list[dict] = []
    if path.endswith(".parquet") or io.exists(path) and not io.is_file(path):
        table = io.read_parquet(path)
        require_columns(QUERIES, table.column_names, "build_preferences.read", needed=["query"])
        if not pa.types.is_string(table.schema.field("query").type):
            raise ContractError(
                f"{path}: column 'query' holds {table.schema.field('query').type}, not strings"
            )
        if split and "split" in table.column_names:
            table = table.filter(pc.equal(table["split"], split))
        ids = table["query_id"] if "query_id" in table.column_names else None
        queries = table["query"].to_pylist()
        ids = ids.to_pylist() if ids is not None else [f"q{i:07d}" for i in range(len(queries))]
        return pa.table({"query_id": ids, "query": queries}), errors
    raw = io.read_bytes(path)
    ids, queries = [], []
    for n, line in enumerate(raw.splitlines(), start=1):
        row_id = f"line{n:07d}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append({"row_id": row_id, "stage": "read", "error": f"not UTF-8: {e.reason}"})
            continue
        if path.endswith((".jsonl", ".json")):
            try:
                obj = json.loads(text)
                query, row_id = obj["query"], str(obj.get("query_id", row_id))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                errors.append({"row_id": row_id, "stage": "read", "error": f"bad JSON line: {e}"})
                continue
            if not isinstance(query, str):
                errors.append(
                    {
                        "row_id": row_id,
                        "stage": "read",
                        "error": f"'query' is {type(query).__name__}, not a string",
                    }
                )
                continue
        else:
            query = text
        ids.append(row_id)
        queries.append(query)
    return pa.table({"query_id": ids, "query": queries}), errors


def check_queries(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Drop empty and duplicate queries (error rows with the reason); keep the rest in order."""
    keep, errors, seen = [], [], {}
    for i, (qid, query) in enumerate(
        zip(table["query_id"].to_pylist(), table["query"].to_pylist(), strict=True)
    ):
        text = " ".join(str(query or "").split())
        if not text:
            errors.append({"row_id": qid, "stage": "check", "error": "empty or whitespace query"})
            continue
        key = text.casefold()
        if key in seen:
            errors.append({"row_id": qid, "stage": "check", "error": f"duplicate of {seen[key]}"})
            continue
        seen[key] = qid
        keep.append(i)
    table = table.take(keep)
    cleaned = [" ".join(q.split()) for q in table["query"].to_pylist()]
    return table.set_column(1, "query", pa.array(cleaned, pa.string())), errors


def query_facts(path: str, texts: list[str]) -> dict[str, np.ndarray]:
    """Ground truth of what each query text asks for (colour, shape, background), from the fact
    columns of the queries file at `path` (the world's queries.parquet)."""
    table = io.read_parquet(path)
    require_columns(
        QUERIES, table.column_names, "evaluate.ground_truth",
        needed=["query", "colour", "shape", "background"],
    )  # fmt: skip
    rows = pc.index_in(pa.array(texts, pa.string()), value_set=table["query"].combine_chunks())
    rows = rows.fill_null(-1).to_numpy(zero_copy_only=False)
    if (rows < 0).any():
        raise ContractError(f"query {texts[int(np.argmax(rows < 0))]!r} has no ground truth")
    return {
        c: table[c].to_numpy(zero_copy_only=False)[rows] for c in ("colour", "shape", "background")
    }
