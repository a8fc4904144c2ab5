"""build_preferences: the paper's preference-data construction (PAPER.md, Finding 2).

    python -m pipelines.build_preferences --config configs/demo.yaml [key=value ...]

queries (Parquet | JSONL | text) -> checks (empty, duplicate, undecodable: error rows)
  -> rewrite (keywords | OpenAI-compatible HTTP | vLLM, through ray.data.llm)
  -> text embedding of the original and rewritten query (actor pool)
  -> top-K for the rewritten query (or `retrieve_with`) + semantic / aesthetic re-rank + u x v
     grid pairs
     (actor pool holding the index) -> pairs, candidates, rewrites, errors, manifest.

Each pair carries both reference similarities, so the fine-tune needs no reference model.
A re-run replaces its outputs; it never appends to them.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align import io
from align.config import Config, RewriteConfig
from align.contracts import (
    CANDIDATES,
    ERRORS,
    PAIRS,
    QUERIES,
    REWRITES,
    ContractError,
    conform,
    require_columns,
)
from align.index import INDEX_MANIFEST
from align.log import get_logger
from align.manifest import JobManifest, empty_output_dir
from align.models import ModelLoadError, check_model, model_id, weights_fingerprint
from align.runtime import init_ray
from pipelines.common import actor_pool, run_job

log = get_logger("build_preferences")
OUTPUTS = ("pairs", "candidates", "rewrites", "errors")


def output_dir(config: Config) -> str:
    return config.path("build_preferences")


# ---------------------------------------------------------------------------------------------
# Queries in


def read_queries(path: str, split: str | None) -> tuple[pa.Table, list[dict]]:
    """Read queries from Parquet, JSONL or text; return (rows, error rows) before any checks.

    Rows are (query_id, query). Lines that do not decode become error rows.
    """
    errors: list[dict] = []
    if path.endswith(".parquet") or io.exists(path) and not io.is_file(path):
        table = io.read_parquet(path)
        require_columns(QUERIES, table.column_names, "build_preferences.read", needed=["query"])
        if not pa.types.is_string(table.schema.field("query").type):
            raise ContractError(
                f"{path}: column 'query' holds {table.schema.field('query').type}, not strings"
            )
        if split and "split" in table.column_names:
            table = table.filter(pc.equal(table["split"], split))
        ids = table["query_id"] if "query_id" in table.column_names else None
        queries = table["query"].to_pylist()
        ids = ids.to_pylist() if ids is not None else [f"q{i:07d}" for i in range(len(queries))]
        return pa.table({"query_id": ids, "query": queries}), errors
    raw = io.read_bytes(path)
    ids, queries = [], []
    for n, line in enumerate(raw.splitlines(), start=1):
        row_id = f"line{n:07d}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append({"row_id": row_id, "stage": "read", "error": f"not UTF-8: {e.reason}"})
            continue
        if path.endswith((".jsonl", ".json")):
            try:
                obj = json.loads(text)
                query, row_id = obj["query"], str(obj.get("query_id", row_id))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                errors.append({"row_id": row_id, "stage": "read", "error": f"bad JSON line: {e}"})
                continue
            if not isinstance(query, str):
                errors.append(
                    {
                        "row_id": row_id,
                        "stage": "read",
                        "error": f"'query' is {type(query).__name__}, not a string",
                    }
                )
                continue
        else:
            query = text
        ids.append(row_id)
        queries.append(query)
    return pa.table({"query_id": ids, "query": queries}), errors


def check_queries(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """Drop empty and duplicate queries (error rows with the reason); keep the rest in order."""
    keep, errors, seen = [], [], {}
    for i, (qid, query) in enumerate(
        zip(table["query_id"].to_pylist(), table["query"].to_pylist(), strict=True)
    ):
        text = " ".join(str(query or "").split())
        if not text:
            errors.append({"row_id": qid, "stage": "check", "error": "empty or whitespace query"})
            continue
        key = text.casefold()
        if key in seen:
            errors.append({"row_id": qid, "stage": "check", "error": f"duplicate of {seen[key]}"})
            continue
        seen[key] = qid
        keep.append(i)
    table = table.take(keep)
    cleaned = [" ".join(q.split()) for q in table["query"].to_pylist()]
    return table.set_column(1, "query", pa.array(cleaned, pa.string())), errors


# ---------------------------------------------------------------------------------------------
# Checks before any work


def check_index(config: Config, index_corpus_dir: str) -> dict:
    """Fail fast on a missing index, or one built with another model or dimension."""
    manifest_path = f"{index_corpus_dir}/index/{INDEX_MANIFEST}"
    io.require_exists(manifest_path, "index (run index_corpus first)")
    index_manifest = io.read_json(manifest_path)
    facts = check_model(config.model)
    built_with = index_manifest["model"]["name"]
    if (
        built_with != config.model.name
        or index_manifest["model"].get("pretrained") != config.model.pretrained
    ):
        raise ModelLoadError(
            f"index at {index_corpus_dir} was built with model {built_with!r} "
            f"(pretrained={index_manifest['model'].get('pretrained')!r}) but the config's model is "
            f"{config.model.name!r} (pretrained={config.model.pretrained!r})"
        )
    built_weights = index_manifest.get("weights")
    if built_weights is not None and built_weights != weights_fingerprint(config.model):
        raise ModelLoadError(
            f"index at {index_corpus_dir} was built with other weights than "
            f"{config.model.pretrained} has now ({built_weights} then, "
            f"{weights_fingerprint(config.model)} now): the checkpoint was rewritten since; "
            f"index the corpus again"
        )
    if index_manifest["dim"] != facts.embed_dim:
        raise ModelLoadError(
            f"index dimension {index_manifest['dim']} does not match the model's {facts.embed_dim}"
        )
    return index_manifest


# ---------------------------------------------------------------------------------------------
# The pipeline


def rewrite(rw: RewriteConfig, ds):
    """The rewrite stage for a Dataset of (query_id, query): adds `rewritten` and `fallback`."""
    from actors.rewrite import build_llm_rewriter, keyword_rewrite_batch

    if rw.backend == "keywords":
        return ds.map_batches(
            keyword_rewrite_batch,
            fn_kwargs={"variant": rw.variant, "keywords": rw.keywords},
            batch_format="numpy",
            num_cpus=0.25,
        )
    return build_llm_rewriter(rw)(ds)


def explode(
    table: pa.Table, columns: list[str], repeat: list[str], position: str | None = None
) -> pa.Table:
    """One row per element of the list columns, with the `repeat` columns copied down and, if
    `position` names a column, each element's position within its list."""
    lists = table[columns[0]].combine_chunks()
    parents = pc.list_parent_indices(lists)
    out = {c: table[c].take(parents) for c in repeat}
    out.update({c: pc.list_flatten(table[c]) for c in columns})
    if position:
        starts = lists.offsets.to_numpy()[parents.to_numpy()]
        out[position] = pa.array(np.arange(len(parents)) - starts, pa.int32())
    return pa.table(out)


