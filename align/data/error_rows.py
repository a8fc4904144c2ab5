"""The error table every job writes beside its output: one row per input row it could not use,
in the errors contract (row_id, stage, error)."""

from __future__ import annotations

import pyarrow as pa

from align.data.contracts import ERRORS, conform
from align.storage import io


def write_error_rows(rows: pa.Table | list[dict], folder: str, part: int = 0) -> str:
    """Write `rows` (a table, or dicts with row_id, stage and error) to
    `folder/part-NNNNN.parquet`; written when empty too, so every job's errors/ reads as a table
    of the contract. Returns the file's path."""
    if not isinstance(rows, pa.Table):
        rows = pa.Table.from_pylist(rows, schema=ERRORS.schema)
    path = f"{folder}/part-{part:05d}.parquet"
    io.write_parquet(conform(rows, ERRORS), path)
    return path
