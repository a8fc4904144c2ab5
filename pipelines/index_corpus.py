"""index_corpus: batch re-scoring of an image corpus, and the FAISS index over it.

    python -m pipelines.index_corpus --config configs/demo.yaml [key=value ...]

read (Parquet with bytes or paths | image folder | WebDataset tars)
  -> decode + resize (CPU tasks, uint8) -> CLIP image embedding (actor pool)
  -> aesthetic scoring (actor pool) -> staged Parquet, one folder per unit of input
then: z-score every scorer over the corpus and combine -> `scored/` and `errors/` shards
(the `scored` and `errors` contracts) -> FAISS index(es) + id map + `_index.json` -> manifest.

Input files are grouped into units. A unit's staged output is marked done only when complete, so a
re-run after a kill redoes only the unfinished units and duplicates nothing.
"""

from __future__ import annotations

import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.data.context import DEFAULT_TARGET_MAX_BLOCK_SIZE

from actors.decode import decode_stage
from actors.embed import image_embed_stage
from actors.score import score_stage, scored_to_arrow
from align.config import Config, IndexCorpusConfig
from align.data.contracts import SCORED, SCORER_COLUMN_PREFIX, conform
from align.data.error_rows import write_error_rows
from align.data.sources import (
    NOT_DOWNLOADED,
    count_input_rows,
    not_downloaded_rows,
    parquet_image_layout,
    plan_units,
    read_tars,
    source_columns,
    stats_failed_downloads,
    struct_bytes,
)
from align.errors import InputNotFound
from align.log import get_logger
from align.models import aesthetics
from align.models.clip import ModelFacts, check_model, model_id
from align.runtime.cli import run_job
from align.runtime.manifest import JobManifest
from align.runtime.progress import JobProgress
from align.runtime.resume import DONE_MARKER, finished_units, unit_done, unit_inputs
from align.runtime.session import again_if_failed_inside_ray, init_ray
from align.runtime.stages import pool_for_blocks
from align.search.build import exact_duplicates, write_index
from align.search.stored import DUPLICATES_FILE
from align.storage import io

log = get_logger("index_corpus")


# ---------------------------------------------------------------------------------------------
# Input: units of work


def read_unit(ic: IndexCorpusConfig, files: list[str], source: str, layout: str | None = None):
    """A Ray Dataset of (image_id, image bytes or path) for one unit."""

    if ic.input_format == "parquet":
        column = ic.image_column if ic.image_column else ic.path_column
        extra = source_columns(files)
        ds = ray.data.read_parquet(files, num_cpus=ic.decode.num_cpus).select_columns(
            list(dict.fromkeys([ic.id_column, column, *extra]))
        )
        if "status" in extra:  # img2dataset's parquet output: failed downloads are rows
            ds = ds.map_batches(not_downloaded_rows, batch_format="pyarrow")
        if layout == "struct":  # parquet_image_layout, checked once for every file before work
            ds = ds.map_batches(struct_bytes, fn_kwargs={"column": column}, batch_format="pyarrow")
        if ic.id_column != "image_id":
            ds = ds.rename_columns({ic.id_column: "image_id"})
        return ds
    if ic.input_format == "webdataset":
        return ray.data.from_items([{"path": f} for f in files]).map_batches(
            read_tars,
            fn_kwargs={"max_member_bytes": ic.max_member_bytes, "tar_timeout_s": ic.tar_timeout_s},
            batch_size=1,
            batch_format="numpy",
            num_cpus=ic.decode.num_cpus,
        )
    root = source.rstrip("/") + "/"
    return ray.data.from_items([{"image_id": f.removeprefix(root), "path": f} for f in files])


# ---------------------------------------------------------------------------------------------
# The per-unit pipeline


