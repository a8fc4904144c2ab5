"""evaluate: compare named systems on held-out queries: a model, with or without query rewriting,
and the query-time baselines (re-ranking its top results by aesthetics, steering the query
embedding towards the corpus's best-rated images: align/ranking.py).

    python -m pipelines.evaluate --config configs/demo.yaml [key=value ...]

For every system (`evaluate.systems`):
1. retrieval: text-to-image recall@1/5/10 of held-out image-caption pairs (`evaluate.captions`),
   each caption against the gallery of their images;
2. aesthetics of the top k for the query set: the mean of each index_corpus scorer and of the
   combined score (`aesthetic@5`), and on the synthetic world `true_aesthetic@5` and
   `true_precision@5` from the ground truth;
3. the HPIR protocol (`evaluate.hpir`): does the model's mean similarity prefer the row people
   preferred (`hpir_accuracy`, `hpir_aesthetic`, `hpir_diversity`, confidence-weighted);
4. an LMM judge over (A, B) system pairs with the <ranker> prompt and order consistency: the
   synthetic world's oracle, an OpenAI-compatible vision endpoint, or vLLM; it is also scored on
   the HPIR file (`judge_hpir`).

Images, captions and queries are embedded in Ray Data actor pools (decode -> CLIP), the rewriter
is build_preferences' stage, the judge calls go through ray.data.llm. Systems without an
`index_corpus_dir` search `evaluate.corpus` exactly (a flat FAISS index of its embeddings); give
one for corpora too large to embed in a job.

Output under `evaluate.output`: `metrics.json`, `report.html` (+ `report_files/`), `errors/`
(rejected queries and images that did not decode) and `_manifest.json`. A re-run replaces them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align import evaluation, io, ranking, world
from align.config import Config, ConfigError, ModelConfig, RerankConfig, SteerConfig
from align.contracts import (
    ERRORS,
    GROUND_TRUTH,
    HPIR,
    HPIR_DIMENSIONS,
    QUERIES,
    SCORER_COLUMN_PREFIX,
    ContractError,
    conform,
    require_columns,
)
from align.errors import InputNotFound
from align.log import get_logger
from align.manifest import JobManifest, empty_output_dir
from align.models import check_model
from align.runtime import init_ray
from pipelines.build_preferences import check_queries, read_queries, rewrite
from pipelines.common import actor_pool, collect_ok_rows, run_job, task_pool

log = get_logger("evaluate")
MAX_IMAGE_PIXELS = 64_000_000


def output_dir(config: Config) -> str:
    return config.expand(config.evaluate.output)


@dataclass(frozen=True)
class System:
    name: str
    model: ModelConfig
    rewrite: bool
    index_corpus_dir: str | None
    rerank: RerankConfig | None = None
    steer: SteerConfig | None = None

    @property
    def model_key(self) -> tuple:
        """Systems that share this key share their embeddings: one pass per distinct model."""
        return (self.model.name, self.model.pretrained, self.index_corpus_dir)


def resolve_systems(config: Config) -> list[System]:
    """The configured systems with defaults filled in from `model`; each model checked (cheaply)
    before any work, so a missing checkpoint fails at once and names the system."""
    systems = []
    if not config.evaluate.systems:
        raise ConfigError("evaluate.systems is empty: name at least one system")
    for name, s in config.evaluate.systems.items():
        pretrained = s.pretrained if s.pretrained is not None else config.model.pretrained
        if pretrained and "{output_dir}" in pretrained:
            pretrained = config.expand(pretrained)
        model = config.model.model_copy(
            update={"name": s.model or config.model.name, "pretrained": pretrained}
        )
        try:
            check_model(model)
        except Exception as e:
            raise type(e)(f"system {name!r}: {e}") from None
        index_dir = config.expand(s.index_corpus_dir) if s.index_corpus_dir else None
        systems.append(System(name, model, s.rewrite, index_dir, s.rerank, s.steer))
    return systems


# ---------------------------------------------------------------------------------------------
# Embedding in Ray Data actor pools


def embed_images(config: Config, model: ModelConfig, source: str):
    """(image ids, float16 L2-normalised embeddings, error rows) of the images in `source` (the
    images contract), decoded in CPU tasks and embedded in an actor pool."""
    import ray.data

    from actors.decode import decode_batch
    from actors.embed import ClipImageEmbedder

    ev = config.evaluate
    facts = check_model(model)
    ds = (
        ray.data.read_parquet(io.parquet_files(source), num_cpus=ev.decode.num_cpus)
        .select_columns(["image_id", "image"])
        .map_batches(
            decode_batch,
            fn_kwargs={"image_size": facts.image_size, "max_pixels": MAX_IMAGE_PIXELS},
            **task_pool(ev.decode),
        )
        .map_batches(
            ClipImageEmbedder,
            fn_constructor_kwargs={"model": model.model_dump(), "threads": ev.embed.threads},
            batch_format="numpy",
            **actor_pool(ev.embed),
        )
        .select_columns(["image_id", "embedding", "status", "error"])
    )
    rows, errors = collect_ok_rows(ds, ["image_id", "embedding"], "embed_images")
    if rows["image_id"] is None:
        return np.array([], dtype=object), np.zeros((0, facts.embed_dim), np.float16), errors
    return rows["image_id"].astype(object), rows["embedding"], errors


def embed_texts(config: Config, model: ModelConfig, texts: list[str]) -> np.ndarray:
    """(len(texts), d) float32 L2-normalised text embeddings, in input order."""
    import ray.data

    from actors.text_embed import ClipTextEmbedder

    ev = config.evaluate
    table = pa.table({"row": np.arange(len(texts)), "text": pa.array(texts, pa.string())})
    step = ev.embed.batch_size
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]
    ds = ray.data.from_arrow(blocks).map_batches(
        ClipTextEmbedder,
        fn_constructor_kwargs={
            "model": model.model_dump(),
            "threads": ev.embed.threads,
            "columns": ("text",),
        },
        batch_format="numpy",
        **actor_pool(ev.embed),
    )
    rows, embeddings = [], []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        rows.append(batch["row"])
        embeddings.append(batch["text_embedding"])
    out = np.zeros((len(texts), embeddings[0].shape[1]), np.float32)
    out[np.concatenate(rows)] = np.concatenate(embeddings)
    return out


def rewrite_texts(config: Config, texts: list[str]) -> tuple[list[str], int]:
    """Each text rewritten by `evaluate.rewrite` (the build_preferences stage), and how many
    rewrites fell back to the original."""
    import ray.data

    table = pa.table({"query_id": [str(i) for i in range(len(texts))], "query": texts})
    out = dict.fromkeys(range(len(texts)), "")
    fallbacks = 0
    ds = rewrite(config.evaluate.rewrite, ray.data.from_arrow(table))
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for qid, text, fallback in zip(
            batch["query_id"], batch["rewritten"], batch["fallback"], strict=True
        ):
            out[int(qid)] = str(text)
            fallbacks += bool(fallback)
    return [out[i] for i in range(len(texts))], fallbacks


# ---------------------------------------------------------------------------------------------
# Inputs


def take_or_nan(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.where(rows >= 0, values[np.maximum(rows, 0)], np.nan).astype(np.float64)


def corpus_scores(config: Config, gallery_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per gallery image: the combined aesthetic and each scorer's raw score (NaN if unscored),
    from the index_corpus output named by `evaluate.scores`."""
    scored_dir = f"{config.expand(config.evaluate.scores)}/scored"
    io.require_exists(scored_dir, "index_corpus scored shards (evaluate.scores)")
    table = pa.concat_tables(
        [io.read_parquet(f) for f in io.list_files(scored_dir, ".parquet")],
        promote_options="default",
    )
    table = table.filter(pc.equal(table["status"], "ok"))
    rows = io.align_rows(gallery_ids, table)
    scores = {"aesthetic": take_or_nan(table["aesthetic"].to_numpy(zero_copy_only=False), rows)}
    for name in table.column_names:
        if name.startswith(SCORER_COLUMN_PREFIX):
            values = table[name].to_numpy(zero_copy_only=False)
            scores[name] = take_or_nan(values, rows)
    return scores


