"""Query files: read (Parquet, JSONL or text), checked (empty and duplicate queries become error
rows), and the ground truth of what each query asks for on the synthetic world.

One set of functions, two ways to run them:
- `query_dataset` + `check_query_dataset`: a Ray Data stage (build_preferences). Each file is read
  by a worker, a Parquet file row group by row group; duplicates are found after a hash
  repartition on the normalised text, so every copy of a query meets in one block. The driver
  reads Parquet footers and nothing else, whatever the number of queries.
- `read_queries` + `check_queries`: the same in this process, for a small query file (evaluate's
  held-out queries, tests).
Both account for a bad line the same way: a row with `stage` and `error` set, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from align.data.contracts import ERRORS, QUERIES, ContractError, conform, require_columns
from align.runtime.stages import first_of_each, gather_by_key
from align.storage import io

# A query row before and after the checks: `order` is its position over all the files (the first
# of duplicates keeps it), `error` is empty for a good row.
QUERY_ROWS = pa.schema(
    [
        ("query_id", pa.string()),
        ("query", pa.string()),
        ("order", pa.int64()),
        ("stage", pa.string()),
        ("error", pa.string()),
    ]
)
ROWS_PER_BATCH = 8192


def is_parquet(path: str) -> bool:
    return path.endswith(".parquet") or io.exists(path) and not io.is_file(path)


def has_column(path: str, column: str) -> bool:
    """Does the query file at `path` have `column` (Parquet: its first file's footer; text and
    JSONL files have only the query)?"""
    if not is_parquet(path):
        return False
    files = io.parquet_files(path)
    if not files:
        return False
    fs, inside = io.filesystem(files[0])
    with fs.open_input_file(inside) as fh:
        return column in pq.ParquetFile(fh).schema_arrow.names


def query_files(path: str) -> list[dict]:
    """The files to read, each with the position of its first row over all of them and its size
    in bytes. Parquet: columns and types checked from the footers (no data read); text and
    JSONL: one file."""

    def size(file: str) -> int:
        fs, inside = io.filesystem(file)
        return fs.get_file_info(inside).size

    if not is_parquet(path):
        return [{"path": path, "first": 0, "bytes": size(path)}]
    out, first = [], 0
    for file in io.parquet_files(path):
        fs, inside = io.filesystem(file)
        with fs.open_input_file(inside) as fh:
            meta = pq.ParquetFile(fh).metadata
        schema = meta.schema.to_arrow_schema()
        require_columns(QUERIES, schema.names, "build_preferences.read", needed=["query"])
        if not pa.types.is_string(schema.field("query").type):
            raise ContractError(
                f"{file}: column 'query' holds {schema.field('query').type}, not strings"
            )
        out.append({"path": file, "first": first, "bytes": size(file)})
        first += meta.num_rows
    return out


def _rows(ids, queries, order, stage=None, error=None) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "query_id": pa.array(ids, pa.string()),
            "query": pa.array(queries, pa.string()),
            "order": pa.array(order, pa.int64()),
            "stage": pa.array(stage if stage is not None else [""] * n, pa.string()),
            "error": pa.array(error if error is not None else [""] * n, pa.string()),
        },
        schema=QUERY_ROWS,
    )


def read_query_file(path: str, first: int, split: str | None) -> Iterator[pa.Table]:
    """One query file as QUERY_ROWS tables of at most ROWS_PER_BATCH rows. Parquet: ids from
    `query_id`, else `q` + the row's position over all files; text and JSONL: `line` + the line
    number, and a line that does not decode is an error row."""

    if not is_parquet(path):
        lines = io.read_bytes(path).splitlines()
        for start in range(0, len(lines), ROWS_PER_BATCH):
            yield _parse_lines(lines[start : start + ROWS_PER_BATCH], start + 1, path)
        return
    fs, inside = io.filesystem(path)
    with fs.open_input_file(inside) as fh:
        file = pq.ParquetFile(fh)
        names = file.schema_arrow.names
        columns = [c for c in ("query_id", "query", "split") if c in names]
        at = first
        for batch in file.iter_batches(batch_size=ROWS_PER_BATCH, columns=columns):
            n = batch.num_rows
            order = np.arange(at, at + n)
            at += n
            if "query_id" in names:
                ids = batch.column("query_id")
            else:
                ids = pa.array(np.char.mod("q%07d", order).astype(object), pa.string())
            table = _rows(ids, batch.column("query"), order)
            if split and "split" in names:
                table = table.filter(pc.equal(batch.column("split"), split))
            yield table


def _parse_lines(lines: list[bytes], first_line: int, path: str) -> pa.Table:
    """Text or JSONL lines -> QUERY_ROWS (undecodable lines as error rows)."""
    jsonl = path.endswith((".jsonl", ".json"))
    ids, queries, errors = [], [], []
    for n, line in enumerate(lines, start=first_line):
        row_id, query, error = f"line{n:07d}", None, ""
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            text, error = None, f"not UTF-8: {e.reason}"
        if text is not None and jsonl:
            try:
                obj = json.loads(text)
                query, row_id = obj["query"], str(obj.get("query_id", row_id))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                error = f"bad JSON line: {e}"
            else:
                if not isinstance(query, str):
                    query, error = None, f"'query' is {type(query).__name__}, not a string"
        elif text is not None:
            query = text
        ids.append(row_id)
        queries.append(query)
        errors.append(error)
    order = np.arange(first_line - 1, first_line - 1 + len(lines))
    stage = ["read" if e else "" for e in errors]
    return _rows(ids, queries, order, stage, errors)


def read_query_batches(batch: dict, split: str | None) -> Iterator[pa.Table]:
    """Ray Data: rows naming files (query_files) -> their query rows (read_query_file)."""
    for path, first in zip(batch["path"], batch["first"], strict=True):
        yield from read_query_file(str(path), int(first), split)


def mark_empty(table: pa.Table) -> pa.Table:
    """Whitespace collapsed in every query; an empty one becomes an error row. Adds `key` (the
    casefolded text that duplicates share; empty for error rows)."""
    cleaned = [" ".join(str(q or "").split()) for q in table["query"].to_pylist()]
    ok = pc.equal(table["error"], "").to_numpy(zero_copy_only=False)
    empty = ok & ~np.array([bool(c) for c in cleaned], dtype=bool)
    table = table.set_column(1, "query", pa.array(cleaned, pa.string()))
    table = _set_errors(table, empty, "empty or whitespace query")
    keys = [c.casefold() if good else "" for c, good in zip(cleaned, ok & ~empty, strict=True)]
    return table.append_column("key", pa.array(keys, pa.string()))


def mark_duplicates(table: pa.Table) -> pa.Table:
    """Every good row whose key an earlier row (by `order`) has is an error row naming it.
    Needs every copy of a key in `table` (a whole file, or one block after a hash repartition)."""

    if table.num_rows == 0:
        return table
    by, first, head = first_of_each(
        table["key"].to_numpy(zero_copy_only=False), table["order"].to_numpy()
    )
    t = table.take(pa.array(by))
    good = pc.equal(t["error"], "").to_numpy(zero_copy_only=False)
    # Error rows share the empty key and no good row has it: `first` is a good row's own key.
    duplicate = good & ~first
    ids = t["query_id"].to_numpy(zero_copy_only=False)
    messages = np.full(len(ids), "", dtype=object)
    messages[duplicate] = [f"duplicate of {ids[h]}" for h in head[duplicate]]
    return _set_errors(t, duplicate, messages)


def _set_errors(table: pa.Table, where: np.ndarray, message) -> pa.Table:
    """Rows at `where` become check errors with `message` (one string, or one per row)."""
    error = np.where(where, message, table["error"].to_numpy(zero_copy_only=False))
    stage = np.where(where, "check", table["stage"].to_numpy(zero_copy_only=False))
    table = table.set_column(
        table.schema.get_field_index("error"), "error", pa.array(error.astype(object), pa.string())
    )
    return table.set_column(
        table.schema.get_field_index("stage"), "stage", pa.array(stage.astype(object), pa.string())
    )


def query_dataset(files: list[dict], split: str | None):
    """Ray Data: every query row of the files (query_files) as QUERY_ROWS, read by workers."""

    listing = ray.data.from_items(files, override_num_blocks=len(files))
    return listing.map_batches(
        read_query_batches, fn_kwargs={"split": split}, batch_size=1, batch_format="numpy"
    )


def check_query_dataset(ds, files: list[dict]):
    """Ray Data: empty queries and duplicates (of the normalised text, over every file) become
    error rows; nothing is dropped. Every copy of a query meets in one block (a repartition on
    the text, sized by the query files' bytes)."""

    size = sum(f["bytes"] for f in files)
    marked = gather_by_key(ds.map_batches(mark_empty, batch_format="pyarrow"), "key", size)
    return marked.map_batches(mark_duplicates, batch_size=None, batch_format="pyarrow")


def good_queries(table: pa.Table) -> pa.Table:
    """Ray Data: the rows that passed every check, as (query_id, query)."""
    return table.filter(pc.equal(table["error"], "")).select(["query_id", "query"])


def query_error_rows(table: pa.Table) -> pa.Table:
    """Ray Data: the rows a check rejected, as the errors contract's rows."""

    bad = table.filter(pc.not_equal(table["error"], ""))
    return conform(
        pa.table({"row_id": bad["query_id"], "stage": bad["stage"], "error": bad["error"]}), ERRORS
    )


def read_queries(path: str, split: str | None) -> tuple[pa.Table, list[dict]]:
    """In this process: (rows (query_id, query), error rows) of a query file, before the checks."""
    rows = [t for f in query_files(path) for t in read_query_file(f["path"], f["first"], split)]
    table = pa.concat_tables(rows) if rows else QUERY_ROWS.empty_table()
    bad = pc.not_equal(table["error"], "")
    errors = error_rows(table.filter(bad))
    return table.filter(pc.invert(bad)).select(["query_id", "query"]), errors


def check_queries(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """In this process: drop empty and duplicate queries (error rows with the reason); keep the
    rest in order."""
    n = table.num_rows
    rows = _rows(table["query_id"], table["query"], np.arange(n))
    checked = mark_duplicates(mark_empty(rows)).sort_by("order")
    bad = pc.not_equal(checked["error"], "")
    kept = checked.filter(pc.invert(bad)).select(["query_id", "query"])
    return kept, error_rows(checked.filter(bad))


def error_rows(table: pa.Table) -> list[dict]:
    """QUERY_ROWS error rows -> the errors contract's rows (dicts), in file order."""
    return query_error_rows(table.sort_by("order")).to_pylist()


def query_facts(path: str, texts: list[str]) -> dict[str, np.ndarray]:
    """Ground truth of what each query text asks for (colour, shape, background), from the fact
    columns of the queries file at `path` (the world's queries.parquet)."""
    table = io.read_parquet(path)
    require_columns(
        QUERIES,
        table.column_names,
        "evaluate.ground_truth",
        needed=["query", "colour", "shape", "background"],
    )
    rows = pc.index_in(pa.array(texts, pa.string()), value_set=table["query"].combine_chunks())
    rows = rows.fill_null(-1).to_numpy(zero_copy_only=False)
    if (rows < 0).any():
        raise ContractError(f"query {texts[int(np.argmax(rows < 0))]!r} has no ground truth")
    return {
        c: table[c].to_numpy(zero_copy_only=False)[rows] for c in ("colour", "shape", "background")
    }