def unit_pipeline(
    config: Config, files: list[str], source: str, model: ModelFacts, layout, rows: int | None
):
    """read -> decode (tasks) -> embed (actor pool) -> score (actor pool) -> Arrow, for a unit
    of `rows` input rows (None: not known before reading)."""
    ic = config.index_corpus
    scorers = {name: s.checkpoint for name, s in ic.scorers.items()}
    parquet = ic.input_format == "parquet"
    ds = read_unit(ic, files, source, layout)
    # The context is this dataset's own (and its descendants'), not the process's.
    decoded_image_bytes = model.image_size**2 * 3
    ray_bound = ds.context.target_max_block_size or DEFAULT_TARGET_MAX_BLOCK_SIZE
    block_bytes = min(ray_bound, ic.block_images * decoded_image_bytes)
    ds.context.target_max_block_size = block_bytes
    blocks = None if rows is None else -(-rows // max(1, block_bytes // decoded_image_bytes))
    ds = decode_stage(
        ds,
        ic.decode,
        image_size=model.image_size,
        max_pixels=config.max_image_pixels,
        image_column=ic.image_column if parquet else "image",
        path_column=ic.path_column if parquet else "path",
    )
    ds = image_embed_stage(ds, config.model, pool_for_blocks(ic.embed, blocks))
    ds = score_stage(ds, scorers, model.embed_dim, pool_for_blocks(ic.score, blocks))
    return ds.map_batches(
        scored_to_arrow, batch_format="numpy", batch_size=None, num_cpus=ic.decode.num_cpus
    )


def write_unit(
    config: Config,
    files: list[str],
    source: str,
    unit_dir: str,
    model: ModelFacts,
    layout,
    rows: int | None,
) -> None:
    """The unit's pipeline written into an empty `unit_dir`, run again from an empty folder when
    it failed inside Ray (index_corpus.unit_retries)."""

    def attempt():
        io.empty_dir(unit_dir)  # what a killed run or a failed attempt left is started over
        unit_pipeline(config, files, source, model, layout, rows).write_parquet(unit_dir)

    again_if_failed_inside_ray(attempt, config.index_corpus.unit_retries, f"unit {unit_dir}")


def run_unit(
    config: Config, files: list[str], source: str, unit_dir: str, model: ModelFacts, layout=None
) -> dict:
    """Decode, embed and score one unit into `unit_dir`, then mark it done (align/runtime/resume.py)."""
    ic = config.index_corpus
    t0 = time.perf_counter()
    expected = count_input_rows(ic, files)
    write_unit(config, files, source, unit_dir, model, layout, expected)
    score_columns = [SCORER_COLUMN_PREFIX + n for n in ic.scorers]
    staged = io.read_parquet(unit_dir, columns=["status", "error", *score_columns])
    ok = int(pc.sum(pc.equal(staged["status"], "ok")).as_py() or 0)
    # Rows img2dataset listed but never downloaded: error rows (its sidecars name them), plus
    # those only its _stats.json counts.
    not_downloaded = pc.starts_with(pc.fill_null(staged["error"], ""), NOT_DOWNLOADED)
    failed_downloads = int(pc.sum(not_downloaded).as_py() or 0)
    if ic.input_format == "webdataset":
        failed_downloads += stats_failed_downloads(files)
    marker = {
        "files": files,
        "inputs": unit_inputs(config, files),
        "rows_in": expected if expected is not None else staged.num_rows,
        "rows_ok": ok,
        "rows_error": staged.num_rows - ok,
        "failed_downloads": failed_downloads,
        "score_moments": aesthetics.score_moments(
            {n: staged[SCORER_COLUMN_PREFIX + n].to_numpy(zero_copy_only=False) for n in ic.scorers}
        ),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    io.write_json(f"{unit_dir}/{DONE_MARKER}", marker)
    return marker


def embed_and_score(
    config: Config, units, source: str, out: str, model: ModelFacts, layout, progress: JobProgress
):
    """Every unit not already done with the same inputs, each reported to `progress` as it
    finishes; returns the units' folders and markers."""
    unit_dirs, markers = [], []
    for i, files in enumerate(units):
        unit_dir = f"{out}/_staging/unit-{i:05d}"
        marker = unit_done(unit_dir, files, config)
        if marker is None:
            log.info("unit %d/%d: %d file(s)", i + 1, len(units), len(files))
            marker = run_unit(config, files, source, unit_dir, model, layout)
            progress.add(marker["rows_ok"] + marker["rows_error"], marker["rows_error"])
        else:
            log.info("unit %d/%d already done, skipped", i + 1, len(units))
        unit_dirs.append(unit_dir)
        markers.append(marker)
    return unit_dirs, markers


# ---------------------------------------------------------------------------------------------
# Finalise: combined aesthetic across the corpus, contract shards, error table


def finalise_unit(unit_dir: str, out: str, part: int, weights: dict, stats: dict) -> None:
    """Ray task: staged unit -> scored/part-N.parquet and errors/part-N.parquet."""
    table = io.read_parquet(unit_dir)
    names = [c for c in table.column_names if c.startswith(SCORER_COLUMN_PREFIX)]
    columns = {
        n.removeprefix(SCORER_COLUMN_PREFIX): table[n].to_numpy(zero_copy_only=False) for n in names
    }
    combined = aesthetics.combine(columns, weights, stats)
    ok = table["status"].to_numpy(zero_copy_only=False) == "ok"
    combined = pa.array(combined, pa.float32(), mask=~ok)
    table = table.append_column("aesthetic", combined)
    io.write_parquet(
        conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX),
        f"{out}/scored/part-{part:05d}.parquet",
    )
    errors = table.filter(pc.equal(table["status"], "error"))
    errors = pa.table(
        {
            "row_id": errors["image_id"],
            "stage": pc.if_else(
                pc.starts_with(errors["error"], NOT_DOWNLOADED), "download", "decode"
            ),
            "error": errors["error"],
        }
    )
    write_error_rows(errors, f"{out}/errors", part)


def combine(ic: IndexCorpusConfig, unit_dirs: list[str], markers: list[dict], out: str) -> dict:
    """z-score every scorer over the whole corpus (from the units' moments) and write the scored
    and error shards, one Ray task per unit; returns the normalisation."""

    stats = aesthetics.stats_from_moments([m["score_moments"] for m in markers])
    weights = {n: s.weight for n, s in ic.scorers.items()}
    parts = {f"part-{i:05d}.parquet" for i in range(len(unit_dirs))}
    for sub in ("scored", "errors"):
        io.delete_files_except(f"{out}/{sub}", ".parquet", parts)
    task = ray.remote(num_cpus=1)(finalise_unit)
    ray.get([task.remote(d, out, i, weights, stats) for i, d in enumerate(unit_dirs)])
    return stats


# ---------------------------------------------------------------------------------------------
# Index


def build_indexes(config: Config, out: str) -> dict:
    """The sharded index over the scored shards (align.search.build: sampled, trained once, one
    Ray task per shard reading only its own files), its recall against exact search streamed over
    the shards, and the global id map."""
    files = io.list_files(f"{out}/scored", ".parquet")
    if not files:
        raise InputNotFound(
            f"no scored shards in {out}/scored: run index_corpus with steps [embed, index] first"
        )
    index_dir = f"{out}/index"
    # Exact duplicates (equal sha256) are always recorded; left out of the index by config.
    duplicates = exact_duplicates(files)
    io.write_parquet(duplicates, f"{index_dir}/{DUPLICATES_FILE}")
    return write_index(files, index_dir, config.index_corpus.index, config.model, duplicates)


# ---------------------------------------------------------------------------------------------
# The job


def check_inputs(config: Config, source: str) -> tuple[ModelFacts, list[list[str]], str | None]:
    """Fail fast, before any data is read: the model, the scorers, the input and its layout."""
    ic = config.index_corpus
    model = check_model(config.model)
    for name, scorer in ic.scorers.items():
        aesthetics.check_scorer_model(name, scorer.trained_on, model_id(config.model))
        aesthetics.build_scorer(name, scorer.checkpoint, model.embed_dim)
    if "embed" not in ic.steps:  # steps [index]: the scored shards are the input
        return model, [], None
    io.require_exists(source, "index_corpus input")
    units = plan_units(ic, source)
    layout = None
    if ic.input_format == "parquet":
        layout = parquet_image_layout(ic, [f for unit in units for f in unit])
    return model, units, layout


def index_corpus(config: Config) -> dict:
    ic = config.index_corpus
    source, out = config.expand(ic.input), config.job_output("index_corpus")
    manifest = JobManifest("index_corpus", config, output=out)  # removes a stale manifest
    model, units, layout = check_inputs(config, source)

    init_ray(config.ray)
    if "embed" in ic.steps:
        with manifest.stage("embed_and_score"):
            unit_dirs, markers = embed_and_score(
                config, units, source, out, model, layout, manifest.progress
            )
        with manifest.stage("combine"):
            stats = combine(ic, unit_dirs, markers, out)
    else:  # the index again from the scored shards a finished run left (steps: [index])
        unit_dirs, markers = finished_units(config, out)
        stats = aesthetics.stats_from_moments([m["score_moments"] for m in markers])
    with manifest.stage("index"):
        index_manifest = build_indexes(config, out)

    rows_in = sum(m["rows_in"] for m in markers)
    rows_ok = sum(m["rows_ok"] for m in markers)
    rows_error = sum(m["rows_error"] for m in markers)
    failed_downloads = sum(m.get("failed_downloads", 0) for m in markers)
    manifest.extra.update(
        {
            "input": source,
            "units": len(markers),
            # Rows the source listed without an image (img2dataset's failed downloads): error
            # rows where its sidecars name them, counted from its _stats.json otherwise.
            "failed_downloads": failed_downloads,
            "embed_dim": model.embed_dim,
            "aesthetic": {
                "combined": "sum_i w_i * z_i / sum_i w_i, each scorer z-scored over the corpus",
                "weights": {n: s.weight for n, s in ic.scorers.items()},
                "normalisation": stats,
            },
            "index": {k: v for k, v in index_manifest.items() if k != "shards"},
            "images_per_second": round(rows_in / manifest.timings["embed_and_score"], 1)
            if manifest.timings.get("embed_and_score")
            else None,
        }
    )
    result = manifest.write(out, rows_in=rows_in, rows_out=rows_ok, rows_error=rows_error)
    log.info(
        "%d images in: %d scored, %d errors; index %s over %d vectors, recall@10 %.3f",
        rows_in,
        rows_ok,
        rows_error,
        index_manifest["spec"]["type"],
        index_manifest["count"],
        index_manifest["recall_at_10"],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return run_job("index_corpus", index_corpus, argv)


if __name__ == "__main__":
    sys.exit(main())
