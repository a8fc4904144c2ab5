"""evaluate: compare named systems on held-out queries: a model, with or without query rewriting,
and the query-time baselines (re-ranking its top results by aesthetics, steering the query
embedding towards the corpus's best-rated images: align/method/ranking.py).

    python -m pipelines.evaluate --config configs/demo.yaml [key=value ...]

In: the query set (`evaluate.queries`), the images (`evaluate.corpus`, or an index_corpus output
per system), their aesthetic scores (`evaluate.scores`), held-out captions, the ground truth and
the HPIR file where configured. Out, under `evaluate.output`: `metrics.json`, `report.html`
(+ `report_files/`), `errors/` (rejected queries and images that did not decode) and
`_manifest.json`. A re-run replaces them.

For every system (`evaluate.systems`, align/evaluation/systems.py):
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
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa

from actors.embed import embed_image_sources
from actors.judge import llm_judge_answers
from actors.rewrite import rewrite_texts
from actors.text_embed import embed_texts
from align import evaluation
from align.config import Config, ConfigError, EvaluateConfig
from align.data import tables
from align.data.error_rows import write_error_rows
from align.data.queries import check_queries, query_facts, read_queries
from align.errors import InputNotFound
from align.evaluation import judge
from align.evaluation.gallery import Gallery
from align.evaluation.hpir import hpir_rows, read_hpir
from align.evaluation.report import format_table, short_metrics, write_report
from align.evaluation.scoring import (
    ModelPass,
    Reference,
    search_system,
    system_metrics,
    system_queries,
)
from align.evaluation.systems import System, resolve_systems
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
    corpus: str
    scores: str
    captions: str | None
    ground_truth: str | None
    hpir: str | None

    @classmethod
    def resolve(cls, config: Config) -> Paths:
        ev = config.evaluate
        optional = lambda p: config.expand(p) if p else None  # noqa: E731
        return cls(
            out=config.job_output("evaluate"),
            queries=config.expand(ev.queries),
            corpus=config.expand(ev.corpus),
            scores=config.expand(ev.scores),
            captions=optional(ev.captions),
            ground_truth=optional(ev.ground_truth),
            hpir=optional(ev.hpir),
        )


@dataclass
class Queries:
    """The evaluated queries, and every text embedded (the queries, then the HPIR file's)."""

    texts: list[str]
    all_texts: list[str]
    rewritten: list[str]
    hpir: pa.Table | None
    rows_in: int
    fallbacks: int = 0


@dataclass
class Run:
    """Per system: its top k (reference gallery rows) and its metrics."""

    tops: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Embedding and rewriting in Ray Data


def caption_texts(source: str, ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The captions of the held-out images `ids` that have one, and their rows in `ids`."""
    captions = tables.read_image_table(source, ids, ["image_id", "caption"])
    text = captions["caption"].to_numpy(zero_copy_only=False)[tables.align_rows(ids, captions)]
    usable = np.flatnonzero([bool(t and str(t).strip()) for t in text])
    return [str(t) for t in text[usable]], usable


# ---------------------------------------------------------------------------------------------
# The job's steps


def read_query_set(ev: EvaluateConfig, paths: Paths, manifest: JobManifest) -> tuple[Queries, list]:
    """The checked queries (and the HPIR file), before Ray starts: a missing input fails here."""
    io.require_exists(paths.queries, "queries (evaluate.queries)")
    if paths.captions:
        io.require_exists(paths.captions, "held-out captions (evaluate.captions)")
    if paths.ground_truth:
        io.require_exists(paths.ground_truth, "ground truth (evaluate.ground_truth)")
    hpir = None
    if paths.hpir:
        io.require_exists(paths.hpir, "HPIR file (evaluate.hpir)")
        hpir = read_hpir(paths.hpir)
    with manifest.stage("read"):
        raw, read_errors = read_queries(paths.queries, ev.split)
        checked, check_errors = check_queries(raw)
    if checked.num_rows == 0:
        raise InputNotFound(f"no usable queries in {paths.queries} (split={ev.split!r})")
    texts = checked["query"].to_pylist()
    hpir_texts = hpir["query"].to_pylist() if hpir is not None else []
    all_texts = list(dict.fromkeys(texts + hpir_texts))  # one embedding pass for both sets
    queries = Queries(texts, all_texts, all_texts, hpir, raw.num_rows + len(read_errors))
    return queries, read_errors + check_errors


def judged_comparisons(ev: EvaluateConfig, systems: list[System]) -> list[tuple[str, str]]:
    names = {s.name for s in systems}
    comparisons = [(a, b) for a, b in ev.judge.compare if a in names and b in names]
    for a, b in ev.judge.compare:
        if (a, b) not in comparisons:
            log.warning("judge: skipping %s vs %s (not both in evaluate.systems)", a, b)
    return comparisons


def embed_model(
    config: Config, paths: Paths, system: System, queries: Queries, rewrite: bool, errors: list
) -> ModelPass:
    """Gallery, query embeddings (plain and, if a system of this model rewrites, rewritten) and
    caption recall of one model: its images (the corpus, unless the system searches its own
    index_corpus output, and the held-out captions' images) in one stream, its texts in one."""

    ev, max_pixels = config.evaluate, config.max_image_pixels
    log.info("system %s: embedding with %s", system.name, system.model.pretrained)
    sources = [] if system.index_corpus_dir else [paths.corpus]
    sources += [paths.captions] if paths.captions else []
    embedded, bad = embed_image_sources(sources, system.model, ev.decode, ev.embed, max_pixels)
    errors += bad
    if system.index_corpus_dir:  # searched as it is
        index, ids, _, embeddings = load_corpus(system.index_corpus_dir)
        gallery = Gallery(ids, embeddings, index)
    else:  # searched exactly
        ids, embeddings = embedded.pop(0)
        index = faiss.IndexFlatIP(embeddings.shape[1])
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
        gallery = Gallery(ids, embeddings, index)
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
    return ModelPass(gallery, plain, rewritten, recall)


def run_systems(config: Config, paths: Paths, systems: list[System], queries: Queries, manifest):
    """Every system searched and measured; models shared between systems are embedded once."""
    run, models = Run(), {}
    ref = None
    for system in systems:
        key = system.model_key
        with manifest.stage(f"embed:{system.name}"):
            if key not in models:
                rewrite = any(s.rewrite for s in systems if s.model_key == key)
                models[key] = embed_model(config, paths, system, queries, rewrite, run.errors)
        if ref is None:  # the first gallery fixes the image set every system is scored on
            ref = Reference.read(
                models[key].gallery, paths.scores, paths.ground_truth, paths.queries, queries.texts
            )
        text_emb = system_queries(system, models[key], ref)
        top = search_system(
            config.evaluate, system, models[key], ref, text_emb[: len(queries.texts)]
        )
        run.tops[system.name] = top
        run.metrics[system.name] = system_metrics(
            config.evaluate, models[key], ref, top, queries.hpir, queries.all_texts, text_emb
        )
        log.info("system %s: %s", system.name, short_metrics(run.metrics[system.name]))
    return run, ref


def run_judge(
    config: Config, paths: Paths, comparisons: list, queries: Queries, run: Run, ref: Reference
) -> tuple[dict, dict]:
    """Win/similar/loss per (A, B) comparison, and the judge's own HPIR agreement."""
    ev = config.evaluate
    calls = judge.comparison_calls(comparisons, queries.texts, ref.facts, run.tops)
    if queries.hpir is not None:
        hpir_queries = queries.hpir["query"].to_pylist()
        item_facts = (
            query_facts(paths.queries, hpir_queries) if ev.judge.backend == "oracle" else None
        )
        rows = hpir_rows(queries.hpir, ref.gallery)
        judge.add_hpir_calls(calls, hpir_queries, rows, ev.k, item_facts)
    if not calls.requests:
        return {}, {}
    log.info("judge (%s): %d calls", ev.judge.backend, len(calls.requests))
    if ev.judge.backend == "oracle":
        if ref.gt is None:
            raise ConfigError(
                "evaluate.judge.backend=oracle needs evaluate.ground_truth (the world's ground truth)"
            )
        answers = judge.oracle_answers(calls.requests, ref.gt, ev.judge.oracle_margin)
    else:
        answers = llm_judge_answers(
            ev.judge,
            ev.k,
            calls.requests,
            ref.gallery.ids,
            paths.corpus,
            config.max_image_pixels,
            ev.decode.num_cpus,
        )
    judge_hpir = judge.hpir_agreement(calls, answers, queries.hpir) if calls.hpir_items else {}
    return judge.comparison_rates(calls, answers), judge_hpir


def evaluate(config: Config) -> dict:
    ev, paths = config.evaluate, Paths.resolve(config)
    manifest = JobManifest("evaluate", config, output=paths.out)  # removes a stale manifest
    systems = resolve_systems(ev, config.model, config.expand)
    comparisons = judged_comparisons(ev, systems)
    queries, query_errors = read_query_set(ev, paths, manifest)
    log.info(
        "%d queries, %d systems: %s",
        len(queries.texts),
        len(systems),
        ", ".join(s.name for s in systems),
    )

    init_ray(config.ray)
    io.makedirs(paths.out)
    if any(s.rewrite for s in systems):
        with manifest.stage("rewrite"):
            queries.rewritten, queries.fallbacks = rewrite_texts(ev.rewrite, queries.all_texts)
    run, ref = run_systems(config, paths, systems, queries, manifest)
    judge_results, judge_hpir = {}, {}
    if ev.judge.backend != "none" and (comparisons or queries.hpir is not None):
        with manifest.stage("judge"):
            judge_results, judge_hpir = run_judge(config, paths, comparisons, queries, run, ref)
    metrics = {
        "systems": run.metrics,
        "judge": judge_results,
        "judge_hpir": judge_hpir,
        "k": ev.k,
        "queries": len(queries.texts),
        "judge_backend": ev.judge.backend,
        "rewrite": {
            "backend": ev.rewrite.backend,
            "variant": ev.rewrite.variant,
            "fallbacks": queries.fallbacks,
        },
    }
    io.write_json(f"{paths.out}/metrics.json", metrics)
    with manifest.stage("report"):
        write_report(
            ev,
            paths.out,
            paths.corpus,
            config.max_image_pixels,
            metrics,
            queries.texts,
            run.tops,
            ref,
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
