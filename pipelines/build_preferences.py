"""build_preferences: the paper's preference-data construction
(docs/method.md, Preference data).

    python -m pipelines.build_preferences --config configs/demo.yaml [key=value ...]

In: a query file (`build_preferences.queries`: Parquet, JSONL or text) and an index_corpus output
built with `model` (`index_corpus_dir`). Out, under `build_preferences.output`: pairs/,
candidates/, rewrites/, errors/ and `_manifest.json`.

queries -> checks (empty, duplicate, undecodable: error rows, align/data/queries.py)
  -> rewrite (keywords | OpenAI-compatible HTTP | vLLM, through ray.data.llm)
  -> text embedding of the original and rewritten query (actor pool)
  -> top-K for the rewritten query (or `retrieve_with`) + semantic / aesthetic re-rank + u x v
     grid pairs (actor pool holding the index: actors/retrieve.py, align/method/pairing.py)
  -> the output tables (align/data/preference_tables.py).

Each pair carries both reference similarities, so the fine-tune needs no reference model.
A re-run replaces its outputs; it never appends to them.
"""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.compute as pc

from actors.retrieve import retrieve_stage
from actors.rewrite import rewrite_stage
from actors.text_embed import text_embed_stage
from align.config import BuildPreferencesConfig, Config, IndexConfig, ModelConfig
from align.data.contracts import ERRORS, conform
from align.data.error_rows import write_error_rows
from align.data.preference_tables import (
    candidates_table,
    count_reasons,
    pairs_table,
    rewrites_table,
)
from align.data.queries import (
    check_query_dataset,
    good_queries,
    query_dataset,
    query_error_rows,
    query_files,
)
from align.log import get_logger
from align.models.clip import model_id
from align.runtime.cli import run_job
from align.runtime.manifest import JobManifest, empty_output_dir
from align.runtime.session import init_ray
from align.search.corpus import start_shard_actors, use_shard_actors
from align.search.stored import check_index
from align.storage import io

log = get_logger("build_preferences")
OUTPUTS = ("pairs", "candidates", "rewrites", "errors")


def retrieve(bp: BuildPreferencesConfig, model: ModelConfig, queries, index_dir: str, search: dict):
    """The streaming pipeline over a Dataset of checked queries: rewrite -> embed both queries ->
    retrieve, re-rank and pair (`search`: refine_factor and the search actors' names, None to
    load the shards per actor)."""
    # The rewrite stage's CPUs: the embed and retrieval pools (and search actors) hold the rest.
    queries = queries.map_batches(
        good_queries, batch_format="pyarrow", num_cpus=bp.rewrite.num_cpus
    )
    ds = rewrite_stage(queries, bp.rewrite)
    ds = text_embed_stage(ds, model, bp.embed)
    return retrieve_stage(ds, bp, index_dir, search)


def corpus_search(cfg: IndexConfig, index_dir: str, index_manifest: dict):
    """How the retrieval actors search: the shards in each actor for a small corpus, else
    search actors (one per node by default) started here: (the retrieval stage's kwargs, the
    actors to keep)."""
    actors = None
    if use_shard_actors(index_manifest, cfg.in_process_max_vectors):
        actors = start_shard_actors(
            f"{index_dir}/index", cfg.shard_actor_cpus, cfg.refine_factor, cfg.search_actors
        )
        log.info("%d vectors: %d search actors", index_manifest["count"], len(actors.names))
    return {
        "refine_factor": cfg.refine_factor,
        "shard_actors": actors.names if actors else None,
    }, actors


