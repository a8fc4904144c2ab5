"""build_preferences: the paper's preference-data construction (PAPER.md, Finding 2).

    python -m pipelines.build_preferences --config configs/demo.yaml [key=value ...]

In: a query file (`build_preferences.queries`: Parquet, JSONL or text) and an index_corpus output
built with `model` (`index_corpus_dir`). Out, under `build_preferences.output`: pairs/,
candidates/, rewrites/, errors/ and `_manifest.json`.

queries -> checks (empty, duplicate, undecodable: error rows, align/queries.py)
  -> rewrite (keywords | OpenAI-compatible HTTP | vLLM, through ray.data.llm)
  -> text embedding of the original and rewritten query (actor pool)
  -> top-K for the rewritten query (or `retrieve_with`) + semantic / aesthetic re-rank + u x v
     grid pairs (actor pool holding the index: actors/retrieve.py, align/pairing.py)
  -> the output tables (align/preference_tables.py).

Each pair carries both reference similarities, so the fine-tune needs no reference model.
A re-run replaces its outputs; it never appends to them.
"""

from __future__ import annotations

import sys

import pyarrow as pa

from actors.retrieve import CandidateRetriever
from actors.rewrite import rewrite_stage
from actors.text_embed import ClipTextEmbedder
from align import io
from align.cli import run_job
from align.config import BuildPreferencesConfig, Config, IndexConfig, ModelConfig
from align.contracts import ERRORS, conform
from align.corpus import start_shard_actors, use_shard_actors
from align.index import check_index
from align.log import get_logger
from align.manifest import JobManifest, empty_output_dir
from align.models import model_id
from align.preference_tables import candidates_table, count_reasons, pairs_table, rewrites_table
from align.queries import check_queries, read_queries
from align.runtime import init_ray
from align.stages import actor_pool

log = get_logger("build_preferences")
OUTPUTS = ("pairs", "candidates", "rewrites", "errors")


def output_dir(config: Config) -> str:
    return config.expand(config.build_preferences.output)


def retrieve(
    bp: BuildPreferencesConfig, model: ModelConfig, queries: pa.Table, index_dir: str, search: dict
):
    """The streaming pipeline: rewrite -> embed both queries -> retrieve, re-rank and pair
    (`search`: refine_factor and the shard actors' names, None to load the shards per actor)."""
    import ray.data

    # Blocks of one embed batch each, so the stages stream and run in parallel.
    step = bp.embed.batch_size
    blocks = [queries.slice(i, step) for i in range(0, queries.num_rows, step)] or [queries]
    ds = rewrite_stage(bp.rewrite, ray.data.from_arrow(blocks))
    return ds.map_batches(
        ClipTextEmbedder,
        fn_constructor_kwargs={"model": model.model_dump(), "threads": bp.embed.threads},
        batch_format="numpy",
        **actor_pool(bp.embed),
    ).map_batches(
        CandidateRetriever,
        fn_constructor_kwargs={
            "index_corpus_dir": index_dir,
            "top_k": bp.top_k,
            "retrieve_with": bp.retrieve_with,
            "u": bp.grid.u,
            "v": bp.grid.v,
            "stride": bp.grid.stride,
            **search,
        },
        batch_format="numpy",
        **actor_pool(bp.retrieve),
    )


def corpus_search(cfg: IndexConfig, index_dir: str, index_manifest: dict):
    """How the retrieval actors search: the shards in each actor for a small corpus, else one
    Ray actor per shard, started here: (the retrieval stage's kwargs, the actors to keep)."""
    actors = None
    if use_shard_actors(index_manifest, cfg.in_process_max_vectors):
        log.info("%d vectors: one actor per index shard", index_manifest["count"])
        actors = start_shard_actors(f"{index_dir}/index", cfg.shard_actor_cpus, cfg.refine_factor)
    return {
        "refine_factor": cfg.refine_factor,
        "shard_actors": actors.names if actors else None,
    }, actors