@dataclass
class GroundTruth:
    """The synthetic world's facts about each gallery image (row-aligned with the gallery)."""

    colour: np.ndarray
    shape: np.ndarray
    background: np.ndarray
    true_aesthetic: np.ndarray

    @classmethod
    def read(cls, path: str, gallery_ids: np.ndarray) -> GroundTruth:
        gt = io.read_parquet(path)
        require_columns(GROUND_TRUTH, gt.column_names, "evaluate.ground_truth")
        rows = io.align_rows(gallery_ids, gt)
        if (rows < 0).any():
            raise ContractError(
                f"ground truth {path} lacks {int((rows < 0).sum())} gallery images, "
                f"e.g. {gallery_ids[rows < 0][0]!r}"
            )
        take = lambda c: gt[c].to_numpy(zero_copy_only=False)[rows]  # noqa: E731
        return cls(take("colour"), take("shape"), take("background"), take("true_aesthetic"))

    def relevance(self, query_facts: dict[str, np.ndarray], top: np.ndarray) -> np.ndarray:
        """(Q, k) bool: is each retrieved image what its query asks for."""
        q = {c: np.asarray(query_facts[c], dtype=object)[:, None] for c in query_facts}
        return world.relevant(
            q["colour"], q["shape"], q["background"],
            self.colour[top], self.shape[top], self.background[top],
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Retrieval for one model


@dataclass
class Gallery:
    ids: np.ndarray
    embeddings: np.ndarray  # float16 (n, d), L2-normalised
    index: object  # FAISS (or ShardedIndex)


def load_gallery(config: Config, system: System, errors: list[dict]) -> Gallery:
    import faiss

    from align.index import load_corpus

    if system.index_corpus_dir:
        index, ids, _, embeddings = load_corpus(system.index_corpus_dir)
        return Gallery(ids, embeddings, index)
    ids, embeddings, bad = embed_images(config, system.model, config.expand(config.evaluate.corpus))
    errors += bad
    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return Gallery(ids, embeddings, index)


def caption_recall(config: Config, model: ModelConfig, errors: list[dict]) -> dict[str, float]:
    """Recall@k of held-out captions against the gallery of their own images."""
    source = config.expand(config.evaluate.captions)
    ids, image_emb, bad = embed_images(config, model, source)
    errors += bad
    captions = io.read_image_table(source, ids, ["image_id", "caption"])
    rows = io.align_rows(ids, captions)
    text = captions["caption"].to_numpy(zero_copy_only=False)[rows]
    usable = np.array([bool(t and str(t).strip()) for t in text])
    text_emb = embed_texts(config, model, [str(t) for t in text[usable]])
    similarity = text_emb @ image_emb.astype(np.float32).T
    targets = np.flatnonzero(usable)
    return evaluation.recall_at_k(similarity, targets, tuple(config.evaluate.recall_ks))


def mean_row_similarity(query_emb: np.ndarray, gallery: Gallery, rows_of: np.ndarray) -> np.ndarray:
    """(M,) mean similarity between each query and the images of its row (rows_of: (M, k)
    gallery rows, -1 where the image is not in the gallery)."""
    emb = gallery.embeddings.astype(np.float32)[np.maximum(rows_of, 0)]  # (M, k, d)
    sims = np.einsum("md,mkd->mk", query_emb, emb)
    sims = np.where(rows_of >= 0, sims, np.nan)
    return np.nanmean(sims, axis=1)


# ---------------------------------------------------------------------------------------------
# The judge


def judge_answers(
    config: Config, requests: list[dict], gallery: Gallery, gt: GroundTruth | None
) -> dict[str, str]:
    """request_id -> first|second|similar for requests of (request_id, query, query facts,
    first row, second row) (rows as gallery rows)."""
    judge = config.evaluate.judge
    if judge.backend == "oracle":
        if gt is None:
            raise ConfigError(
                "evaluate.judge.backend=oracle needs evaluate.ground_truth (the world's ground truth)"
            )
        facts = {c: [r["facts"][c] for r in requests] for c in ("colour", "shape", "background")}
        quality = []
        for key in ("first", "second"):
            top = np.stack([r[key] for r in requests])
            quality.append(
                evaluation.oracle_row_quality(gt.relevance(facts, top), gt.true_aesthetic[top])
            )
        answers = evaluation.oracle_answer(quality[0], quality[1], judge.oracle_margin)
        return dict(zip([r["request_id"] for r in requests], answers, strict=True))
    return llm_judge_answers(config, requests, gallery)


def llm_judge_answers(config: Config, requests: list[dict], gallery: Gallery) -> dict[str, str]:
    import ray.data

    from actors.judge import attach_data_urls, build_llm_judge

    judge, ev = config.evaluate.judge, config.evaluate
    needed = {gallery.ids[r] for req in requests for r in (*req["first"], *req["second"])}
    images = io.read_image_table(
        config.expand(ev.corpus), np.array(sorted(needed)), ["image_id", "image"]
    )
    by_id = dict(zip(images["image_id"].to_pylist(), images["image"].to_pylist(), strict=True))
    table = pa.table(
        {
            "request_id": [r["request_id"] for r in requests],
            "query": [r["query"] for r in requests],
            "images": [
                [by_id.get(gallery.ids[i], b"") for i in (*r["first"], *r["second"])]
                for r in requests
            ],
        }
    )
    ds = ray.data.from_arrow(table).map_batches(
        attach_data_urls,
        fn_kwargs={"image_size": judge.image_size, "max_pixels": MAX_IMAGE_PIXELS},
        batch_format="numpy",
        batch_size=16,
        num_cpus=ev.decode.num_cpus,
    )
    ds = build_llm_judge(judge, ev.k)(ds)
    answers = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for rid, answer, error in zip(
            batch["request_id"], batch["answer"], batch["error"], strict=True
        ):
            answers[str(rid)] = str(answer)
            if error:
                log.warning("judge request %s: %s", rid, error)
    return answers


def paired_requests(name: str, query: str, facts: dict, row_a: np.ndarray, row_b: np.ndarray):
    """The two judge calls of one comparison: A's row first, then B's row first."""
    return [
        {
            "request_id": f"{name}|ab",
            "query": query,
            "facts": facts,
            "first": row_a,
            "second": row_b,
        },
        {
            "request_id": f"{name}|ba",
            "query": query,
            "facts": facts,
            "first": row_b,
            "second": row_a,
        },
    ]


def verdicts(answers: dict[str, str], names: list[str]) -> list[str]:
    """Order-consistent verdicts; a call with no answer counts as similar."""
    return [
        evaluation.consistent_verdict(
            answers.get(f"{n}|ab", evaluation.SIMILAR), answers.get(f"{n}|ba", evaluation.SIMILAR)
        )
        for n in names
    ]


# ---------------------------------------------------------------------------------------------
# The job


def query_facts(config: Config, texts: list[str]) -> dict[str, np.ndarray]:
    """Ground truth of what each query text asks for (colour, shape, background), from the
    queries file's fact columns."""
    table = io.read_parquet(config.expand(config.evaluate.queries))
    require_columns(
        QUERIES, table.column_names, "evaluate.ground_truth",
        needed=["query", "colour", "shape", "background"],
    )  # fmt: skip
    rows = pc.index_in(pa.array(texts, pa.string()), value_set=table["query"].combine_chunks())
    rows = rows.fill_null(-1).to_numpy(zero_copy_only=False)
    if (rows < 0).any():
        raise ContractError(f"query {texts[int(np.argmax(rows < 0))]!r} has no ground truth")
    return {
        c: table[c].to_numpy(zero_copy_only=False)[rows] for c in ("colour", "shape", "background")
    }


def read_hpir(config: Config) -> pa.Table | None:
    if not config.evaluate.hpir:
        return None
    path = config.expand(config.evaluate.hpir)
    io.require_exists(path, "HPIR file (evaluate.hpir)")
    table = io.read_parquet(path)
    require_columns(HPIR, table.column_names, "evaluate.hpir")
    lengths = pc.unique(
        pa.chunked_array(
            [pc.list_value_length(table["row_a"]), pc.list_value_length(table["row_b"])]
        )
    )
    if len(lengths) != 1:
        raise ContractError(
            f"HPIR file {path}: every row A and row B must hold the same number of images "
            f"(found {sorted(lengths.to_pylist())})"
        )
    return table


def hpir_rows(hpir: pa.Table, gallery: Gallery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery rows of every item's row A and row B ((M, k) each, -1 if missing), and which
    items have all their images in the gallery."""
    lookup = pa.table({"image_id": pa.array(gallery.ids, pa.string())})
    rows = []
    for column in ("row_a", "row_b"):
        flat = pc.list_flatten(hpir[column]).to_numpy(zero_copy_only=False)
        rows.append(io.align_rows(flat, lookup).reshape(hpir.num_rows, -1))
    complete = (rows[0] >= 0).all(axis=1) & (rows[1] >= 0).all(axis=1)
    return rows[0], rows[1], complete


def evaluate(config: Config) -> dict:
    ev = config.evaluate
    out = output_dir(config)
    manifest = JobManifest("evaluate", config, output=out)  # removes a stale manifest
    systems = resolve_systems(config)
    names = [s.name for s in systems]
    comparisons = [(a, b) for a, b in ev.judge.compare if a in names and b in names]
    for a, b in ev.judge.compare:
        if (a, b) not in comparisons:
            log.warning("judge: skipping %s vs %s (not both in evaluate.systems)", a, b)

    # Fail fast on missing inputs, before Ray starts.
    queries_path = config.expand(ev.queries)
    io.require_exists(queries_path, "queries (evaluate.queries)")
    if ev.captions:
        io.require_exists(config.expand(ev.captions), "held-out captions (evaluate.captions)")
    if ev.ground_truth:
        io.require_exists(config.expand(ev.ground_truth), "ground truth (evaluate.ground_truth)")
    hpir = read_hpir(config)
    with manifest.stage("read"):
        raw, read_errors = read_queries(queries_path, ev.split)
        queries, check_errors = check_queries(raw)
    errors = read_errors + check_errors
    rows_in = raw.num_rows + len(read_errors)
    if queries.num_rows == 0:
        raise InputNotFound(f"no usable queries in {queries_path} (split={ev.split!r})")
    texts = queries["query"].to_pylist()
    hpir_texts = hpir["query"].to_pylist() if hpir is not None else []
    all_texts = list(dict.fromkeys(texts + hpir_texts))  # one embedding pass for both sets
    log.info("%d queries, %d systems: %s", len(texts), len(systems), ", ".join(names))

    init_ray(config.ray)
    io.makedirs(out)
    rewritten, fallbacks = all_texts, 0
    if any(s.rewrite for s in systems):
        with manifest.stage("rewrite"):
            rewritten, fallbacks = rewrite_texts(config, all_texts)

    results: dict[str, dict] = {}
    tops: dict[str, np.ndarray] = {}
    galleries: dict[tuple, Gallery] = {}
    embedded: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    recall: dict[tuple, dict] = {}
    gt = facts = scores = None
    for system in systems:
        key = system.model_key
        with manifest.stage(f"embed:{system.name}"):
            if key not in galleries:
                log.info("system %s: embedding with %s", system.name, system.model.pretrained)
                galleries[key] = load_gallery(config, system, errors)
                embedded[key] = (
                    embed_texts(config, system.model, all_texts),
                    embed_texts(config, system.model, rewritten)
                    if any(s.rewrite for s in systems if s.model_key == key)
                    else None,
                )
                if ev.captions:
                    recall[key] = caption_recall(config, system.model, errors)
        gallery = galleries[key]
        if scores is None:  # the first gallery fixes the image set every system is scored on
            scores = corpus_scores(config, gallery.ids)
            if ev.ground_truth:
                gt = GroundTruth.read(config.expand(ev.ground_truth), gallery.ids)
                facts = query_facts(config, texts)
        text_emb = embedded[key][1 if system.rewrite else 0]
        if system.steer:
            # The scores are indexed by the first system's gallery rows: map this gallery's rows
            # onto them rather than read the scored shards again.
            own_rows = remap_rows(np.arange(len(gallery.ids))[None], gallery, galleries, systems[0])
            aesthetic = take_or_nan(scores["aesthetic"], own_rows[0])
            direction = ranking.aesthetic_direction(
                gallery.embeddings, aesthetic, system.steer.top_share
            )
            text_emb = ranking.steer(text_emb, direction, system.steer.weight)
        depth = system.rerank.depth if system.rerank else ev.k
        similarity, top = gallery.index.search(
            np.ascontiguousarray(text_emb[: len(texts)], dtype=np.float32), depth
        )
        top = remap_rows(top, gallery, galleries, systems[0])
        if system.rerank:  # scores are indexed by the first system's gallery rows, as top now is
            top = ranking.rerank_rows(
                top, similarity, scores["aesthetic"], ev.k, system.rerank.weight
            )
        tops[system.name] = top
        metrics = dict(recall.get(key, {}))
        for name, values in scores.items():
            label = name.removeprefix(SCORER_COLUMN_PREFIX)
            label = "aesthetic" if label == "aesthetic" else f"aesthetic_{label}"
            metrics[f"{label}@{ev.k}"] = evaluation.mean_at_k(values, top)
        if gt is not None:
            metrics[f"true_aesthetic@{ev.k}"] = evaluation.mean_at_k(gt.true_aesthetic, top)
            metrics[f"true_precision@{ev.k}"] = float(gt.relevance(facts, top).mean())
        if hpir is not None:
            metrics.update(hpir_model_metrics(hpir, text_emb, all_texts, galleries[key]))
        results[system.name] = metrics
        log.info("system %s: %s", system.name, _short(metrics))

    judge_results, judge_hpir = {}, {}
    if ev.judge.backend != "none" and (comparisons or hpir is not None):
        with manifest.stage("judge"):
            judge_results, judge_hpir = run_judge(
                config, comparisons, texts, facts, tops, galleries[systems[0].model_key], gt, hpir
            )
    metrics = {
        "systems": results,
        "judge": judge_results,
        "judge_hpir": judge_hpir,
        "k": ev.k,
        "queries": len(texts),
        "judge_backend": ev.judge.backend,
        "rewrite": {
            "backend": ev.rewrite.backend,
            "variant": ev.rewrite.variant,
            "fallbacks": fallbacks,
        },
    }
    io.write_json(f"{out}/metrics.json", metrics)
    with manifest.stage("report"):
        from pipelines.report import write_report

        write_report(
            config,
            out,
            metrics,
            texts,
            tops,
            galleries[systems[0].model_key],
            scores,
            gt,
            facts,
            systems,
        )
    empty_output_dir(f"{out}/errors", "evaluate")
    if errors:
        io.write_parquet(
            conform(pa.Table.from_pylist(errors), ERRORS), f"{out}/errors/part-0.parquet"
        )
    manifest.extra["systems"] = {
        s.name: {"model": s.model.model_dump(), "rewrite": s.rewrite} for s in systems
    }
    image_errors = sum(1 for e in errors if e["stage"] == "embed_images")
    manifest.extra["image_errors"] = image_errors
    result = manifest.write(
        out, rows_in=rows_in, rows_out=len(texts), rows_error=len(errors) - image_errors
    )
    print(format_table(metrics))
    return {**result, "metrics": metrics}


def remap_rows(top: np.ndarray, gallery: Gallery, galleries: dict, first: System) -> np.ndarray:
    """Rows of `gallery` -> rows of the first system's gallery, which every metric indexes (the
    galleries hold the same images, maybe in another order)."""
    reference = galleries[first.model_key]
    if gallery is reference:
        return top
    rows = io.align_rows(
        gallery.ids[np.maximum(top, 0)].ravel(),
        pa.table({"image_id": pa.array(reference.ids, pa.string())}),
    )
    return np.where(top >= 0, rows.reshape(top.shape), -1)


def hpir_model_metrics(
    hpir: pa.Table, text_emb: np.ndarray, all_texts: list[str], gallery: Gallery
) -> dict:
    """hpir_{dimension}: confidence-weighted agreement of the model's mean-similarity preference
    with the people's, over the HPIR items whose images are all in the gallery."""
    row_a, row_b, complete = hpir_rows(hpir, gallery)
    position = {t: i for i, t in enumerate(all_texts)}
    q = text_emb[[position[t] for t in hpir["query"].to_pylist()]]
    prefers_a = evaluation.similarity_preference(
        mean_row_similarity(q, gallery, row_a), mean_row_similarity(q, gallery, row_b)
    )
    out = {}
    for dim in HPIR_DIMENSIONS:
        preferred = np.asarray(hpir[f"{dim}_preferred"].to_pylist(), dtype=object)[complete]
        confidence = hpir[f"{dim}_confidence"].to_numpy(zero_copy_only=False)[complete]
        out[f"hpir_{dim}"] = evaluation.hpir_agreement(prefers_a[complete], preferred, confidence)
    return out


def run_judge(config, comparisons, texts, facts, tops, gallery, gt, hpir):
    """Win/similar/loss per (A, B) comparison, and the judge's own HPIR agreement."""
    k = config.evaluate.k
    requests, names_by_pair = [], {}
    for a, b in comparisons:
        names_by_pair[(a, b)] = []
        for q, text in enumerate(texts):
            if (tops[a][q] < 0).any() or (tops[b][q] < 0).any():
                continue  # a row with fewer than k results is not compared
            name = f"{a}~{b}~{q}"
            names_by_pair[(a, b)].append(name)
            f = {c: facts[c][q] for c in facts} if facts else {}
            requests += paired_requests(name, text, f, tops[a][q], tops[b][q])
    hpir_names = []
    if hpir is not None:
        row_a, row_b, complete = hpir_rows(hpir, gallery)
        item_facts = (
            query_facts(config, hpir["query"].to_pylist())
            if config.evaluate.judge.backend == "oracle"
            else None
        )
        for m in np.flatnonzero(complete & (row_a.shape[1] == k)):
            name = f"hpir~{m}"
            hpir_names.append((m, name))
            f = {c: item_facts[c][m] for c in item_facts} if item_facts else {}
            requests += paired_requests(name, hpir["query"][int(m)].as_py(), f, row_a[m], row_b[m])
    if not requests:
        return {}, {}
    log.info("judge (%s): %d calls", config.evaluate.judge.backend, len(requests))
    answers = judge_answers(config, requests, gallery, gt)
    judged = {
        f"{a}_vs_{b}": evaluation.verdict_rates(verdicts(answers, names))
        for (a, b), names in names_by_pair.items()
    }
    judge_hpir = {}
    if hpir_names:
        items = np.array([m for m, _ in hpir_names])
        prefers_a = np.array(
            [
                {"win": 1.0, "loss": 0.0}.get(v, 0.5)
                for v in verdicts(answers, [n for _, n in hpir_names])
            ]
        )
        for dim in HPIR_DIMENSIONS:
            preferred = np.asarray(hpir[f"{dim}_preferred"].to_pylist(), dtype=object)[items]
            confidence = hpir[f"{dim}_confidence"].to_numpy(zero_copy_only=False)[items]
            judge_hpir[dim] = evaluation.hpir_agreement(prefers_a, preferred, confidence)
    return judged, judge_hpir


def _short(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))


def format_table(metrics: dict) -> str:
    """The systems table (and judge rates) as aligned text, for the terminal."""
    systems = metrics["systems"]
    columns = list(dict.fromkeys(c for m in systems.values() for c in m))
    width = max(len(n) for n in systems) + 2
    lines = ["system".ljust(width) + "".join(c.rjust(max(len(c), 7) + 2) for c in columns)]
    for name, m in systems.items():
        cells = "".join(
            (f"{m[c]:.3f}" if isinstance(m.get(c), float) else "-").rjust(max(len(c), 7) + 2)
            for c in columns
        )
        lines.append(name.ljust(width) + cells)
    for pair, rates in metrics["judge"].items():
        lines.append(
            f"judge ({metrics['judge_backend']}) {pair}: win {rates['win']:.2f}, similar "
            f"{rates['similar']:.2f}, loss {rates['loss']:.2f} over {rates['n']} queries"
        )
    for dim, value in metrics.get("judge_hpir", {}).items():
        if value is not None:
            lines.append(f"judge agreement with people on HPIR {dim}: {value:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_job("evaluate", evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