def write_outputs(bp: BuildPreferencesConfig, model: ModelConfig, results, checked, out: str):
    """rewrites/, pairs/, candidates/ and errors/ (the query rows the checks rejected, and every
    query that retrieved nothing), written by Ray Data; returns the counts, summed batch by batch
    in this process."""
    rw = bp.rewrite
    results.select_columns(["query_id", "query", "rewritten", "fallback", "truncated"]).map_batches(
        rewrites_table,
        fn_kwargs={"backend": rw.backend, "variant": rw.variant},
        batch_format="pyarrow",
    ).write_parquet(f"{out}/rewrites")
    # Skipped queries have empty pair lists, so exploding needs no filter.
    results.map_batches(
        pairs_table, fn_kwargs={"reference_model": model_id(model)}, batch_format="pyarrow"
    ).write_parquet(f"{out}/pairs")
    results.map_batches(candidates_table, batch_format="pyarrow").write_parquet(f"{out}/candidates")
    errors = (
        checked.map_batches(query_error_rows, batch_format="pyarrow")
        .union(
            results.select_columns(["query_id", "status", "error"]).map_batches(
                skipped_error_rows, batch_format="pyarrow"
            )
        )
        .materialize()
    )
    # The error rows stream out of the workers (Ray Data writes the files); write_error_rows
    # below covers a run with none, so errors/ always reads as a table.
    errors.write_parquet(f"{out}/errors")
    reasons: dict[str, int] = {}
    for batch in errors.iter_batches(batch_format="pyarrow"):
        for reason, n in count_reasons(batch["error"].to_pylist()).items():
            reasons[reason] = reasons.get(reason, 0) + n
    counts = {
        "rows_error": sum(reasons.values()),
        "reasons": reasons,
        "ok": 0,
        "fallbacks": 0,
        "truncated": 0,
    }
    columns = ["status", "fallback", "truncated"]
    for batch in results.select_columns(columns).iter_batches(batch_format="pyarrow"):
        counts["ok"] += pc.sum(pc.equal(batch["status"], "ok")).as_py() or 0
        counts["fallbacks"] += pc.sum(pc.not_equal(batch["fallback"], "")).as_py() or 0
        counts["truncated"] += pc.sum(batch["truncated"]).as_py() or 0
    if not io.list_files(f"{out}/errors", ".parquet"):  # no error rows: an empty table still
        write_error_rows([], f"{out}/errors")
    return counts


def skipped_error_rows(batch: pa.Table) -> pa.Table:
    """Error rows (errors contract) of the queries that retrieved nothing."""
    skipped = batch.filter(pc.not_equal(batch["status"], "ok"))
    return conform(
        pa.table(
            {
                "row_id": skipped["query_id"],
                "stage": pa.array(["retrieve"] * skipped.num_rows, pa.string()),
                "error": skipped["error"],
            }
        ),
        ERRORS,
    )


def build_preferences(config: Config) -> dict:
    bp = config.build_preferences
    out = config.job_output("build_preferences")
    manifest = JobManifest("build_preferences", config, output=out)  # removes a stale manifest
    queries_path = config.expand(bp.queries)
    index_dir = config.expand(bp.index_corpus_dir)

    # Fail fast: the model, the index it must match, the queries file (Parquet: its footers).
    index_manifest = check_index(config.model, index_dir)
    io.require_exists(queries_path, "queries")
    files = query_files(queries_path)

    init_ray(config.ray)
    for sub in OUTPUTS:  # a re-run replaces, never appends
        empty_output_dir(f"{out}/{sub}", "build_preferences")
    with manifest.stage("read"):
        # Read and checked by Ray Data workers; held in the object store, not in this process.
        checked = check_query_dataset(query_dataset(files, bp.split), files)
        # Blocks of one embed batch each, so the stages after stream and run in parallel.
        checked = checked.repartition(target_num_rows_per_block=bp.embed.batch_size).materialize()
    rows_in = checked.count()
    with manifest.stage("rewrite_embed_retrieve"):
        search, _actors = corpus_search(config.index_corpus.index, index_dir, index_manifest)
        results = retrieve(bp, config.model, checked, index_dir, search).materialize()
    # Per-operator wall times (rewrite, text_embed, retrieve) for the share of time per stage.
    io.write_bytes(f"{out}/_ray_data_stats.txt", results.stats().encode())
    with manifest.stage("write"):
        counts = write_outputs(bp, config.model, results, checked, out)

    pair_files = io.list_files(f"{out}/pairs", ".parquet")
    n_pairs = sum(io.read_parquet(f, columns=["query_id"]).num_rows for f in pair_files)
    manifest.extra.update(
        {
            "queries": queries_path,
            "index": {"dir": index_dir, "count": index_manifest["count"]},
            "rewrite": {
                "backend": bp.rewrite.backend,
                "variant": bp.rewrite.variant,
                "fallbacks": counts["fallbacks"],
                "truncated": counts["truncated"],
            },
            "grid": bp.grid.model_dump(),
            "pairs": n_pairs,
            "errors_by_reason": counts["reasons"],
        }
    )
    result = manifest.write(
        out, rows_in=rows_in, rows_out=counts["ok"], rows_error=counts["rows_error"]
    )
    log.info(
        "%d queries in -> %d with pairs (%d pairs); %d error rows",
        rows_in,
        counts["ok"],
        n_pairs,
        counts["rows_error"],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return run_job("build_preferences", build_preferences, argv)


if __name__ == "__main__":
    sys.exit(main())
