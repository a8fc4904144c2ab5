"""Aesthetic scoring stage (actor pool): one raw score column per configured scorer.

Scores are raw here; index_corpus z-scores them across the whole corpus and combines them once
every shard is done. Drops the pixels: nothing after this stage needs them.
"""

from __future__ import annotations

import numpy as np

from actors import require_batch_columns
from align.aesthetics import build_scorer
from align.contracts import SCORER_COLUMN_PREFIX

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
