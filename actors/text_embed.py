"""Text embedding stage (actor pool): text columns (by default the original and the rewritten
query) -> L2-normalised embeddings, `{column}_embedding` for each.

Texts longer than the text tower's context are truncated as CLIP does; `truncated` records it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data

from actors import load_clip_for_actor, require_batch_columns
from align.config import ModelConfig, PoolConfig
from align.runtime.stages import actor_pool, table_blocks

# torch is imported inside the functions that use it (1.8 s here): the driver that builds the
# pipeline imports this module and never runs the model.

QUERY_COLUMNS = ("query", "rewritten")


class ClipTextEmbedder:
    def __init__(
        self, model: dict, threads: int | None = None, columns: tuple[str, ...] = QUERY_COLUMNS
    ):
        self.clip, self.device, self.threads = load_clip_for_actor(model, threads)
        self.columns = tuple(columns)

    def _too_long(self, texts) -> np.ndarray:
        encode = getattr(self.clip.tokenizer, "encode", None)
        if encode is None:
            return np.zeros(len(texts), dtype=bool)
        # +2: start and end tokens.
        return np.array([len(encode(t)) + 2 > self.clip.context_length for t in texts])

    def embed(self, texts) -> np.ndarray:
        """L2-normalised float32 embeddings (n, d) of a sequence of texts."""
        import torch

        self.threads.refresh()
        with torch.inference_mode():
            tokens = self.clip.tokenizer(list(texts)).to(self.device)
            emb = self.clip.model.encode_text(tokens)
            return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        require_batch_columns(batch, {c: "text to embed" for c in self.columns}, "text_embed")
        out = {**batch, **{f"{c}_embedding": self.embed(batch[c]) for c in self.columns}}
        out["truncated"] = np.logical_or.reduce([self._too_long(batch[c]) for c in self.columns])
        return out


def embed_texts(model: ModelConfig, texts: list[str], embed: PoolConfig) -> np.ndarray:
    """(len(texts), d) float32 L2-normalised text embeddings, in input order, embedded in an
    actor pool and brought to the driver."""

    table = pa.table({"row": np.arange(len(texts)), "text": pa.array(texts, pa.string())})
    step = embed.batch_size
    blocks = table_blocks(table, step)
    ds = text_embed_stage(ray.data.from_arrow(blocks), model, embed, columns=("text",))
    rows, embeddings = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        rows.append(batch["row"])
        embeddings.append(batch["text_embedding"])
    out = np.zeros((len(texts), embeddings[0].shape[1]), np.float32)
    out[np.concatenate(rows)] = np.concatenate(embeddings)
    return out


def text_embed_stage(
    ds, model: ModelConfig, pool: PoolConfig, columns: tuple[str, ...] | None = None
):
    """`ClipTextEmbedder` over `ds`, in an actor pool (`columns`: the text columns embedded; None:
    the query and its rewrite)."""
    kwargs = {"model": model.model_dump(), "threads": pool.threads}
    if columns is not None:
        kwargs["columns"] = columns
    return ds.map_batches(
        ClipTextEmbedder, fn_constructor_kwargs=kwargs, batch_format="numpy", **actor_pool(pool)
    )
