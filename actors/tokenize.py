"""Tokenize stage (CPU tasks): text columns -> the model's token ids (int32, (N, context length)).

The training streams are decoded once and kept in the object store, so texts tokenized here are
tokenized once, not on every training step (open_clip's SimpleTokenizer took 12 ms of a 172 ms
pretraining step of 256 captions here). Each distinct text of a batch is tokenized once: a pair
batch holds one or two queries.
"""

from __future__ import annotations

import numpy as np

from actors import require_batch_columns
from align.config import PoolConfig
from align.models.clip import text_tokenizer
from align.runtime.stages import task_pool


def tokenize_columns(batch: dict[str, np.ndarray], *, model: str, columns: dict[str, str]) -> dict:
    """Replace each text column in `columns` (text column -> tokens column) by its token ids,
    from the tokenizer of model `model` (an open_clip or project model name)."""

    require_batch_columns(batch, {c: "text" for c in columns}, "tokenize")
    tokenizer = text_tokenizer(model)
    out = {k: v for k, v in batch.items() if k not in columns}
    for source, target in columns.items():
        texts = np.array([str(t) for t in batch[source]])
        distinct, where = np.unique(texts, return_inverse=True)
        out[target] = tokenizer(distinct.tolist()).numpy().astype(np.int32)[where.reshape(-1)]
    return out


def tokenize_stage(ds, model: str, columns: dict[str, str], pool: PoolConfig):
    """`tokenize_columns` over `ds` in a task pool: each text column of `columns` replaced by its
    tokens column."""
    return ds.map_batches(
        tokenize_columns,
        fn_kwargs={"model": model, "columns": columns},
        batch_format="numpy",
        **task_pool(pool),
    )
