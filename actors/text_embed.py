"""Text embedding stage (actor pool): text columns (by default the original and the rewritten
query) -> L2-normalised embeddings, `{column}_embedding` for each.

Texts longer than the text tower's context are truncated as CLIP does; `truncated` records it.
"""

from __future__ import annotations

import numpy as np

from actors import load_clip_for_actor, require_batch_columns

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
