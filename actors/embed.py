"""CLIP image embedding stage (actor pool): uint8 pixels -> L2-normalised float16 embeddings."""

from __future__ import annotations

import numpy as np

from actors import load_clip_for_actor, require_batch_columns
from actors.decode import decode_stage
from align.config import ModelConfig, PoolConfig
from align.data.images import pixels_to_tensor
from align.models.clip import check_model
from align.runtime.stages import actor_pool, collect_ok_rows, parquet_files_stream
from align.storage import io

# torch is imported inside the functions that use it (1.8 s here): the driver that builds the
# pipeline imports this module and never runs the model.

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


def embed_image_sources(
    sources: list[str], model: ModelConfig, decode: PoolConfig, embed: PoolConfig, max_pixels: int
):
    """Per source, (image ids, float16 L2-normalised embeddings), and the error rows of all, for
    images in the images contract: every source in one stream (one decode pool, one embedding
    actor pool: a pool's start costs more than a small held-out set's images), brought to the
    driver (evaluate's galleries: held-out sets and corpora small enough to embed in a job)."""

    facts = check_model(model)
    if not sources:
        return [], []
    files = [(n, f) for n, source in enumerate(sources) for f in io.parquet_files(source)]
    ds = parquet_files_stream(
        [f for _, f in files], ["image_id", "image"], decode.num_cpus, [n for n, _ in files]
    )
    ds = decode_stage(
        ds, decode, image_size=facts.image_size, max_pixels=max_pixels, carry=("source",)
    )
    ds = image_embed_stage(ds, model, embed)
    ds = ds.select_columns(["image_id", "embedding", "status", "error", "source"])
    rows, errors = collect_ok_rows(ds, ["image_id", "embedding", "source"], "embed_images")
    if rows["image_id"] is None:
        empty = (np.array([], dtype=object), np.zeros((0, facts.embed_dim), np.float16))
        return [empty for _ in sources], errors
    mine = [rows["source"] == n for n in range(len(sources))]
    return [(rows["image_id"][m].astype(object), rows["embedding"][m]) for m in mine], errors


def image_embed_stage(ds, model: ModelConfig, pool: PoolConfig):
    """`ClipImageEmbedder` over decoded images of `ds`, in an actor pool (`pool`)."""
    return ds.map_batches(
        ClipImageEmbedder,
        fn_constructor_kwargs={"model": model.model_dump(), "threads": pool.threads},
        batch_format="numpy",
        **actor_pool(pool),
    )
