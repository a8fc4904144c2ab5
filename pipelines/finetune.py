"""finetune: Ray Train fine-tune of the CLIP model (docs/method.md, Retrieval DPO).

    python -m pipelines.finetune --config configs/demo.yaml [key=value ...]

objective dpo (alignment):       pairs shards -> checks -> + image bytes (broadcast or hash
                                 join) -> decode -> tokenize the query
                                 caption shards -> checks -> decode -> tokenize  (lambda > 0)
objective contrastive (pretrain): caption shards -> checks -> decode -> tokenize
  (the streams: pipelines/finetune_streams.py)
  -> TorchTrainer (DeepSpeed ZeRO or DDP) with the streams as Ray Train datasets
  -> {output}/model.pt (open_clip loads it), metrics.jsonl + metrics.png, errors/, _manifest.json

Before training, every pair and caption row is checked (its images present and decodable, finite
reference similarities, a non-empty text, pairs made by the configured model); rows that fail go
to the error table, so rows in = rows trained on + error rows. Checkpoints go to {output}/ray; a
restarted worker group or a second run with the same output resumes from the latest one.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.expressions import col
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from actors.decode import check_decode_stage, concat_checks
from align.config import Config, config_to_dict
from align.data.contracts import IMAGES, require_columns
from align.data.error_rows import write_error_rows
from align.log import get_logger
from align.models.clip import check_model, model_id
from align.runtime.cli import run_job
from align.runtime.manifest import JobManifest
from align.runtime.resume import start_over_if_inputs_changed
from align.runtime.session import init_ray
from align.runtime.stages import decoded_once_if_small
from align.storage import io, paths
from align.train.pair_checks import (
    Stream,
    image_problems,
    pair_errors,
    parquet_dataset,
    read_pairs,
    require_rows,
    usable_pairs,
)
from align.train.steps import NonFiniteLoss, plot_metrics, read_metrics_jsonl, throughput
from align.train.trainer import SUMMARY_FILE, train_loop_per_worker
from pipelines.finetune_streams import caption_stream, pair_stream

log = get_logger("finetune")


# ---------------------------------------------------------------------------------------------
# Checks before training: every input row is either trained on or an error row.


def check_images(
    config: Config, sizes: dict, uri: str, ids: pa.Array | None, keep_bytes: bool = False
):
    """Decode-check images (all of them, or those in `ids`) in Ray Data.

    Returns:
        (checks, blocks): checks is (image_id, status, error, has_caption, nbytes) for every
        image found, in the driver; blocks, with keep_bytes, are object-store refs to
        (image_id, image, status) blocks for a broadcast to the pair stage (else None).
    """

    cfg = config.finetune
    dataset = parquet_dataset(uri, "images")
    require_columns(IMAGES, dataset.schema.names, "finetune.read_images", ["image_id", "image"])
    columns = ["image_id", "image"] + (["caption"] if "caption" in dataset.schema.names else [])
    ds = ray.data.read_parquet(uri).select_columns(columns)
    if ids is not None:
        ds = ds.filter(expr=col("image_id").is_in(ids.to_pylist()))  # pushed down to the read

    checked_ds = check_decode_stage(ds, cfg.decode, sizes, keep_bytes)
    if not keep_bytes:
        return concat_checks(ray.get(checked_ds.to_arrow_refs())), None
    checked_ds = checked_ds.materialize()  # the bytes stay in the object store
    checks = checked_ds.drop_columns(["image"]).to_arrow_refs()
    blocks = checked_ds.select_columns(["image_id", "image", "status"]).to_arrow_refs()
    return concat_checks(ray.get(checks)), blocks


# ---------------------------------------------------------------------------------------------
# The job


def prepare_pairs(config: Config, sizes: dict, pairs: pa.Table) -> Stream:
    """Check the pairs' images (present, decodable) and rows; the stream of usable pairs."""
    cfg = config.finetune
    wanted = pc.unique(
        pa.concat_arrays(
            [pairs["chosen_id"].combine_chunks(), pairs["rejected_id"].combine_chunks()]
        )
    )
    checks, blocks = check_images(
        config, sizes, config.expand(cfg.images), wanted, keep_bytes=cfg.pair_images != "join"
    )
    image_mb = pc.sum(checks["nbytes"]).as_py() / 2**20 if checks.num_rows else 0.0
    broadcast = cfg.pair_images == "broadcast" or (
        cfg.pair_images == "auto" and image_mb <= cfg.broadcast_max_mb
    )
    log.info(
        "pairs' images: %.1f MB, attached by %s",
        image_mb,
        "broadcast" if broadcast else "hash join",
    )
    problems = image_problems(checks, wanted)
    bad_images = pa.array(sorted(problems), pa.string())
    keep = usable_pairs(pairs, bad_images)
    usable = int(pc.sum(keep).as_py() or 0)
    require_rows(usable, cfg.pairs_per_batch, "pairs_per_batch", cfg.scaling.num_workers, "pairs")
    keep_ids = pc.filter(wanted, pc.invert(pc.is_in(wanted, bad_images)))
    dataset = pair_stream(
        config, sizes, pairs.filter(keep), keep_ids, blocks if broadcast else None
    )
    errors = pair_errors(pairs, keep, problems)
    return Stream(dataset, pairs.num_rows, usable, errors, images_per_row=2)


