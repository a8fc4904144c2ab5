"""finetune: Ray Train fine-tune of the CLIP model (PAPER.md, Finding 2).

    python -m pipelines.finetune --config configs/demo.yaml [key=value ...]

objective dpo (alignment):       pairs shards -> checks -> + image bytes (broadcast or hash
                                 join) -> decode
                                 caption shards -> checks -> decode          (lambda > 0)
objective contrastive (pretrain): caption shards -> checks -> decode
  -> TorchTrainer (DeepSpeed ZeRO or DDP) with the streams as Ray Train datasets
  -> {output}/model.pt (open_clip loads it), metrics.jsonl + metrics.png, errors/, _manifest.json

Before training, every pair and caption row is checked (its images present and decodable, finite
reference similarities, a non-empty text, pairs made by the configured model); rows that fail go
to the error table, so rows in = rows trained on + error rows. Checkpoints go to {output}/ray; a
restarted worker group or a second run with the same output resumes from the latest one.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from align import io
from align.config import Config, ConfigError
from align.contracts import ERRORS, IMAGES, PAIRS, conform, require_columns
from align.errors import InputNotFound
from align.log import get_logger
from align.manifest import JobManifest
from align.models import ModelLoadError, check_model, model_id, weights_fingerprint
from align.runtime import init_ray
from align.training import NonFiniteLoss, plot_metrics, read_metrics_jsonl
from pipelines.common import actor_pool, run_job, task_pool

log = get_logger("finetune")
# What a training worker gets per pair: the query text, both reference similarities, both images.
TRAIN_PAIR_COLUMNS = [
    "query",
    "chosen_ref_sim",
    "rejected_ref_sim",
    "chosen_pixels",
    "rejected_pixels",
]
PAIR_COLUMNS = [
    "query_id",
    "query",
    "chosen_id",
    "rejected_id",
    "chosen_ref_sim",
    "rejected_ref_sim",
]


def output_dir(config: Config) -> str:
    return config.expand(config.finetune.output).rstrip("/")


# ---------------------------------------------------------------------------------------------
# Checks before training: every input row is either trained on or an error row.


def _dataset(uri: str, what: str) -> pads.Dataset:
    io.require_exists(uri, what)
    fs, _ = io.filesystem(uri)
    files = io.list_files(uri, ".parquet") if not io.is_file(uri) else [uri]
    if not files:
        raise InputNotFound(f"no Parquet files in {uri} ({what})")
    return pads.dataset([io.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")


def read_pairs(config: Config) -> pa.Table:
    """The pairs' ids, texts and reference similarities (not the images), checked against the
    contract and the configured model.

    Raises:
        ContractError: a column is missing.
        ModelLoadError: the pairs' reference similarities come from another model.
    """
    uri = config.expand(config.finetune.pairs)
    dataset = _dataset(uri, "pairs (run build_preferences first)")
    require_columns(
        PAIRS, dataset.schema.names, "finetune.read_pairs", [*PAIR_COLUMNS, "reference_model"]
    )
    table = dataset.to_table(columns=[*PAIR_COLUMNS, "reference_model"])
    expected = model_id(config.model)
    found = sorted(set(pc.unique(table["reference_model"]).to_pylist()) - {expected})
    if found:
        raise ModelLoadError(
            f"pairs at {uri} were made with reference model(s) {found} but finetune trains "
            f"{expected!r} (model.name / model.pretrained): the stored reference similarities "
            f"would be another model's; rebuild the pairs with this model"
        )
    return table.drop_columns(["reference_model"])


def check_images(
    config: Config, sizes: dict, uri: str, ids: pa.Array | None, keep_bytes: bool = False
):
    """Decode-check images (all of them, or those in `ids`) in Ray Data.

    Returns:
        (checks, blocks): checks is (image_id, status, error, has_caption, nbytes) for every
        image found, in the driver; blocks, with keep_bytes, are object-store refs to
        (image_id, image, status) blocks for a broadcast to the pair stage (else None).
    """
    import ray.data
    from ray.data.expressions import col

    from actors.decode import decode_batch

    cfg = config.finetune
    dataset = _dataset(uri, "images")
    require_columns(IMAGES, dataset.schema.names, "finetune.read_images", ["image_id", "image"])
    columns = ["image_id", "image"] + (["caption"] if "caption" in dataset.schema.names else [])
    ds = ray.data.read_parquet(uri).select_columns(columns)
    if ids is not None:
        ds = ds.filter(expr=col("image_id").is_in(ids.to_pylist()))  # pushed down to the read

    def checked(batch: dict) -> dict:
        decoded = decode_batch(batch, **sizes)
        captions = batch.get("caption")
        has_caption = (
            has_text(pa.array(captions, pa.string())).to_numpy(zero_copy_only=False)
            if captions is not None
            else np.zeros(len(batch["image_id"]), dtype=bool)
        )
        out = {
            "image_id": batch["image_id"],
            "status": decoded["status"],
            "error": decoded["error"],
            "has_caption": has_caption,
            "nbytes": np.array([len(b or b"") for b in batch["image"]], dtype=np.int64),
        }
        if keep_bytes:
            out["image"] = batch["image"]
        return out

    checked_ds = ds.map_batches(checked, batch_format="numpy", **task_pool(cfg.decode))
    if not keep_bytes:
        return _concat(ray.get(checked_ds.to_arrow_refs())), None
    checked_ds = checked_ds.materialize()  # the bytes stay in the object store
    checks = checked_ds.drop_columns(["image"]).to_arrow_refs()
    blocks = checked_ds.select_columns(["image_id", "image", "status"]).to_arrow_refs()
    return _concat(ray.get(checks)), blocks


def _concat(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table(
            {
                "image_id": pa.array([], pa.string()),
                "status": pa.array([], pa.string()),
                "error": pa.array([], pa.string()),
                "has_caption": pa.array([], pa.bool_()),
                "nbytes": pa.array([], pa.int64()),
            }
        )
    return pa.concat_tables(tables, promote_options="permissive")


def pair_row_ids(pairs: pa.Table) -> list[str]:
    return [
        f"{q}:{c}>{r}"
        for q, c, r in zip(
            pairs["query_id"].to_pylist(),
            pairs["chosen_id"].to_pylist(),
            pairs["rejected_id"].to_pylist(),
            strict=True,
        )
    ]


def has_text(texts) -> pa.Array:
    """Boolean per row: a string with more than whitespace (null is False). The one rule for
    empty queries and captions, in the checks and in the streams."""
    trimmed = pc.utf8_length(pc.utf8_trim_whitespace(texts))
    return pc.fill_null(pc.greater(trimmed, 0), False)


def usable_pairs(pairs: pa.Table, bad_images: pa.Array) -> pa.Array:
    """Boolean mask of the pairs that can be trained on: both images good, both reference
    similarities finite, a non-empty query. The driver's accounting and the training stream's
    filter both use it, so they agree."""
    finite = pc.and_(pc.is_finite(pairs["chosen_ref_sim"]), pc.is_finite(pairs["rejected_ref_sim"]))
    images_ok = pc.invert(
        pc.or_(pc.is_in(pairs["chosen_id"], bad_images), pc.is_in(pairs["rejected_id"], bad_images))
    )
    return pc.fill_null(pc.and_(pc.and_(finite, images_ok), has_text(pairs["query"])), False)


def pair_errors(pairs: pa.Table, keep: pa.Array, image_errors: dict[str, str]) -> list[dict]:
    bad = pairs.filter(pc.invert(keep))
    errors = []
    for row_id, c, r, cs, rs, q in zip(
        pair_row_ids(bad),
        bad["chosen_id"].to_pylist(),
        bad["rejected_id"].to_pylist(),
        bad["chosen_ref_sim"].to_pylist(),
        bad["rejected_ref_sim"].to_pylist(),
        bad["query"].to_pylist(),
        strict=True,
    ):  # error rows only: usually few
        if c in image_errors or r in image_errors:
            which = c if c in image_errors else r
            reason = f"image {which}: {image_errors[which]}"
        elif not q or not str(q).strip():
            reason = "empty query"
        else:
            reason = f"non-finite reference similarity (chosen {_num(cs)}, rejected {_num(rs)})"
        errors.append({"row_id": row_id, "stage": "check_pairs", "error": reason})
    return errors


def _num(x: float | None) -> str:
    return "missing" if x is None else f"{x:.4g}"


def image_problems(checked: pa.Table, wanted: pa.Array | None) -> dict[str, str]:
    """image_id -> reason, for wanted images that are missing or do not decode."""
    bad = checked.filter(pc.not_equal(checked["status"], "ok"))
    problems = dict(zip(bad["image_id"].to_pylist(), bad["error"].to_pylist(), strict=True))
    if wanted is not None:
        missing = pc.filter(wanted, pc.invert(pc.is_in(wanted, checked["image_id"])))
        problems.update({i: "missing from the images table" for i in missing.to_pylist()})
    return problems


# ---------------------------------------------------------------------------------------------
# The streams


def parquet_files_stream(files: list[str], columns: list[str], num_cpus: float):
    """Read Parquet files in Ray tasks of `num_cpus` each, one file per block.

    The training streams read this way rather than with ray.data.read_parquet, whose file-listing
    task reserves a whole CPU: beside CPU training workers on a small machine it never gets one.
    """
    import ray.data

    def read(batch: dict) -> pa.Table:
        return pa.concat_tables([io.read_parquet(f, columns=columns) for f in batch["path"]])

    paths = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return paths.map_batches(read, batch_size=1, batch_format="numpy", num_cpus=num_cpus)


def pair_stream(config: Config, sizes: dict, pairs: pa.Table, keep_ids: pa.Array, image_blocks):
    """The usable pairs (already read by the driver) with both images attached and decoded in
    the data pipeline: from broadcast blocks of the checked images when given, else by two hash
    joins with the images table."""
    import ray.data

    from actors.decode import decode_columns
    from actors.pair_images import PairImageDecoder

    cfg = config.finetune
    step = max(cfg.decode.batch_size, 1)
    ds = ray.data.from_arrow([pairs.slice(i, step) for i in range(0, pairs.num_rows, step)])
    if image_blocks is not None:
        return ds.map_batches(
            PairImageDecoder,
            fn_constructor_kwargs={"image_blocks": image_blocks, **sizes},
            batch_format="pyarrow",
            **actor_pool(cfg.decode),
        ).select_columns(TRAIN_PAIR_COLUMNS)
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
    return ds.map_batches(
        decode_columns,
        fn_kwargs={
            "columns": {"chosen_image": "chosen_pixels", "rejected_image": "rejected_pixels"},
            **sizes,
        },
        batch_format="numpy",
        **task_pool(cfg.decode),
    ).select_columns(TRAIN_PAIR_COLUMNS)


def caption_stream(config: Config, sizes: dict, bad_images: pa.Array):
    """Image-caption rows with a caption and a good image, decoded in the data pipeline."""
    from actors.decode import decode_columns

    cfg = config.finetune
    files = io.list_files(config.expand(cfg.captions), ".parquet")
    ds = parquet_files_stream(files, ["image_id", "image", "caption"], cfg.decode.num_cpus)

    def usable(t: pa.Table) -> pa.Table:
        keep = pc.and_(has_text(t["caption"]), pc.invert(pc.is_in(t["image_id"], bad_images)))
        return t.filter(keep).select(["image", "caption"])

    return ds.map_batches(usable, batch_format="pyarrow").map_batches(
        decode_columns,
        fn_kwargs={"columns": {"image": "pixels"}, **sizes},
        batch_format="numpy",
        **task_pool(cfg.decode),
    )


# ---------------------------------------------------------------------------------------------
# The job


def _require_rows(rows: int, per_batch: int, key: str, workers: int, what: str) -> None:
    if rows < per_batch * workers:
        raise ConfigError(
            f"{rows} usable {what} cannot fill one step: finetune.{key}={per_batch} x "
            f"finetune.scaling.num_workers={workers} needs at least {per_batch * workers}"
        )


@dataclass
class Stream:
    """One training stream after its checks: the Ray dataset and its row accounting."""

    dataset: object
    rows_in: int
    rows_out: int
    errors: list[dict]


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
    _require_rows(usable, cfg.pairs_per_batch, "pairs_per_batch", cfg.scaling.num_workers, "pairs")
    keep_ids = pc.filter(wanted, pc.invert(pc.is_in(wanted, bad_images)))
    dataset = pair_stream(
        config, sizes, pairs.filter(keep), keep_ids, blocks if broadcast else None
    )
    return Stream(dataset, pairs.num_rows, usable, pair_errors(pairs, keep, problems))


def prepare_captions(config: Config, sizes: dict) -> Stream:
    """Check every caption row (a caption, a decodable image); the stream of usable ones."""
    cfg = config.finetune
    checked, _ = check_images(config, sizes, config.expand(cfg.captions), None)
    problems = image_problems(checked, None)
    no_caption = pc.filter(checked["image_id"], pc.invert(checked["has_caption"]))
    for image_id in no_caption.to_pylist():
        problems.setdefault(image_id, "empty caption")
    usable = checked.num_rows - len(problems)
    _require_rows(
        usable, cfg.captions_per_batch, "captions_per_batch", cfg.scaling.num_workers, "captions"
    )
    errors = [{"row_id": i, "stage": "check_captions", "error": e} for i, e in problems.items()]
    dataset = caption_stream(config, sizes, pa.array(sorted(problems), pa.string()))
    return Stream(dataset, checked.num_rows, usable, errors)


def finetune(config: Config) -> dict:
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from align.config import config_to_dict
    from pipelines.finetune_worker import SUMMARY_FILE, train_loop_per_worker

    cfg = config.finetune
    out = output_dir(config)
    manifest = JobManifest("finetune", config, output=out)  # removes a stale manifest
    # Images are decoded at the model's input size; checked once, used by every stage.
    sizes = {
        "image_size": check_model(config.model).image_size,
        "max_pixels": config.index_corpus.max_image_pixels,
    }
    streams: dict[str, Stream] = {}
    with manifest.stage("check_inputs"):
        pairs = read_pairs(config) if cfg.uses_pairs else None  # before Ray starts
        init_ray(config.ray)
        if pairs is not None:
            streams["pairs"] = prepare_pairs(config, sizes, pairs)
        if cfg.uses_captions:
            streams["captions"] = prepare_captions(config, sizes)
    errors = [e for s in streams.values() for e in s.errors]
    rows_in = sum(s.rows_in for s in streams.values())
    rows_out = sum(s.rows_out for s in streams.values())
    datasets = {name: s.dataset for name, s in streams.items()}
    io.write_parquet(
        conform(pa.Table.from_pylist(errors, schema=ERRORS.schema), ERRORS),
        f"{out}/errors/part-00000.parquet",
    )
    log.info("%d rows in, %d to train on, %d error rows", rows_in, rows_out, len(errors))

    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        # Paths resolved here: Ray Train runs each worker in a working directory of its own
        # (os.chdir into the run's folder), where a relative path names another place.
        train_loop_config={"config": config_to_dict(config.for_other_processes()), "output": out},
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name="run",
            storage_path=f"{out}/ray",
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    start_over_if_inputs_changed(config, out)
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
    records = read_metrics_jsonl(io.read_bytes(f"{out}/metrics.jsonl"))
    io.write_bytes(
        f"{out}/metrics.png",
        plot_metrics(records, f"finetune ({cfg.objective}, {cfg.backend}) {config.model.name}"),
    )
    if summary.get("stopped"):
        raise NonFiniteLoss(f"training stopped at step {summary['step']}: {summary['stopped']}")
    manifest.extra.update(
        {
            "objective": cfg.objective,
            "backend": cfg.backend,
            "model": model_id(config.model),
            "export": f"{out}/model.pt",
            "steps": summary.get("step"),
            "skipped_steps": summary.get("skipped_steps"),
            "resumed_from": summary.get("resumed_from"),
            "final": records[-1] if records else None,
            "throughput": throughput(records),
        }
    )
    result_manifest = manifest.write(
        out, rows_in=rows_in, rows_out=rows_out, rows_error=len(errors)
    )
    log.info(
        "trained %s steps (%s skipped); model at %s/model.pt",
        summary.get("step"),
        summary.get("skipped_steps"),
        out,
    )
    return result_manifest


RUN_INPUTS = "_run_inputs.json"


def run_inputs(config: Config) -> dict:
    """What a run's checkpoints depend on. A second run with the same output resumes only when
    these are unchanged; max_steps and the schedule may change (train longer)."""
    cfg = config.finetune

    def sizes(uri: str) -> list:
        if not io.exists(uri):
            return []
        files = [uri] if io.is_file(uri) else io.list_files(uri, ".parquet")
        return [[f, io.filesystem(f)[0].get_file_info(io.filesystem(f)[1]).size] for f in files]

    return {
        "weights": weights_fingerprint(config.model),
        "objective": cfg.objective,
        "backend": cfg.backend,
        "zero_stage": cfg.deepspeed.zero_stage,
        "num_workers": cfg.scaling.num_workers,
        "pairs": sizes(config.expand(cfg.pairs)) if cfg.uses_pairs else [],
        "captions": sizes(config.expand(cfg.captions)),
    }


def start_over_if_inputs_changed(config: Config, out: str) -> None:
    current = run_inputs(config)
    path = f"{out}/{RUN_INPUTS}"
    if io.exists(path) and io.read_json(path) != current and io.exists(f"{out}/ray"):
        log.warning("inputs or model changed since the run in %s: starting over", out)
        io.empty_dir(f"{out}/ray")  # ours: our own _run_inputs.json sits beside it
    io.write_json(path, current)


def throughput(records: list[dict], warmup: int = 2) -> dict:
    """Median pairs/s and captions/s over the steps after the first `warmup` (compilation,
    stream start-up)."""
    timed = [r for r in records[warmup:] if r.get("time_s")] or records
    if not timed:
        return {}
    step_s = statistics.median(r["time_s"] for r in timed)
    return {
        "step_s": round(step_s, 4),
        "pairs_per_s": round(timed[-1]["pairs"] / step_s, 2),
        "captions_per_s": round(timed[-1]["captions"] / step_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    return run_job("finetune", finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