def pairs_table(batch: pa.Table, reference_model: str) -> pa.Table:
    t = explode(
        batch,
        [c for c in PAIRS.names if c.startswith(("chosen", "rejected"))],
        ["query_id", "query"],
    )
    # Dictionary-encoded in Parquet: one string per row costs next to nothing on disk.
    t = t.append_column("reference_model", pa.array([reference_model] * t.num_rows, pa.string()))
    return conform(t, PAIRS)


def candidates_table(batch: pa.Table) -> pa.Table:
    # rank: position in the retrieval order for the rewritten query.
    t = explode(
        batch,
        ["candidate_ids", "candidate_semantic", "candidate_aesthetic"],
        ["query_id"],
        position="rank",
    )
    t = t.rename_columns(
        {
            "candidate_ids": "image_id",
            "candidate_semantic": "semantic",
            "candidate_aesthetic": "aesthetic",
        }
    )
    return conform(t, CANDIDATES)


def build_preferences(config: Config) -> dict:
    import ray
    import ray.data

    from actors.retrieve import CandidateRetriever
    from actors.text_embed import ClipTextEmbedder

    bp = config.build_preferences
    out = output_dir(config)
    manifest = JobManifest("build_preferences", config, output=out)  # removes a stale manifest
    queries_path = config.expand(bp.queries)
    index_corpus_dir = config.expand(bp.index_corpus_dir)

    # Fail fast: the model, the index it must match, the queries file.
    index_manifest = check_index(config, index_corpus_dir)
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
        # Blocks of one embed batch each, so the stages stream and run in parallel.
        step = bp.embed.batch_size
        blocks = [queries.slice(i, step) for i in range(0, queries.num_rows, step)] or [queries]
        ds = rewrite(bp.rewrite, ray.data.from_arrow(blocks))
        ds = ds.map_batches(
            ClipTextEmbedder,
            fn_constructor_kwargs={"model": config.model.model_dump(), "threads": bp.embed.threads},
            batch_format="numpy",
            **actor_pool(bp.embed),
        ).map_batches(
            CandidateRetriever,
            fn_constructor_kwargs={
                "index_corpus_dir": index_corpus_dir,
                "top_k": bp.top_k,
                "retrieve_with": bp.retrieve_with,
                "u": bp.grid.u,
                "v": bp.grid.v,
                "stride": bp.grid.stride,
            },
            batch_format="numpy",
            **actor_pool(bp.retrieve),
        )
        results = ds.materialize()
    # Per-operator wall times (rewrite, text_embed, retrieve) for the share of time per stage.
    io.write_bytes(f"{out}/_ray_data_stats.txt", results.stats().encode())

    with manifest.stage("write"):
        rewrites = results.select_columns(
            ["query_id", "query", "rewritten", "fallback", "truncated"]
        )
        rewrites = rewrites.map_batches(
            lambda b: conform(
                b.append_column("backend", pa.array([bp.rewrite.backend] * b.num_rows, pa.string()))
                .append_column("variant", pa.array([bp.rewrite.variant] * b.num_rows, pa.string()))
                .set_column(
                    b.schema.get_field_index("fallback"),
                    "fallback",
                    pc.if_else(
                        pc.equal(b["fallback"], ""), pa.scalar(None, pa.string()), b["fallback"]
                    ),
                ),
                REWRITES,
            ),
            batch_format="pyarrow",
        )
        rewrites.write_parquet(f"{out}/rewrites")
        # Skipped queries have empty pair lists, so exploding needs no filter.
        results.map_batches(
            pairs_table,
            fn_kwargs={"reference_model": model_id(config.model)},
            batch_format="pyarrow",
        ).write_parquet(f"{out}/pairs")
        results.map_batches(candidates_table, batch_format="pyarrow").write_parquet(
            f"{out}/candidates"
        )
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

    pair_files = io.list_files(f"{out}/pairs", ".parquet")
    n_pairs = sum(io.read_parquet(f, columns=["query_id"]).num_rows for f in pair_files)
    rows_out = len(status) - len(skipped)
    manifest.extra.update(
        {
            "queries": queries_path,
            "index": {"dir": index_corpus_dir, "count": index_manifest["count"]},
            "rewrite": {
                "backend": bp.rewrite.backend,
                "variant": bp.rewrite.variant,
                "fallbacks": int((status["fallback"] != "").sum()),
                "truncated": int(status["truncated"].sum()),
            },
            "grid": bp.grid.model_dump(),
            "pairs": n_pairs,
            "errors_by_reason": _count_reasons(errors),
        }
    )
    result = manifest.write(out, rows_in=rows_in, rows_out=rows_out, rows_error=len(errors))
    log.info("%d queries -> %d pairs; %d error rows", rows_out, n_pairs, len(errors))
    return result


def _count_reasons(errors: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in errors:
        reason = e["error"].split(":")[0].split(" of ")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    return run_job("build_preferences", build_preferences, argv)


if __name__ == "__main__":
    sys.exit(main())