def write_outputs(bp: BuildPreferencesConfig, model: ModelConfig, results, out: str, errors):
    """rewrites/, pairs/, candidates/ and errors/ (every query that retrieved nothing joins the
    error rows); returns the per-query status table."""
    rw = bp.rewrite
    results.select_columns(["query_id", "query", "rewritten", "fallback", "truncated"]).map_batches(
        rewrites_table, fn_kwargs={"backend": rw.backend, "variant": rw.variant},
        batch_format="pyarrow",
    ).write_parquet(f"{out}/rewrites")  # fmt: skip
    # Skipped queries have empty pair lists, so exploding needs no filter.
    results.map_batches(
        pairs_table, fn_kwargs={"reference_model": model_id(model)}, batch_format="pyarrow"
    ).write_parquet(f"{out}/pairs")
    results.map_batches(candidates_table, batch_format="pyarrow").write_parquet(f"{out}/candidates")
    status = results.select_columns(["query_id", "status", "error", "fallback", "truncated"])
    status = status.to_pandas()
    skipped = status[status["status"] != "ok"]
    errors += [
        {"row_id": qid, "stage": "retrieve", "error": err}
        for qid, err in zip(skipped["query_id"], skipped["error"], strict=True)
    ]
    io.write_parquet(
        conform(pa.Table.from_pylist(errors, schema=ERRORS.schema), ERRORS),
        f"{out}/errors/part-00000.parquet",
    )
    return status


def build_preferences(config: Config) -> dict:
    bp = config.build_preferences
    out = output_dir(config)
    manifest = JobManifest("build_preferences", config, output=out)  # removes a stale manifest
    queries_path = config.expand(bp.queries)
    index_dir = config.expand(bp.index_corpus_dir)

    # Fail fast: the model, the index it must match, the queries file.
    index_manifest = check_index(config.model, index_dir)
    io.require_exists(queries_path, "queries")
    with manifest.stage("read"):
        raw, read_errors = read_queries(queries_path, bp.split)
        queries, check_errors = check_queries(raw)
    errors = read_errors + check_errors
    rows_in = raw.num_rows + len(read_errors)  # undecodable lines are input rows too
    log.info("%d queries read, %d kept, %d rejected", rows_in, queries.num_rows, len(errors))

    init_ray(config.ray)
    for sub in OUTPUTS:  # a re-run replaces, never appends
        empty_output_dir(f"{out}/{sub}", "build_preferences")
    with manifest.stage("rewrite_embed_retrieve"):
        search, _actors = corpus_search(config.index_corpus.index, index_dir, index_manifest)
        results = retrieve(bp, config.model, queries, index_dir, search).materialize()
    # Per-operator wall times (rewrite, text_embed, retrieve) for the share of time per stage.
    io.write_bytes(f"{out}/_ray_data_stats.txt", results.stats().encode())
    with manifest.stage("write"):
        status = write_outputs(bp, config.model, results, out, errors)

    pair_files = io.list_files(f"{out}/pairs", ".parquet")
    n_pairs = sum(io.read_parquet(f, columns=["query_id"]).num_rows for f in pair_files)
    rows_out = int((status["status"] == "ok").sum())
    manifest.extra.update(
        {
            "queries": queries_path,
            "index": {"dir": index_dir, "count": index_manifest["count"]},
            "rewrite": {
                "backend": bp.rewrite.backend,
                "variant": bp.rewrite.variant,
                "fallbacks": int((status["fallback"] != "").sum()),
                "truncated": int(status["truncated"].sum()),
            },
            "grid": bp.grid.model_dump(),
            "pairs": n_pairs,
            "errors_by_reason": count_reasons(errors),
        }
    )
    result = manifest.write(out, rows_in=rows_in, rows_out=rows_out, rows_error=len(errors))
    log.info("%d queries -> %d pairs; %d error rows", rows_out, n_pairs, len(errors))
    return result


def main(argv: list[str] | None = None) -> int:
    return run_job("build_preferences", build_preferences, argv)


if __name__ == "__main__":
    sys.exit(main())
