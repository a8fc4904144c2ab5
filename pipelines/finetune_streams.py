"""The fine-tune's training streams (Ray Data), which pipelines/finetune.py checks and hands to
Ray Train: the usable pairs with both images attached and decoded and the query tokenized; the
usable image-caption rows decoded and tokenized. Every column a worker reads is made here, so the
training step only computes.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from actors.decode import decode_columns_stage
from actors.pair_images import pair_image_stage
from actors.tokenize import tokenize_stage
from align.config import Config
from align.runtime.stages import parquet_files_stream, table_blocks
from align.storage import io
from align.train.pair_checks import has_text

# What a training worker gets per pair: the query's tokens, both reference similarities, both
# images; per caption row: its image and its tokens.
TRAIN_PAIR_COLUMNS = [
    "query_tokens",
    "chosen_ref_sim",
    "rejected_ref_sim",
    "chosen_pixels",
    "rejected_pixels",
]


def tokenized(config: Config, ds, columns: dict[str, str]):
    """The stream with its text columns replaced by the model's token ids (CPU tasks)."""
    return tokenize_stage(ds, config.model.name, columns, config.finetune.decode)


def pair_stream(config: Config, sizes: dict, pairs: pa.Table, keep_ids: pa.Array, image_blocks):
    """The usable pairs (already read by the driver) with both images attached and decoded and
    the query tokenized in the data pipeline: images from broadcast blocks of the checked images
    when given, else by two hash joins with the images table."""

    cfg = config.finetune
    step = max(cfg.decode.batch_size, 1)
    ds = ray.data.from_arrow(table_blocks(pairs, step))
    if image_blocks is not None:
        ds = pair_image_stage(ds, image_blocks, sizes, cfg.decode)
        return tokenized(config, ds, {"query": "query_tokens"}).select_columns(TRAIN_PAIR_COLUMNS)
    files = io.list_files(config.expand(cfg.images), ".parquet")
    images = parquet_files_stream(files, ["image_id", "image"], cfg.decode.num_cpus)
    images = images.map_batches(
        lambda t: t.filter(pc.is_in(t["image_id"], keep_ids)), batch_format="pyarrow"
    )
    join = {
        "num_partitions": cfg.join.num_partitions,
        "aggregator_ray_remote_args": {"num_cpus": cfg.join.num_cpus},
    }
    for side in ("chosen", "rejected"):
        renamed = images.rename_columns({"image_id": f"{side}_id", "image": f"{side}_image"})
        ds = ds.join(renamed, "inner", on=(f"{side}_id",), **join)
    pixels = {"chosen_image": "chosen_pixels", "rejected_image": "rejected_pixels"}
    ds = decode_columns_stage(ds, cfg.decode, pixels, sizes)
    return tokenized(config, ds, {"query": "query_tokens"}).select_columns(TRAIN_PAIR_COLUMNS)


def caption_stream(config: Config, sizes: dict, bad_images: pa.Array):
    """Image-caption rows with a caption and a good image, decoded and tokenized in the data
    pipeline: (pixels, caption_tokens)."""
    cfg = config.finetune
    files = io.list_files(config.expand(cfg.captions), ".parquet")
    ds = parquet_files_stream(files, ["image_id", "image", "caption"], cfg.decode.num_cpus)

    def usable(t: pa.Table) -> pa.Table:
        keep = pc.and_(has_text(t["caption"]), pc.invert(pc.is_in(t["image_id"], bad_images)))
        return t.filter(keep).select(["image", "caption"])

    ds = ds.map_batches(usable, batch_format="pyarrow")
    ds = decode_columns_stage(ds, cfg.decode, {"image": "pixels"}, sizes)
    return tokenized(config, ds, {"caption": "caption_tokens"})
