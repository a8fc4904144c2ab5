"""make_world: render the synthetic aesthetic world (images, ground truth, queries).

    python -m pipelines.make_world --config configs/demo.yaml [world.seed=3 ...]

Writes under `{output_dir}/world/`: `images/shard-*.parquet` (the corpus, the images contract:
encoded JPEG bytes and captions), `heldout_images/shard-*.parquet` (image-caption pairs outside the
corpus, never trained on: evaluate's recall@k), `pretrain_images/shard-*.parquet`
(world.pretrain_images pairs apart from both, to pretrain the base as the web does a real CLIP),
`ground_truth.parquet` (of the corpus), `queries.parquet`, `hpir.parquet` (the HPIR protocol's
file, from the ground truth), `ratings.parquet` (people's ratings of a share of the corpus, for
train_scorer) and `_manifest.json`. Shards are rendered in parallel, one Ray task each, and are a
pure function of (world config, set, shard index).
"""

from __future__ import annotations

import sys

import pyarrow as pa
import ray

from align.config import Config, WorldConfig
from align.data import world
from align.log import get_logger
from align.runtime.cli import run_job
from align.runtime.manifest import JobManifest
from align.runtime.session import init_ray
from align.storage import io, paths

log = get_logger("make_world")


def _render_and_write(cfg: WorldConfig, shard: int, images_dir: str, part: str) -> pa.Table:
    """Ray task: render one shard, write its images, return its ground truth (small)."""
    images, ground_truth = world.render_shard(cfg, shard, part)
    io.write_parquet(images, f"{images_dir}/shard-{shard:05d}.parquet")
    return ground_truth


def make_world(config: Config) -> dict:
    out = config.job_output("world")
    manifest = JobManifest("make_world", config, output=out)  # removes a stale manifest
    init_ray(config.ray)
    render = ray.remote(num_cpus=1)(_render_and_write)
    refs = {}
    for part in world.PARTS:
        images_dir = f"{out}/{world.PARTS[part].folder}"
        n_shards = world.num_shards(config.world, part)
        # A re-run with fewer images must not leave shards of the old run behind.
        io.delete_files_except(
            images_dir, ".parquet", {f"shard-{i:05d}.parquet" for i in range(n_shards)}
        )
        refs[part] = [render.remote(config.world, i, images_dir, part) for i in range(n_shards)]
    log.info(
        "rendering %d corpus, %d held-out and %d pretraining images",
        config.world.num_images,
        config.world.heldout_images,
        config.world.pretrain_images,
    )
    with manifest.stage("render"):
        ground_truth = pa.concat_tables(ray.get(refs["corpus"]))
        ray.get(refs["heldout"] + refs["pretrain"])
    with manifest.stage("write"):
        io.write_parquet(ground_truth, f"{out}/{paths.GROUND_TRUTH}")
        queries = world.make_queries(config.world)
        io.write_parquet(queries, f"{out}/{paths.QUERIES}")
        hpir = world.make_hpir(config.world, ground_truth, queries)
        io.write_parquet(hpir, f"{out}/{paths.HPIR}")
        ratings = world.make_ratings(config.world, ground_truth)
        io.write_parquet(ratings, f"{out}/{paths.RATINGS}")
    splits = queries.column("split").to_pylist()
    manifest.extra["world"] = {
        "shards": len(refs["corpus"]),
        "images": ground_truth.num_rows,
        "heldout_images": config.world.heldout_images,
        "pretrain_images": config.world.pretrain_images,
        "hpir_items": hpir.num_rows,
        "rated_images": ratings.num_rows,
        "queries": {s: splits.count(s) for s in ("train", "heldout")},
        "captions_with_quality_words": sum(
            1 for w in ground_truth["quality_words"].to_pylist() if w
        ),
    }
    result = manifest.write(
        out, rows_in=config.world.num_images, rows_out=ground_truth.num_rows, rows_error=0
    )
    log.info("wrote %d images and %d queries to %s", ground_truth.num_rows, len(splits), out)
    return result


def main(argv: list[str] | None = None) -> int:
    return run_job("make_world", make_world, argv)


if __name__ == "__main__":
    sys.exit(main())
