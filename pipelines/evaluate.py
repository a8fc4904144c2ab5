"""evaluate: compare named systems on queries no training step used: a model, with or without query rewriting,
and the query-time baselines (re-ranking its top results by aesthetics, steering the query
embedding towards the corpus's best-rated images: align/method/ranking.py).

    python -m pipelines.evaluate --config configs/demo.yaml [key=value ...]

In: the query set (`evaluate.queries`, the splits `evaluate.splits`), the gallery (`evaluate.corpus`:
images no training step read, or an index_corpus output per system), its aesthetic scores
(`evaluate.scores`), ground truth and HPIR file, the training corpus beside it (`evaluate.seen`),
held-out captions. Out, under `evaluate.output`: `metrics.json` (a table per gallery and split,
align/evaluation/views.py), `report.html` (+ `report_files/`), `errors/` (rejected queries and
images that did not decode) and `_manifest.json`. A re-run replaces them.

For every system (`evaluate.systems`, align/evaluation/systems.py), on every gallery and split:
1. retrieval: text-to-image recall@1/5/10 of held-out image-caption pairs;
2. aesthetics of the top k for the query set: each index_corpus scorer, the combined score, and
   on the synthetic world `true_aesthetic@k` and `true_precision@k`;
3. the HPIR protocol (align/evaluation/hpir.py);
4. an LMM judge over (A, B) system pairs with order consistency (align/evaluation/judge.py): the
   world's oracle, an OpenAI-compatible vision endpoint, or vLLM; also scored on the HPIR file.

This job is the orchestration: images and texts are embedded in Ray Data actor pools (decode ->
CLIP), queries rewritten by the rewrite stage, the judge called through ray.data.llm; every
number comes from align/evaluation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import faiss
import numpy as np
import pyarrow as pa

from actors.embed import embed_image_sources
from actors.judge import llm_judge_answers
from actors.rewrite import rewrite_texts
from actors.text_embed import embed_texts
from align import evaluation
from align.config import Config, ConfigError, EvaluateConfig
from align.data.error_rows import write_error_rows
from align.data.queries import check_queries, has_column, query_facts, read_queries
from align.errors import InputNotFound
from align.evaluation import judge
from align.evaluation.gallery import Gallery, caption_texts
from align.evaluation.hpir import hpir_rows, read_hpir
from align.evaluation.report import format_table, short_metrics, write_report
from align.evaluation.scoring import (
    ModelPass,
    Reference,
    search_system,
    system_metrics,
    system_queries,
)
from align.evaluation.systems import System, judged_comparisons, resolve_systems
from align.evaluation.views import (
    GallerySource,
    Queries,
    Run,
    View,
    gallery_sources,
    metrics_json,
    reference_for,
    view_queries,
    views,
)
from align.log import get_logger
from align.runtime.cli import run_job
from align.runtime.manifest import JobManifest, empty_output_dir
from align.runtime.session import init_ray
from align.search.corpus import load_corpus
from align.storage import io

log = get_logger("evaluate")


@dataclass(frozen=True)
class Paths:
    """Every path evaluate reads or writes, `{output_dir}` expanded once (None: not configured)."""

    out: str
    queries: str
    captions: str | None
    galleries: list[GallerySource]

    @classmethod
    def resolve(cls, config: Config) -> Paths:
        ev = config.evaluate
        return cls(
            out=config.job_output("evaluate"),
            queries=config.expand(ev.queries),
            captions=config.expand(ev.captions) if ev.captions else None,
            galleries=gallery_sources(ev, config.expand),
        )

    @property
    def headline(self) -> GallerySource:
        return self.galleries[0]


# ---------------------------------------------------------------------------------------------
# The job's steps


def read_query_set(ev: EvaluateConfig, paths: Paths, manifest: JobManifest) -> tuple[Queries, list]:
    """The checked queries of every split (and the HPIR file), before Ray starts: a missing
    input fails here."""
    io.require_exists(paths.queries, "queries (evaluate.queries)")
    if paths.captions:
        io.require_exists(paths.captions, "held-out captions (evaluate.captions)")
    for g in paths.galleries:
        io.require_exists(g.corpus, f"gallery images ({g.config_key}.corpus)")
        io.require_exists(f"{g.scores}/scored", f"the gallery's scores ({g.config_key}.scores)")
        if g.ground_truth:
            io.require_exists(g.ground_truth, f"ground truth ({g.config_key}.ground_truth)")
    if ev.splits is not None and not has_column(paths.queries, "split"):
        raise InputNotFound(
            f"{paths.queries} has no 'split' column: set evaluate.splits=null to evaluate every "
            "query as one set"
        )
    hpir = read_hpir(paths.headline.hpir) if paths.headline.hpir else None
    splits = ev.splits if ev.splits is not None else (None,)
    with manifest.stage("read"):
        parts = [read_queries(paths.queries, split) for split in splits]
        raw = pa.concat_tables([rows for rows, _ in parts])
        read_errors = [e for _, errors in parts for e in errors]
        split_of = {}
        for (rows, _), split in zip(parts, splits, strict=True):
            split_of.update(dict.fromkeys(rows["query_id"].to_pylist(), split))
        checked, check_errors = check_queries(raw)
    if checked.num_rows == 0:
        raise InputNotFound(f"no usable queries in {paths.queries} (splits {list(splits)})")
    texts = checked["query"].to_pylist()
    of_split = np.array([split_of[i] for i in checked["query_id"].to_pylist()], dtype=object)
    missing = [s for s in splits if s is not None and not (of_split == s).any()]
    if missing:
        raise InputNotFound(
            f"no usable queries of split(s) {missing} in {paths.queries}: evaluate.splits names "
            "only splits the query file has"
        )
    hpir_texts = hpir["query"].to_pylist() if hpir is not None else []
    all_texts = list(dict.fromkeys(texts + hpir_texts))  # one embedding pass for both sets
    rows_in = raw.num_rows + len(read_errors)
    return Queries(texts, of_split, all_texts, all_texts, hpir, rows_in), read_errors + check_errors


def embed_model(
    config: Config, paths: Paths, system: System, queries: Queries, rewrite: bool, run: Run
) -> dict[str, ModelPass]:
    """Per gallery, the model's pass: the gallery, query embeddings (plain and, if a system of
    this model rewrites, rewritten) and caption recall. Its images (every gallery, unless the
    system searches its own index_corpus output of the first, and the held-out captions'
    images) in one stream, its texts in one."""

    ev, max_pixels = config.evaluate, config.max_image_pixels
    log.info("system %s: embedding with %s", system.name, system.model.pretrained)
    own = system.index_corpus_dir
    sources = [g.corpus for g in paths.galleries if not (own and g.own_index)]
    sources += [paths.captions] if paths.captions else []
    embed = partial(embed_image_sources, sources, system.model, ev.decode, ev.embed, max_pixels)
    embedded = run.image_embeddings(system, sources, embed)  # or another of its image tower's
    galleries = {}
    for g in paths.galleries:
        if own and g.own_index:  # searched as it is
            index, ids, _, embeddings = load_corpus(own)
        else:  # searched exactly
            ids, embeddings = embedded.pop(0)
            index = faiss.IndexFlatIP(embeddings.shape[1])
            index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        galleries[g.name] = Gallery(ids, embeddings, index)
    texts = list(queries.all_texts) + (list(queries.rewritten) if rewrite else [])
    if paths.captions:
        heldout_ids, heldout_emb = embedded.pop(0)
        captions, with_caption = caption_texts(paths.captions, heldout_ids)
        texts += captions
    text_emb = embed_texts(system.model, texts, ev.embed)
    n = len(queries.all_texts)
    plain, rewritten = text_emb[:n], (text_emb[n : 2 * n] if rewrite else None)
    recall = {}
    if paths.captions:
        similarity = text_emb[len(texts) - len(captions) :] @ heldout_emb.astype(np.float32).T
        recall = evaluation.recall_at_k(similarity, with_caption, tuple(ev.recall_ks))
    return {name: ModelPass(g, plain, rewritten, recall) for name, g in galleries.items()}


def run_systems(config: Config, paths: Paths, systems: list[System], queries: Queries, manifest):
    """Every system searched on every gallery and measured on each of its splits; models shared
    between systems are embedded once."""
    run, models = Run(), {}
    for system in systems:
        key = system.model_key
        with manifest.stage(f"embed:{system.name}"):
            if key not in models:
                rewrite = any(s.rewrite for s in systems if s.model_key == key)
                models[key] = embed_model(config, paths, system, queries, rewrite, run)
        for g in paths.galleries:
            search_gallery(config.evaluate, paths, g, system, models[key][g.name], queries, run)
    manifest.extra["image_embeddings_of"] = run.image_pass_of  # per model: whose images it read
    return run


def search_gallery(ev, paths: Paths, g: GallerySource, system, model, queries: Queries, run: Run):
    """One system's top k on one gallery, and its metrics for each of the gallery's splits."""
    # The first system's gallery fixes the rows every system is scored on.
    if g.name not in run.refs:
        run.refs[g.name] = Reference.read(
            model.gallery, g.scores, g.ground_truth, paths.queries, queries.texts
        )
    ref = run.refs[g.name]
    text_emb = system_queries(system, model, ref)
    top = search_system(ev, system, model, ref, text_emb[: len(queries.texts)])
    if system.index_corpus_dir and g.own_index and (top < 0).mean() > 0.5:
        raise ConfigError(
            f"system {system.name!r}: most results of its index_corpus_dir "
            f"{system.index_corpus_dir} are not images of the gallery {g.corpus} "
            f"({g.config_key}.corpus): index that gallery with the system's model"
        )
    run.tops.setdefault(g.name, {})[system.name] = top
    for view in (View(g, split) for split in g.splits):
        rows, _, hpir = view_queries(view, queries)
        ref_rows, all_texts = reference_for(ref, rows), queries.all_texts
        metrics = system_metrics(ev, model, ref_rows, top[rows], hpir, all_texts, text_emb)
        run.metrics.setdefault(view.key, {})[system.name] = metrics
        log.info("%s, %s: %s", system.name, view.key, short_metrics(metrics))


def view_calls(config: Config, comparisons: list, texts: list, hpir, tops, ref) -> judge.JudgeCalls:
    """Two calls per query and (A, B) comparison over the queries `texts` (rows of `tops`), and
    two per `hpir` item, on one table."""
    ev = config.evaluate
    calls = judge.comparison_calls(comparisons, texts, ref.facts, tops)
    if hpir is not None:
        hpir_queries = hpir["query"].to_pylist()
        item_facts = (
            query_facts(config.expand(ev.queries), hpir_queries)
            if ev.judge.backend == "oracle"
            else None
        )
        judge.add_hpir_calls(calls, hpir_queries, hpir_rows(hpir, ref.gallery), ev.k, item_facts)
    return calls


def judge_answers(config: Config, tables: dict) -> dict[str, dict[str, str]]:
    """Per table key: request_id -> first|second|similar. An LLM judge answers every table's
    calls in one pass (a vLLM engine loads once per evaluation, not once per table)."""
    ev = config.evaluate
    calls = sum(len(c.requests) for _, c, _ in tables.values())
    log.info("judge (%s): %d calls over %d tables", ev.judge.backend, calls, len(tables))
    if ev.judge.backend != "oracle":
        groups = {
            key: (c.requests, ref.gallery.ids, g.corpus) for key, (g, c, ref) in tables.items()
        }
        return llm_judge_answers(
            ev.judge, ev.k, groups, config.max_image_pixels, ev.decode.num_cpus
        )
    answers = {}
    for key, (g, c, ref) in tables.items():
        if ref.gt is None:
            raise ConfigError(
                f"evaluate.judge.backend=oracle needs {g.config_key}.ground_truth (the world's "
                "ground truth)"
            )
        answers[key] = judge.oracle_answers(c.requests, ref.gt, ev.judge.oracle_margin)
    return answers


def judge_tables(config: Config, paths: Paths, comparisons, queries: Queries, run: Run) -> dict:
    """Per table (View.key): the judge's rates and its HPIR agreement on that gallery and split."""
    ev, tables, hpirs = config.evaluate, {}, {}
    for view in views(paths.galleries):
        g = view.gallery
        rows, texts, hpirs[view.key] = view_queries(view, queries)
        if ev.judge.backend != "none" and (comparisons or hpirs[view.key] is not None):
            tops = {name: top[rows] for name, top in run.tops[g.name].items()}
            ref = reference_for(run.refs[g.name], rows)
            calls = view_calls(config, comparisons, texts, hpirs[view.key], tops, ref)
            if calls.requests:
                tables[view.key] = (g, calls, ref)
    answers = judge_answers(config, tables) if tables else {}
    out = dict.fromkeys(hpirs, ({}, {}))
    for key, (_, calls, _) in tables.items():
        agreement = judge.hpir_agreement(calls, answers[key], hpirs[key])
        out[key] = (judge.comparison_rates(calls, answers[key]), agreement)
    return out


