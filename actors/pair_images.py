"""Pair image stage (actor pool): attach the chosen and the rejected image of each pair from a
broadcast table of image bytes, and decode both.

The broadcast join for when the pairs' images are few enough to hold in every actor (a Spark-style
broadcast threshold, `finetune.broadcast_max_mb`); the blocks stay in Ray's object store and each
actor maps them zero-copy. Larger sets go through Ray Data's hash join instead.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.decode import decode_columns


class PairImageDecoder:
    def __init__(self, image_blocks: list, image_size: int, max_pixels: int):
        import ray

        # A list of ObjectRefs (nested, so Ray does not resolve them for us): blocks of
        # (image_id, image, status) from the job's image check.
        table = pa.concat_tables(ray.get(image_blocks))
        table = table.filter(pc.equal(table["status"], "ok"))
        self.ids = table["image_id"].combine_chunks()
        self.images = table["image"].combine_chunks()
        self.image_size, self.max_pixels = image_size, max_pixels

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        out = {name: batch[name].to_numpy(zero_copy_only=False) for name in batch.column_names}
        for side in ("chosen", "rejected"):
            rows = pc.index_in(batch[f"{side}_id"], value_set=self.ids)
            if rows.null_count:
                missing = pc.filter(batch[f"{side}_id"], pc.is_null(rows))[0]
                raise KeyError(f"image {missing} of a pair is not in the checked images")
            out[f"{side}_image"] = self.images.take(rows).to_numpy(zero_copy_only=False)
        return decode_columns(
            out,
            columns={"chosen_image": "chosen_pixels", "rejected_image": "rejected_pixels"},
            image_size=self.image_size,
            max_pixels=self.max_pixels,
        )
