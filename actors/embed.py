"""CLIP image embedding stage (actor pool): uint8 pixels -> L2-normalised float16 embeddings."""

from __future__ import annotations

import numpy as np

from actors import load_clip_for_actor, require_batch_columns
from align.images import pixels_to_tensor

REQUIRED = {
    "pixels": "uint8 (N, S, S, 3) at the model's image size, from the decode stage",
    "status": "'ok' rows are embedded, others skipped",
}


class ClipImageEmbedder:
    """Loads the CLIP model once per actor; float16 on GPU, float32 compute on CPU."""

    def __init__(self, model: dict, threads: int | None = None):
        self.clip, self.device, self.threads = load_clip_for_actor(model, threads, fp16_on_gpu=True)
        self.dtype = next(self.clip.model.parameters()).dtype

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        require_batch_columns(batch, REQUIRED, "embed")
        self.threads.refresh()
        ok = batch["status"] == "ok"
        out = np.zeros((len(ok), self.clip.embed_dim), dtype=np.float16)
        if ok.any():
            with torch.inference_mode():
                x = pixels_to_tensor(
                    batch["pixels"][ok], self.clip.mean, self.clip.std, self.device, self.dtype
                )
                emb = self.clip.model.encode_image(x)
                emb = torch.nn.functional.normalize(emb.float(), dim=-1)
                out[ok] = emb.half().cpu().numpy()
        return {**batch, "embedding": out}
