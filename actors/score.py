"""Aesthetic scoring stage (actor pool): one raw score column per configured scorer.

Scores are raw here; index_corpus z-scores them across the whole corpus and combines them once
every shard is done. Drops the pixels: nothing after this stage needs them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors import require_batch_columns
from align.config import PoolConfig
from align.data.contracts import SCORER_COLUMN_PREFIX, SOURCE_METADATA
from align.models.aesthetics import build_scorer
from align.runtime.stages import actor_pool

REQUIRED = {
    "pixels": "uint8 pixels from the decode stage",
    "embedding": "CLIP image embeddings from the embed stage",
    "status": "'ok' rows are scored, others get NaN",
}


class AestheticScorer:
    def __init__(self, scorers: dict[str, str | None], embed_dim: int):
        """scorers: name -> checkpoint path (or None)."""
        self.scorers = [build_scorer(name, ckpt, embed_dim) for name, ckpt in scorers.items()]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_batch_columns(batch, REQUIRED, "score")
        ok = batch["status"] == "ok"
        out = {k: v for k, v in batch.items() if k != "pixels"}
        for scorer in self.scorers:
            column = np.full(len(ok), np.nan, dtype=np.float32)
            if ok.any():
                column[ok] = scorer(batch["pixels"][ok], batch["embedding"][ok])
            out[SCORER_COLUMN_PREFIX + scorer.name] = column
        return out


def scored_to_arrow(batch: dict[str, np.ndarray]) -> pa.Table:
    """After the scoring stage (a task): the scored numpy batch -> Arrow, the embedding as
    list<float16> (null on error rows), the error column null on ok rows."""
    emb = np.asarray(batch["embedding"], dtype=np.float16)
    dim = emb.shape[1]
    ok = batch["status"] == "ok"
    # Error rows are null lists, which must take no values: offsets advance on ok rows only.
    offsets = np.concatenate([[0], np.cumsum(ok * dim)]).astype(np.int32)
    embedding = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(emb[ok].reshape(-1), type=pa.float16()), mask=pa.array(~ok)
    )
    columns = {
        "image_id": pa.array(batch["image_id"], pa.string()),
        "embedding": embedding,
        "status": pa.array(batch["status"], pa.string()),
        "error": pc.if_else(
            pa.array(ok), pa.scalar(None, pa.string()), pa.array(batch["error"].astype(str))
        ),
    }
    for name in SOURCE_METADATA:  # decode writes "" for none: null here
        values = pa.array(batch.get(name, np.full(len(ok), "", dtype=object)), pa.string())
        columns[name] = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
    for name, values in batch.items():
        if name.startswith(SCORER_COLUMN_PREFIX):
            columns[name] = pa.array(values, pa.float32())
    return pa.table(columns)


def score_stage(ds, scorers: dict[str, str | None], embed_dim: int, pool: PoolConfig):
    """`AestheticScorer` over embedded images of `ds`, in an actor pool (`scorers`: name ->
    checkpoint)."""
    return ds.map_batches(
        AestheticScorer,
        fn_constructor_kwargs={"scorers": scorers, "embed_dim": embed_dim},
        batch_format="numpy",
        **actor_pool(pool),
    )
