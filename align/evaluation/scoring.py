"""One system's top k and metrics, from embeddings already computed (no Ray): the query (plain,
rewritten or steered) searched at the re-rank depth, re-ranked where the system re-ranks, then
measured against the reference gallery's scores and ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from align.config import EvaluateConfig
from align.data.contracts import SCORER_COLUMN_PREFIX
from align.data.queries import query_facts
from align.evaluation import metrics as m
from align.evaluation.gallery import Gallery, GroundTruth, corpus_scores, remap_rows, take_or_nan
from align.evaluation.hpir import hpir_model_metrics
from align.evaluation.systems import System
from align.method import ranking


@dataclass
class ModelPass:
    """One model's embeddings, shared by every system that uses the model."""

    gallery: Gallery
    queries: np.ndarray  # (len(all_texts), d) float32: the queries, then the HPIR file's
    rewritten: np.ndarray | None  # the same texts rewritten (None: no system of it rewrites)
    recall: dict[str, float]

    def text_embeddings(self, system: System) -> np.ndarray:
        return self.rewritten if system.rewrite else self.queries


@dataclass
class Reference:
    """What every system is scored against: the first system's gallery, whose rows index the
    aesthetic scores and the ground truth."""

    gallery: Gallery
    scores: dict[str, np.ndarray]
    gt: GroundTruth | None
    facts: dict[str, np.ndarray] | None  # what each query asks for (ground truth)

    @classmethod
    def read(
        cls,
        gallery: Gallery,
        scores_dir: str,
        ground_truth: str | None,
        queries_path: str,
        texts: list[str],
    ) -> Reference:
        scores = corpus_scores(scores_dir, gallery.ids)
        gt = facts = None
        if ground_truth:
            gt = GroundTruth.read(ground_truth, gallery.ids)
            facts = query_facts(queries_path, texts)
        return cls(gallery, scores, gt, facts)


def system_queries(system: System, model: ModelPass, ref: Reference) -> np.ndarray:
    """The system's query embeddings (every text of the pass): plain or rewritten, and steered
    towards the corpus's best-rated images where the system steers."""
    text_emb = model.text_embeddings(system)
    if not system.steer:
        return text_emb
    gallery = model.gallery
    own_rows = remap_rows(np.arange(len(gallery.ids))[None], gallery, ref.gallery)
    aesthetic = take_or_nan(ref.scores["aesthetic"], own_rows[0])
    direction = ranking.aesthetic_direction(gallery.embeddings, aesthetic, system.steer.top_share)
    return ranking.steer(text_emb, direction, system.steer.weight)


def search_system(
    ev: EvaluateConfig, system: System, model: ModelPass, ref: Reference, queries: np.ndarray
) -> np.ndarray:
    """The system's top k per query (`queries`: its query embeddings), as rows of the reference
    gallery: searched at the re-rank depth, then re-ranked where the system re-ranks."""
    gallery = model.gallery
    depth = system.rerank.depth if system.rerank else ev.k
    similarity, top = gallery.index.search(np.ascontiguousarray(queries, np.float32), depth)
    top = remap_rows(top, gallery, ref.gallery)
    if system.rerank:
        top = ranking.rerank_rows(
            top, similarity, ref.scores["aesthetic"], ev.k, system.rerank.weight
        )
    return top


def system_metrics(
    ev: EvaluateConfig,
    model: ModelPass,
    ref: Reference,
    top: np.ndarray,
    hpir: pa.Table | None,
    all_texts: list[str],
    text_emb: np.ndarray,
) -> dict:
    """recall@k (the model's), each scorer's and the combined aesthetic@k, true_*@k on the
    synthetic world and the HPIR agreement of the system's query embeddings `text_emb` (one
    per text of `all_texts`)."""
    metrics = dict(model.recall)
    for name, values in ref.scores.items():
        label = name.removeprefix(SCORER_COLUMN_PREFIX)
        label = "aesthetic" if label == "aesthetic" else f"aesthetic_{label}"
        metrics[f"{label}@{ev.k}"] = m.mean_at_k(values, top)
    if ref.gt is not None:
        metrics[f"true_aesthetic@{ev.k}"] = m.mean_at_k(ref.gt.true_aesthetic, top)
        metrics[f"true_precision@{ev.k}"] = float(ref.gt.relevance(ref.facts, top).mean())
    if hpir is not None:
        metrics.update(hpir_model_metrics(hpir, text_emb, all_texts, model.gallery))
    return metrics
