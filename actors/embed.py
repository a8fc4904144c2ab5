"""CLIP image embedding stage (actor pool): uint8 pixels -> L2-normalised float16 embeddings."""

from __future__ import annotations

import numpy as np

from actors import load_clip_for_actor, require_batch_columns
from align import io
from align.config import ModelConfig, PoolConfig
from align.images import pixels_to_tensor
from align.models import check_model
from align.stages import actor_pool, collect_ok_rows, task_pool

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


def embed_image_source(
    source: str, model: ModelConfig, decode: PoolConfig, embed: PoolConfig, max_pixels: int
):
    """(image ids, float16 L2-normalised embeddings, error rows) of the images in `source` (the
    images contract), decoded in CPU tasks and embedded in an actor pool, brought to the driver
    (evaluate's galleries: held-out sets and corpora small enough to embed in a job)."""
    import ray.data

    from actors.decode import decode_batch

    facts = check_model(model)
    ds = (
        ray.data.read_parquet(io.parquet_files(source), num_cpus=decode.num_cpus)
        .select_columns(["image_id", "image"])
        .map_batches(
            decode_batch,
            fn_kwargs={"image_size": facts.image_size, "max_pixels": max_pixels},
            **task_pool(decode),
        )
        .map_batches(
            ClipImageEmbedder,
            fn_constructor_kwargs={"model": model.model_dump(), "threads": embed.threads},
            batch_format="numpy",
            **actor_pool(embed),
        )
        .select_columns(["image_id", "embedding", "status", "error"])
    )
    rows, errors = collect_ok_rows(ds, ["image_id", "embedding"], "embed_images")
    if rows["image_id"] is None:
        return np.array([], dtype=object), np.zeros((0, facts.embed_dim), np.float16), errors
    return rows["image_id"].astype(object), rows["embedding"], errors
