"""make_world: render the synthetic aesthetic world (images, ground truth, queries).

    python -m pipelines.make_world --config configs/demo.yaml [world.seed=3 ...]

Writes under `{output_dir}/world/`: `images/shard-*.parquet` (the images contract: encoded JPEG
bytes and captions), `ground_truth.parquet`, `queries.parquet` and `_manifest.json`. Shards are
rendered in parallel, one Ray task each, and are a pure function of (world config, shard index).
"""

from __future__ import annotations

import sys

import pyarrow as pa

from align import io, world
from align.config import Config, WorldConfig
from align.log import get_logger
from align.manifest import JobManifest
from align.runtime import init_ray
from pipelines.common import run_job

log = get_logger("make_world")


def world_dir(config: Config) -> str:
    return config.path("world")


def _render_and_write(cfg: WorldConfig, shard: int, images_dir: str) -> pa.Table:
    """Ray task: render one shard, write its images, return its ground truth (small)."""
    images, ground_truth = world.render_shard(cfg, shard)
    io.write_parquet(images, f"{images_dir}/shard-{shard:05d}.parquet")
    return ground_truth


def make_world(config: Config) -> dict:
    import ray

    out = world_dir(config)
    images_dir = f"{out}/images"
    manifest = JobManifest("make_world", config)
    init_ray(config.ray)
    n_shards = world.num_shards(config.world)

    # A re-run with fewer images must not leave shards of the old run behind.
    io.delete_files_except(
        images_dir, ".parquet", {f"shard-{i:05d}.parquet" for i in range(n_shards)}
    )

    log.info("rendering %d images in %d shards", config.world.num_images, n_shards)
    render = ray.remote(num_cpus=1)(_render_and_write)
    with manifest.stage("render"):
        refs = [render.remote(config.world, i, images_dir) for i in range(n_shards)]
        ground_truth = pa.concat_tables(ray.get(refs))
    with manifest.stage("write"):
        io.write_parquet(ground_truth, f"{out}/ground_truth.parquet")
        queries = world.make_queries(config.world)
        io.write_parquet(queries, f"{out}/queries.parquet")
    splits = queries.column("split").to_pylist()
    manifest.extra["world"] = {
        "shards": n_shards,
        "images": ground_truth.num_rows,
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
