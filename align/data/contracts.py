"""Data contracts: the Arrow/Parquet schema of every table a job writes, in one place.

Each `Contract` names the table, the job that writes it, and each column with a one-line
description. A stage calls `require_columns` on what it reads before doing work, so a table from
the wrong job fails at once with the missing column and the job that should have written it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from align.errors import UserError


class ContractError(UserError, ValueError):
    """A table does not have what the reading stage needs."""


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str
    nullable: bool = False
    # A column a source may not supply: `conform` writes it as nulls where it is missing.
    optional: bool = False


@dataclass(frozen=True)
class Contract:
    table: str
    written_by: str
    columns: tuple[Column, ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([pa.field(c.name, c.type, nullable=c.nullable) for c in self.columns])

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"table '{self.table}' has no column '{name}'")


EMBEDDING_TYPE = pa.list_(pa.float16())

IMAGES = Contract(
    "images",
    "make_world (or any image source index_corpus reads)",
    (
        Column("image_id", pa.string(), "stable unique id of the image"),
        Column("image", pa.binary(), "encoded image bytes (JPEG, PNG, WebP), not decoded"),
        Column("caption", pa.string(), "alt text or caption", nullable=True),
    ),
)

GROUND_TRUTH = Contract(
    "ground_truth",
    "make_world",
    (
        Column("image_id", pa.string(), "id in the images table"),
        Column("shape", pa.string(), "content: the subject's shape"),
        Column("colour", pa.string(), "content: the subject's colour"),
        Column("background", pa.string(), "content: the background pattern"),
        Column("sharpness", pa.float32(), "quality 0..1 (1 = sharp); pixel-visible"),
        Column("exposure", pa.float32(), "quality 0..1 (1 = well exposed); pixel-visible"),
        Column("noise", pa.float32(), "quality 0..1 (1 = clean); pixel-visible"),
        Column("saturation", pa.float32(), "quality 0..1 (1 = ideal saturation); pixel-visible"),
        Column("composition", pa.float32(), "quality 0..1 (placement and scale); higher-level"),
        Column("harmony", pa.float32(), "quality 0..1 (subject/background hues); higher-level"),
        Column("low_level", pa.float32(), "mean of the pixel-visible qualities"),
        Column("high_level", pa.float32(), "mean of composition and harmony"),
        Column("true_aesthetic", pa.float32(), "hidden ground-truth aesthetic, 0..1"),
        Column("quality_words", pa.string(), "quality words put in the caption ('' if none)"),
    ),
)

QUERIES = Contract(
    "queries",
    "make_world (or the user's query file)",
    (
        Column("query_id", pa.string(), "stable unique id of the query"),
        Column("query", pa.string(), "the query text, content only"),
        Column(
            "split",
            pa.string(),
            "'train' (builds preferences), 'heldout' (evaluation, of trained content families) "
            "or 'unseen' (evaluation, of families the alignment never saw)",
        ),
        Column("shape", pa.string(), "ground truth: shape the query asks for", nullable=True),
        Column("colour", pa.string(), "ground truth: colour the query asks for", nullable=True),
        Column("background", pa.string(), "ground truth: background, if named", nullable=True),
    ),
)

SCORED = Contract(
    "scored",
    "index_corpus",
    (
        Column("image_id", pa.string(), "id of the image"),
        Column(
            "embedding", EMBEDDING_TYPE, "L2-normalised CLIP image embedding (null: error)", True
        ),
        Column("aesthetic", pa.float32(), "combined aesthetic, z-scored (null: error)", True),
        Column("status", pa.string(), "'ok' or 'error'"),
        Column("error", pa.string(), "reason when status is 'error'", nullable=True),
        # What the source said about the image (img2dataset's .txt/.json sidecars or parquet
        # columns), carried to search results: null where the source has none.
        Column("caption", pa.string(), "caption or alt text of the source", True, True),
        Column("url", pa.string(), "where the source downloaded the image from", True, True),
        Column(
            "sha256",
            pa.string(),
            "hex SHA-256 of the image (img2dataset's, of the download; else of the bytes read): "
            "equal hashes are exact duplicates (null: not read)",
            nullable=True,
            optional=True,
        ),
    ),
)
# Columns of SCORED a source may supply (align.data.sources), in this order.
SOURCE_METADATA = ("caption", "url", "sha256")
# Scored shards also carry one float32 column per aesthetic scorer, named with this prefix.
SCORER_COLUMN_PREFIX = "aesthetic_"

INDEX_ID_MAP = Contract(
    "index_id_map",
    "index_corpus",
    (
        Column("row", pa.int64(), "row of the vector in the FAISS index"),
        Column("image_id", pa.string(), "id of the image at that row"),
        Column("aesthetic", pa.float32(), "combined aesthetic score of the image"),
        Column("caption", pa.string(), "caption from the scored shard", nullable=True),
        Column("url", pa.string(), "source URL from the scored shard", nullable=True),
    ),
)

REWRITES = Contract(
    "rewrites",
    "build_preferences",
    (
        Column("query_id", pa.string(), "id of the query"),
        Column("query", pa.string(), "the original query"),
        Column("rewritten", pa.string(), "the query the LLM (or keyword rewriter) wrote"),
        Column("backend", pa.string(), "vllm, http or keywords"),
        Column("variant", pa.string(), "prompt variant (original, repeat, detail, k_list, ...)"),
        Column("fallback", pa.string(), "why the original was kept, if it was", nullable=True),
        Column("truncated", pa.bool_(), "query or rewrite cut at the text tower's context"),
    ),
)

CANDIDATES = Contract(
    "candidates",
    "build_preferences",
    (
        Column("query_id", pa.string(), "id of the query"),
        Column("image_id", pa.string(), "retrieved image"),
        Column("rank", pa.int32(), "rank in the retrieval for the rewritten query"),
        Column("semantic", pa.float32(), "reference similarity to the ORIGINAL query"),
        Column("aesthetic", pa.float32(), "combined aesthetic score from index_corpus"),
    ),
)

PAIRS = Contract(
    "pairs",
    "build_preferences",
    (
        Column("query_id", pa.string(), "id of the query"),
        Column("query", pa.string(), "the ORIGINAL query text the model is trained on"),
        Column("chosen_id", pa.string(), "preferred image"),
        Column("rejected_id", pa.string(), "dispreferred image"),
        Column("chosen_ref_sim", pa.float32(), "reference model cosine(query, chosen)"),
        Column("rejected_ref_sim", pa.float32(), "reference model cosine(query, rejected)"),
        Column("chosen_aesthetic", pa.float32(), "aesthetic score of the chosen image"),
        Column("rejected_aesthetic", pa.float32(), "aesthetic score of the rejected image"),
        Column("chosen_cell", pa.list_(pa.int16()), "(row, col) of chosen in the u x v grid"),
        Column("rejected_cell", pa.list_(pa.int16()), "(row, col) of rejected in the grid"),
        Column(
            "reference_model",
            pa.string(),
            "model whose similarities the *_ref_sim columns are (align.models.clip.model_id)",
        ),
    ),
)

ERRORS = Contract(
    "errors",
    "every job",
    (
        Column("row_id", pa.string(), "id of the input row (image_id, query_id, path)"),
        Column("stage", pa.string(), "stage that rejected the row"),
        Column("error", pa.string(), "what was wrong, in words"),
    ),
)

RATINGS = Contract(
    "ratings",
    "make_world (or an AVA-style ratings file): what train_scorer learns from",
    (
        Column("image_id", pa.string(), "id in the images table"),
        Column("rating", pa.float32(), "mean aesthetic rating by people, 0..1 (1 = best)"),
    ),
)

HPIR_DIMENSIONS = ("accuracy", "aesthetic", "diversity")
HPIR = Contract(
    "hpir",
    "make_world (from ground truth) or people's judgements collected for the HPIR protocol",
    (
        Column("item_id", pa.string(), "stable unique id of the comparison"),
        Column("query", pa.string(), "the query both rows answer"),
        Column("row_a", pa.list_(pa.string()), "image ids of row A, in rank order"),
        Column("row_b", pa.list_(pa.string()), "image ids of row B, in rank order"),
        *(
            column
            for dim in HPIR_DIMENSIONS
            for column in (
                Column(
                    f"{dim}_preferred",
                    pa.string(),
                    f"'a' or 'b': the row people preferred for {dim} (null: no preference)",
                    nullable=True,
                ),
                Column(
                    f"{dim}_confidence",
                    pa.float32(),
                    "share of people who preferred that row, 0.5..1 (null: no preference)",
                    nullable=True,
                ),
            )
        ),
    ),
)

ALL_CONTRACTS = (
    IMAGES,
    GROUND_TRUTH,
    QUERIES,
    SCORED,
    INDEX_ID_MAP,
    REWRITES,
    CANDIDATES,
    PAIRS,
    RATINGS,
    HPIR,
    ERRORS,
)


def require_columns(contract: Contract, available: Iterable[str], stage: str, needed=None) -> None:
    """Check that the columns `stage` needs from `contract`'s table are present.

    Args:
        contract: the table the stage reads.
        available: column names of what was actually read.
        stage: the reading stage's name, for the message.
        needed: column names to require (default: every column of the contract).
    Raises:
        ContractError: naming each missing column, its meaning and the job that writes it.
    """
    have = set(available)
    missing = [n for n in (needed or contract.names) if n not in have]
    if missing:
        detail = "; ".join(f"'{n}' ({contract.column(n).description})" for n in missing)
        raise ContractError(
            f"stage '{stage}' needs column(s) {detail} of table '{contract.table}', which "
            f"{contract.written_by} writes; found columns: {sorted(have)}"
        )


def conform(table: pa.Table, contract: Contract, extra_prefix: str | None = None) -> pa.Table:
    """Select and cast `table` to the contract's columns, in order (stable shard schemas).

    Columns starting with `extra_prefix` (e.g. the per-scorer columns) are kept after them;
    optional columns the table lacks are written as nulls.

    Raises:
        ContractError: when a column that is not optional is missing.
    """
    for c in contract.columns:
        if c.optional and c.name not in table.column_names:
            table = table.append_column(c.name, pa.nulls(table.num_rows, c.type))
    require_columns(contract, table.column_names, stage=f"write {contract.table}")
    extras = [n for n in table.column_names if extra_prefix and n.startswith(extra_prefix)]
    fields = list(contract.schema) + [table.schema.field(n) for n in extras]
    return table.select([f.name for f in fields]).cast(pa.schema(fields))
