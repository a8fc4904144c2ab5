"""The tables build_preferences writes, from a batch of retrieved queries (one row per query,
list columns per candidate and per pair): pairs, candidates and rewrites in their contracts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align.data.contracts import CANDIDATES, PAIRS, REWRITES, conform


def explode(
    table: pa.Table, columns: list[str], repeat: list[str], position: str | None = None
) -> pa.Table:
    """One row per element of the list columns, with the `repeat` columns copied down and, if
    `position` names a column, each element's position within its list."""
    lists = table[columns[0]].combine_chunks()
    parents = pc.list_parent_indices(lists)
    out = {c: table[c].take(parents) for c in repeat}
    out.update({c: pc.list_flatten(table[c]) for c in columns})
    if position:
        starts = lists.offsets.to_numpy()[parents.to_numpy()]
        out[position] = pa.array(np.arange(len(parents)) - starts, pa.int32())
    return pa.table(out)


def pairs_table(batch: pa.Table, reference_model: str) -> pa.Table:
    t = explode(
        batch,
        [c for c in PAIRS.names if c.startswith(("chosen", "rejected"))],
        ["query_id", "query"],
    )
    # Dictionary-encoded in Parquet: one string per row costs next to nothing on disk.
    t = t.append_column("reference_model", pa.array([reference_model] * t.num_rows, pa.string()))
    return conform(t, PAIRS)


def candidates_table(batch: pa.Table) -> pa.Table:
    # rank: position in the retrieval order for the rewritten query.
    t = explode(
        batch,
        ["candidate_ids", "candidate_semantic", "candidate_aesthetic"],
        ["query_id"],
        position="rank",
    )
    t = t.rename_columns(
        {
            "candidate_ids": "image_id",
            "candidate_semantic": "semantic",
            "candidate_aesthetic": "aesthetic",
        }
    )
    return conform(t, CANDIDATES)


def count_reasons(errors: list[str]) -> dict[str, int]:
    """Error messages counted by reason (the message up to its first ':' or ' of ')."""
    counts: dict[str, int] = {}
    for e in errors:
        reason = e.split(":")[0].split(" of ")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def rewrites_table(batch: pa.Table, backend: str, variant: str) -> pa.Table:
    """The rewrites contract: each query, its rewrite, the backend and variant, and why it fell
    back to the original (null when it did not)."""
    fallback = pc.if_else(
        pc.equal(batch["fallback"], ""), pa.scalar(None, pa.string()), batch["fallback"]
    )
    return conform(
        batch.append_column("backend", pa.array([backend] * batch.num_rows, pa.string()))
        .append_column("variant", pa.array([variant] * batch.num_rows, pa.string()))
        .set_column(batch.schema.get_field_index("fallback"), "fallback", fallback),
        REWRITES,
    )