def evaluate(config: Config) -> dict:
    ev, paths = config.evaluate, Paths.resolve(config)
    manifest = JobManifest("evaluate", config, output=paths.out)  # removes a stale manifest
    systems = resolve_systems(ev, config.model, config.expand)
    comparisons = judged_comparisons(ev, systems)
    queries, query_errors = read_query_set(ev, paths, manifest)
    names = ", ".join(s.name for s in systems)
    log.info("%d queries, %d systems: %s", len(queries.texts), len(systems), names)

    init_ray(config.ray)
    io.makedirs(paths.out)
    if any(s.rewrite for s in systems):
        with manifest.stage("rewrite"):
            queries.rewritten, queries.fallbacks = rewrite_texts(ev.rewrite, queries.all_texts)
    run = run_systems(config, paths, systems, queries, manifest)
    with manifest.stage("judge"):
        judged = judge_tables(config, paths, comparisons, queries, run)
    metrics = metrics_json(views(paths.galleries), queries, run.metrics, judged, ev)
    io.write_json(f"{paths.out}/metrics.json", metrics)
    with manifest.stage("report"):
        headline = views(paths.galleries)[0]
        g = headline.gallery
        rows, texts, _ = view_queries(headline, queries)
        write_report(
            ev,
            paths.out,
            g.corpus,
            config.max_image_pixels,
            metrics,
            texts,
            {name: top[rows] for name, top in run.tops[g.name].items()},
            reference_for(run.refs[g.name], rows),
            systems,
        )
    return finish(manifest, paths.out, systems, queries, query_errors + run.errors, metrics)


def finish(manifest: JobManifest, out: str, systems, queries: Queries, errors, metrics) -> dict:
    """errors/, the manifest (written last) and the table on the terminal."""
    empty_output_dir(f"{out}/errors", "evaluate")
    write_error_rows(errors, f"{out}/errors")
    manifest.extra["systems"] = {
        s.name: {"model": s.model.model_dump(), "rewrite": s.rewrite} for s in systems
    }
    image_errors = sum(1 for e in errors if e["stage"] == "embed_images")
    manifest.extra["image_errors"] = image_errors
    result = manifest.write(
        out,
        rows_in=queries.rows_in,
        rows_out=len(queries.texts),
        rows_error=len(errors) - image_errors,
    )
    print(format_table(metrics))
    return {**result, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    return run_job("evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
