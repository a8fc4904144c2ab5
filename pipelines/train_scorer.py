"""train_scorer: a learned aesthetic scorer (`rated_cnn`) from people's ratings.

    python -m pipelines.train_scorer --config configs/demo.yaml [key=value ...]

The paper re-ranks with public aesthetic models trained on human ratings (the LAION predictor,
MANIQA, ...). This job trains such a model for a corpus that has ratings: a small CNN on pixels
(align/models/aesthetics.py: rated_cnn) regressing the mean rating, on the synthetic world's
`ratings.parquet` (or any table of the ratings contract with an images table). The rated images
are decoded in Ray Data tasks; the network trains in one Ray task (CPUs or a GPU from config).
index_corpus then uses it as the scorer `rated_cnn` with `checkpoint: {output}/model.pt`.

Output under `train_scorer.output`: `model.pt`, `metrics.json` (validation Pearson and Spearman
correlation with the held-out ratings, MSE, per-epoch loss), `errors/` (rated images that are
missing or do not decode) and `_manifest.json`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa
import ray
import ray.data

from actors.decode import decode_stage
from align.config import Config
from align.data import tables
from align.data.contracts import RATINGS, require_columns
from align.data.error_rows import write_error_rows
from align.errors import InputNotFound
from align.log import get_logger
from align.models import aesthetics
from align.runtime.cli import run_job
from align.runtime.manifest import JobManifest, empty_output_dir
from align.runtime.session import init_ray
from align.runtime.stages import collect_ok_rows, table_blocks
from align.storage import io, paths
from align.train.scorer import fit

log = get_logger("train_scorer")


def decode_rated(config: Config, ratings: pa.Table) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(pixels (N, S, S, 3) uint8, ratings (N,), error rows): the rated images, decoded in Ray
    Data tasks; rated ids with no image, or an image that does not decode, become error rows."""

    ts = config.train_scorer
    ids = ratings["image_id"].to_numpy(zero_copy_only=False)
    images = tables.read_image_table(config.expand(ts.images), ids, ["image_id", "image"])
    rows = tables.align_rows(ids, images)
    errors = [
        {"row_id": str(i), "stage": "read", "error": "rated image not in train_scorer.images"}
        for i in ids[rows < 0]
    ]
    step = ts.decode.batch_size
    blocks = table_blocks(images, step)
    ds = decode_stage(
        ray.data.from_arrow(blocks),
        ts.decode,
        image_size=ts.image_size,
        max_pixels=config.max_image_pixels,
    )
    decoded, decode_errors = collect_ok_rows(ds, ["image_id", "pixels"], "decode")
    errors += decode_errors
    if decoded["image_id"] is None:
        raise InputNotFound(
            f"none of the {len(ids)} rated images of {ts.ratings} could be read or decoded"
        )
    got_ids = decoded["image_id"].astype(object)
    rating = ratings["rating"].to_numpy()[tables.align_rows(got_ids, ratings)]
    return decoded["pixels"], rating.astype(np.float32), errors


def train_scorer(config: Config) -> dict:
    ts = config.train_scorer
    out = config.job_output("train_scorer")
    manifest = JobManifest("train_scorer", config, output=out)  # removes a stale manifest
    ratings_path = config.expand(ts.ratings)
    io.require_exists(ratings_path, "ratings (train_scorer.ratings)")
    aesthetics.rated_cnn(ts.image_size)  # fails fast on a bad image size
    ratings = io.read_parquet(ratings_path)
    require_columns(RATINGS, ratings.column_names, "train_scorer.read")
    init_ray(config.ray)
    with manifest.stage("decode"):
        pixels, rating, errors = decode_rated(config, ratings)
    log.info("%d rated images decoded, %d error rows; training", len(rating), len(errors))
    t0 = time.perf_counter()
    with manifest.stage("train"):
        task = ray.remote(num_cpus=ts.num_cpus, num_gpus=ts.num_gpus)(fit)
        result = ray.get(task.remote(pixels, rating, ts))
    net = aesthetics.rated_cnn(ts.image_size)
    net.load_state_dict(result["state_dict"])
    aesthetics.save_rated_cnn(net, ts.image_size, f"{out}/{paths.MODEL_FILE}")
    metrics = {**result["metrics"], "seconds": time.perf_counter() - t0}
    io.write_json(f"{out}/metrics.json", metrics)
    empty_output_dir(f"{out}/errors", "train_scorer")
    write_error_rows(errors, f"{out}/errors")
    manifest.extra.update({"export": f"{out}/{paths.MODEL_FILE}", "metrics": metrics})
    log.info(
        "rated_cnn: validation Pearson %.3f, Spearman %.3f on %d held-out ratings",
        metrics["validation_pearson"],
        metrics["validation_spearman"],
        metrics["validation_ratings"],
    )
    return manifest.write(
        out, rows_in=ratings.num_rows, rows_out=len(rating), rows_error=len(errors)
    )


def main(argv: list[str] | None = None) -> int:
    return run_job("train_scorer", train_scorer, argv)


if __name__ == "__main__":
    sys.exit(main())