def prepare_captions(config: Config, sizes: dict) -> Stream:
    """Check every caption row (a caption, a decodable image); the stream of usable ones."""
    cfg = config.finetune
    checked, _ = check_images(config, sizes, config.expand(cfg.captions), None)
    problems = image_problems(checked, None)
    no_caption = pc.filter(checked["image_id"], pc.invert(checked["has_caption"]))
    for image_id in no_caption.to_pylist():
        problems.setdefault(image_id, "empty caption")
    usable = checked.num_rows - len(problems)
    require_rows(
        usable, cfg.captions_per_batch, "captions_per_batch", cfg.scaling.num_workers, "captions"
    )
    errors = [{"row_id": i, "stage": "check_captions", "error": e} for i, e in problems.items()]
    dataset = caption_stream(config, sizes, pa.array(sorted(problems), pa.string()))
    return Stream(dataset, checked.num_rows, usable, errors)


def check_inputs(config: Config, manifest: JobManifest) -> dict[str, Stream]:
    """Read and check every input row, then the training streams of the usable ones. The pairs
    are read before Ray starts (a wrong file fails fast)."""
    cfg = config.finetune
    # Images are decoded at the model's input size; checked once, used by every stage.
    sizes = {
        "image_size": check_model(config.model).image_size,
        "max_pixels": config.max_image_pixels,
    }
    streams: dict[str, Stream] = {}
    with manifest.stage("check_inputs"):
        pairs = read_pairs(config.expand(cfg.pairs), config.model) if cfg.uses_pairs else None
        init_ray(config.ray)
        if pairs is not None:
            streams["pairs"] = prepare_pairs(config, sizes, pairs)
        if cfg.uses_captions:
            streams["captions"] = prepare_captions(config, sizes)
    with manifest.stage("cache_decoded"):  # small streams: decoded once, not every epoch
        cap = cache_cap_mb(cfg.cache_decoded_mb)
        for name, s in streams.items():
            # A Dataset keeps the options it was made with; materialize reads them here.
            s.dataset.context.execution_options.preserve_order = cfg.preserve_order
            mb = s.rows_out * s.images_per_row * sizes["image_size"] ** 2 * 3 / 2**20
            s.dataset = decoded_once_if_small(s.dataset, mb, cap, cfg.seed, name)
    return streams


def cache_cap_mb(configured_mb: int) -> int:
    """finetune.cache_decoded_mb on one node; 0 (decode every epoch) on several. Cached blocks
    live in the object stores of the nodes that made them: when one of those nodes is lost, the
    restarted workers need them rebuilt, which Ray's lineage replay of the decode tasks could not
    do here (StreamingGeneratorReplayInconsistentError, benchmarks/chaos.py); a stream read again
    from storage every epoch has nothing to lose."""

    nodes = sum(n["Alive"] for n in ray.nodes())
    if nodes > 1 and configured_mb:
        log.info(
            "%d nodes: training streams are decoded every epoch (a lost node's cached blocks "
            "could not be rebuilt)",
            nodes,
        )
        return 0
    return configured_mb


