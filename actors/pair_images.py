"""Pair image stage (actor pool): attach the chosen and the rejected image of each pair from a
broadcast table of image bytes, and decode both (each distinct image of a batch once).

The broadcast join for when the pairs' images are few enough to hold in every actor (a Spark-style
broadcast threshold, `finetune.broadcast_max_mb`); the blocks stay in Ray's object store and each
actor maps them zero-copy. Larger sets go through Ray Data's hash join instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from actors.decode import decode_columns
from align.config import PoolConfig
from align.runtime.stages import actor_pool


class PairImageDecoder:
    def __init__(self, image_blocks: list, image_size: int, max_pixels: int):
        # A list of ObjectRefs (nested, so Ray does not resolve them for us): blocks of
        # (image_id, image, status) from the job's image check.
        table = pa.concat_tables(ray.get(image_blocks))
        table = table.filter(pc.equal(table["status"], "ok"))
        self.ids = table["image_id"].combine_chunks()
        self.images = table["image"].combine_chunks()
        self.image_size, self.max_pixels = image_size, max_pixels

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = {name: batch[name].to_numpy(zero_copy_only=False) for name in batch.column_names}
        rows = []
        for side in ("chosen", "rejected"):
            found = pc.index_in(batch[f"{side}_id"], value_set=self.ids)
            if found.null_count:
                missing = pc.filter(batch[f"{side}_id"], pc.is_null(found))[0]
                raise KeyError(f"image {missing} of a pair is not in the checked images")
            rows.append(found.to_numpy())
        # A batch holds the pairs of one or two queries, which share their grid's images: each
        # distinct image is decoded once (a quarter to a half of the decodes of two per pair).
        distinct, where = np.unique(np.concatenate(rows), return_inverse=True)
        images = {"image": self.images.take(pa.array(distinct)).to_numpy(zero_copy_only=False)}
        pixels = decode_columns(
            images,
            columns={"image": "pixels"},
            image_size=self.image_size,
            max_pixels=self.max_pixels,
        )["pixels"]
        n = batch.num_rows
        out["chosen_pixels"], out["rejected_pixels"] = pixels[where[:n]], pixels[where[n:]]
        return out


def pair_image_stage(ds, image_blocks: list, sizes: dict, pool: PoolConfig):
    """`PairImageDecoder` over pairs, in an actor pool: both images of each pair attached from the
    broadcast `image_blocks` and decoded (`sizes`: image_size, max_pixels)."""
    return ds.map_batches(
        PairImageDecoder,
        fn_constructor_kwargs={"image_blocks": image_blocks, **sizes},
        batch_format="pyarrow",
        **actor_pool(pool),
    )
