"""make_world: render the synthetic aesthetic world (images, ground truth, queries).

    python -m pipelines.make_world --config configs/demo.yaml [world.seed=3 ...]

Writes under `{output_dir}/world/`: `images/shard-*.parquet` (the corpus, the images contract:
encoded JPEG bytes and captions; no image of an unseen family), `heldout_images/shard-*.parquet`
(image-caption pairs outside the corpus, never trained on: evaluate's recall@k),
`pretrain_images/shard-*.parquet` (world.pretrain_images pairs apart from both, to pretrain the
base as the web does a real CLIP), `finetune_captions/shard-*.parquet` (those pairs less the unseen
families: the fine-tune's captions), `eval_images/shard-*.parquet` (the evaluation gallery, every
family, never trained on), `ground_truth.parquet` (of the corpus), `eval_ground_truth.parquet` (of
the gallery), `queries.parquet`, `hpir.parquet` (the HPIR protocol's file, rows drawn from the
gallery), `ratings.parquet` (people's ratings of a share of the corpus, for train_scorer) and
`_manifest.json`. Shards are rendered in parallel, one Ray task each, and are a pure function of
(world config, set, shard index).
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


def _render_and_write(
    cfg: WorldConfig, shard: int, images_dir: str, part: str, trained_dir: str | None
) -> pa.Table:
    """Ray task: render one shard, write its images (and, to `trained_dir`, those of trained
    families), return its ground truth (small)."""
    images, ground_truth = world.render_shard(cfg, shard, part)
    io.write_parquet(images, f"{images_dir}/shard-{shard:05d}.parquet")
    if trained_dir:
        trained = world.trained_family_rows(cfg, images, ground_truth)
        io.write_parquet(trained, f"{trained_dir}/shard-{shard:05d}.parquet")
    return ground_truth


def _clear_stale(folder: str, n_shards: int) -> None:
    """A re-run with fewer images must not leave shards of the old run behind."""
    io.delete_files_except(folder, ".parquet", {f"shard-{i:05d}.parquet" for i in range(n_shards)})


def write_gallery_truth(out: str, parts: list[pa.Table]) -> pa.Table | None:
    """The evaluation gallery's ground truth, written (None without a gallery: the HPIR rows then
    come from the corpus, where only held-out queries find images)."""
    path = f"{out}/{paths.EVAL_GROUND_TRUTH}"
    if not parts:
        if io.exists(path):  # a stale one from a run with a gallery
            io.delete_file(path)
        return None
    truth = pa.concat_tables(parts)
    io.write_parquet(truth, path)
    return truth


def make_world(config: Config) -> dict:
    out = config.job_output("world")
    manifest = JobManifest("make_world", config, output=out)  # removes a stale manifest
    init_ray(config.ray)
    render = ray.remote(num_cpus=1)(_render_and_write)
    refs = {}
    for part in world.PARTS:
        images_dir = f"{out}/{world.PARTS[part].folder}"
        n_shards = world.num_shards(config.world, part)
        _clear_stale(images_dir, n_shards)
        trained_dir = f"{out}/{paths.FINETUNE_CAPTIONS}" if part == "pretrain" else None
        if trained_dir:
            _clear_stale(trained_dir, n_shards)
        refs[part] = [
            render.remote(config.world, i, images_dir, part, trained_dir) for i in range(n_shards)
        ]
    log.info(
        "rendering %d corpus, %d held-out, %d pretraining and %d evaluation images",
        config.world.num_images,
        config.world.heldout_images,
        config.world.pretrain_images,
        world.part_size(config.world, "eval"),
    )
    with manifest.stage("render"):
        ground_truth = pa.concat_tables(ray.get(refs["corpus"]))
        eval_parts = ray.get(refs["eval"])
        ray.get(refs["heldout"] + refs["pretrain"])
    with manifest.stage("write"):
        io.write_parquet(ground_truth, f"{out}/{paths.GROUND_TRUTH}")
        gallery_truth = write_gallery_truth(out, eval_parts)
        gallery_truth = ground_truth if gallery_truth is None else gallery_truth
        queries = world.make_queries(config.world)
        io.write_parquet(queries, f"{out}/{paths.QUERIES}")
        hpir = world.make_hpir(config.world, gallery_truth, queries)
        io.write_parquet(hpir, f"{out}/{paths.HPIR}")
        ratings = world.make_ratings(config.world, ground_truth)
        io.write_parquet(ratings, f"{out}/{paths.RATINGS}")
    splits = queries.column("split").to_pylist()
    manifest.extra["world"] = {
        "shards": len(refs["corpus"]),
        "images": ground_truth.num_rows,
        "heldout_images": config.world.heldout_images,
        "pretrain_images": config.world.pretrain_images,
        "eval_images": world.part_size(config.world, "eval"),
        "unseen_families": sorted(" ".join(f) for f in world.unseen_families(config.world)),
        "hpir_items": hpir.num_rows,
        "rated_images": ratings.num_rows,
        "queries": {s: splits.count(s) for s in ("train", "heldout", "unseen")},
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