def make_trainer(config: Config, datasets: dict, out: str):
    """The TorchTrainer: the worker loop (align/train/trainer.py), its scaling, and run
    storage under {out}/ray, where checkpoints are kept and a restart resumes from."""

    cfg, scaling = config.finetune, config.finetune.scaling
    # Ray Train replaces each dataset's options with these when it splits it over the workers.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = cfg.preserve_order
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        train_loop_per_worker,
        # Paths resolved here: Ray Train runs each worker in a working directory of its own
        # (os.chdir into the run's folder), where a relative path names another place.
        train_loop_config={"config": config_to_dict(config.for_other_processes()), "output": out},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name="run",
            storage_path=f"{out}/ray",
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all", execution_options=ingest),
    )


def train(
    config: Config, datasets: dict, out: str, manifest: JobManifest, section: str = "finetune"
) -> dict:
    """Fit, then read what rank 0 wrote: the summary and the metrics (plotted)."""

    trainer = make_trainer(config, datasets, out)
    # Settings that change the trained weights differ from the last run's: its checkpoints go.
    manifest.extra["started_over_for"] = start_over_if_inputs_changed(config, out, section)
    summary_path = f"{out}/{SUMMARY_FILE}"
    io.delete_file(summary_path)  # read this run's summary after fit, never a stale one
    with manifest.stage("train"):
        trainer.fit()
    if not io.exists(summary_path):  # a bug, not the user's input: keep the traceback
        raise RuntimeError(
            f"Ray Train finished but rank 0 wrote no {summary_path}: the training loop ended "
            f"without its finish() (see the workers' logs)"
        )
    summary = io.read_json(summary_path)
    cfg = config.finetune
    records = read_metrics_jsonl(io.read_bytes(f"{out}/metrics.jsonl"))
    io.write_bytes(
        f"{out}/metrics.png",
        plot_metrics(records, f"finetune ({cfg.objective}, {cfg.backend}) {config.model.name}"),
    )
    if summary.get("stopped"):
        raise NonFiniteLoss(f"training stopped at step {summary['step']}: {summary['stopped']}")
    return {**summary, "records": records}


def finetune(config: Config, section: str = "finetune") -> dict:
    """The job; `section` names the config section it was given as `finetune` (pretrain's), for
    messages."""
    cfg = config.finetune
    out = config.job_output("finetune")
    manifest = JobManifest("finetune", config, output=out)  # removes a stale manifest
    streams = check_inputs(config, manifest)
    errors = [e for s in streams.values() for e in s.errors]
    rows_in = sum(s.rows_in for s in streams.values())
    rows_out = sum(s.rows_out for s in streams.values())
    write_error_rows(errors, f"{out}/errors")
    log.info("%d rows in, %d to train on, %d error rows", rows_in, rows_out, len(errors))
    datasets = {name: s.dataset for name, s in streams.items()}
    summary = train(config, datasets, out, manifest, section)
    records = summary["records"]
    manifest.extra.update(
        {
            "objective": cfg.objective,
            "backend": cfg.backend,
            "model": model_id(config.model),
            "export": f"{out}/{paths.MODEL_FILE}",
            "steps": summary.get("step"),
            "skipped_steps": summary.get("skipped_steps"),
            "resumed_from": summary.get("resumed_from"),
            "subnormals_flushed": summary.get("subnormals_flushed"),
            "final": records[-1] if records else None,
            "throughput": throughput(records),
        }
    )
    result = manifest.write(out, rows_in=rows_in, rows_out=rows_out, rows_error=len(errors))
    log.info(
        "trained %s steps (%s skipped); model at %s/%s",
        summary.get("step"),
        summary.get("skipped_steps"),
        out,
        paths.MODEL_FILE,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return run_job("finetune", finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
