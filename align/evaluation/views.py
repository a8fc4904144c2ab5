"""The tables an evaluation reports: each gallery searched (`gallery`, evaluate.corpus: on the
synthetic world, images no training step read; `seen`, evaluate.seen: the corpus the fine-tune
trained on) with each query split (`unseen`: query families the alignment never saw; `heldout`:
held-out queries of trained families), the first gallery and split the headline.

metrics.json holds every table under `tables` (keyed `gallery/split`), their order in `order`
(the headline first: JSON objects are written with sorted keys) and repeats the headline's
`systems`, `judge`, `judge_hpir` and `queries` at its top level, where a reader of one table
looks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align.config import EvaluateConfig
from align.evaluation.scoring import Reference
from align.models.clip import image_tower_digest

SEEN_TITLE = "the corpus the fine-tune trained on (seen)"
# What each query split of the synthetic world stands for, in the tables' titles.
SPLIT_TITLES = {
    "unseen": "query families the alignment never saw",
    "heldout": "held-out queries of trained families",
    None: "every query",
}


@dataclass(frozen=True)
class GallerySource:
    """One gallery evaluate searches: its images, scores and ground truth, the HPIR file drawn
    from it, and the query splits reported on it."""

    name: str
    title: str
    config_key: str  # where its paths are configured, for error messages
    corpus: str
    scores: str
    ground_truth: str | None
    hpir: str | None
    splits: tuple[str | None, ...]
    own_index: bool  # a system's index_corpus_dir, where set, is this gallery's index


@dataclass(frozen=True)
class View:
    """One table: a gallery and a query split."""

    gallery: GallerySource
    split: str | None

    @property
    def key(self) -> str:
        return f"{self.gallery.name}/{self.split or 'all'}"

    @property
    def title(self) -> str:
        return f"{self.gallery.title}, {SPLIT_TITLES.get(self.split, f'split {self.split}')}"


@dataclass
class Queries:
    """The evaluated queries (every split), the split of each, and every text embedded (the
    queries, then the HPIR file's)."""

    texts: list[str]
    splits: np.ndarray
    all_texts: list[str]
    rewritten: list[str]
    hpir: pa.Table | None
    rows_in: int
    fallbacks: int = 0


@dataclass
class Run:
    """Per gallery: its reference, each system's top k for every query (reference rows); per
    table (View.key): each system's metrics."""

    refs: dict[str, Reference] = field(default_factory=dict)
    tops: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    metrics: dict[str, dict[str, dict]] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)
    # Image embeddings by (model name, image tower digest, sources), with the system that made
    # them: a fine-tune that locked its image tower reads its base's instead of embedding again.
    image_passes: dict[tuple, tuple[str, list]] = field(default_factory=dict)
    # Per model (the first system of it): the system whose image embeddings it read.
    image_pass_of: dict[str, str] = field(default_factory=dict)

    def image_embeddings(self, system, sources: list[str], embed: Callable[[], tuple]) -> list:
        """(ids, embeddings) per source from `embed()` (which returns them and its error rows),
        or those of an earlier system whose model has the same image tower
        (align.models.clip.image_tower_digest)."""
        key = (system.model.name, image_tower_digest(system.model), tuple(sources))
        if key not in self.image_passes:
            embedded, bad = embed()
            self.errors.extend(bad)
            self.image_passes[key] = (system.name, embedded)
        first, embedded = self.image_passes[key]
        self.image_pass_of[system.name] = first
        return list(embedded)


def gallery_sources(ev: EvaluateConfig, expand) -> list[GallerySource]:
    """The configured galleries, paths expanded (`expand`: Config.expand): the gallery
    (evaluate.corpus) first, then the seen corpus (evaluate.seen) if configured. Without splits
    (evaluate.splits null) every gallery reports every query as one table."""
    optional = lambda p: expand(p) if p else None  # noqa: E731
    splits = tuple(ev.splits) if ev.splits is not None else (None,)
    out = [
        GallerySource(
            "gallery",
            ev.gallery_title,
            "evaluate",
            expand(ev.corpus),
            expand(ev.scores),
            optional(ev.ground_truth),
            optional(ev.hpir),
            splits,
            own_index=True,
        )
    ]
    if ev.seen is not None:
        seen = ev.seen
        out.append(
            GallerySource(
                "seen",
                SEEN_TITLE,
                "evaluate.seen",
                expand(seen.corpus),
                expand(seen.scores),
                optional(seen.ground_truth),
                None,
                tuple(seen.splits) if ev.splits is not None else (None,),
                own_index=False,
            )
        )
    return out


def views(galleries: list[GallerySource]) -> list[View]:
    """Every (gallery, split) table, the headline first."""
    return [View(g, s) for g in galleries for s in g.splits]


def query_rows(splits: np.ndarray, split: str | None) -> np.ndarray:
    """Rows of the evaluated queries in `split` (every row for None)."""
    return np.arange(len(splits)) if split is None else np.flatnonzero(splits == split)


def view_queries(view: View, queries: Queries) -> tuple[np.ndarray, list[str], pa.Table | None]:
    """What one table reports on: the rows of `queries` in its split, their texts, and its HPIR
    items (from the HPIR file of a gallery that has one)."""
    rows = query_rows(queries.splits, view.split)
    texts = [queries.texts[r] for r in rows]
    return rows, texts, hpir_for(queries.hpir, view.split, texts) if view.gallery.hpir else None


def reference_for(ref: Reference, rows: np.ndarray) -> Reference:
    """`ref` with its per-query facts narrowed to the queries at `rows`."""
    facts = None if ref.facts is None else {c: v[rows] for c, v in ref.facts.items()}
    return Reference(ref.gallery, ref.scores, ref.gt, facts)


def hpir_for(hpir: pa.Table | None, split: str | None, texts: list[str]) -> pa.Table | None:
    """The HPIR items of one table: those whose query is one of its `texts` (the queries of
    `split`), every item when the evaluation has no splits; None when there are none."""
    if hpir is None or split is None:
        return hpir
    items = hpir.filter(pc.is_in(hpir["query"], value_set=pa.array(texts, pa.string())))
    return items if items.num_rows else None


def tables_of(metrics: dict) -> dict[str, dict]:
    """The tables of a metrics.json in their order, headline first (one untitled table for a
    metrics dict without `tables`)."""
    tables = metrics.get("tables")
    if not tables:
        return {"": metrics}
    return {key: tables[key] for key in metrics.get("order", tables)}


def table(view: View, queries: int, metrics: dict[str, dict], judged: dict) -> dict:
    """One table of metrics.json: what it shows, its queries, each system's metrics
    (`metrics[view.key]`) and the judge's rates and HPIR agreement (`judged[view.key]`)."""
    rates, agreement = judged[view.key]
    return {
        "title": view.title,
        "gallery": view.gallery.name,
        "split": view.split,
        "queries": queries,
        "systems": metrics[view.key],
        "judge": rates,
        "judge_hpir": agreement,
    }


def metrics_json(
    shown: list[View], queries: Queries, metrics: dict, judged: dict, ev: EvaluateConfig
) -> dict:
    """metrics.json: the headline table (the first view's) at the top level, then every table;
    `metrics` and `judged` are keyed by View.key."""
    tables = {
        v.key: table(v, len(query_rows(queries.splits, v.split)), metrics, judged) for v in shown
    }
    rewrite = {"backend": ev.rewrite.backend, "variant": ev.rewrite.variant}
    headline = next(iter(tables))
    top = {key: tables[headline][key] for key in ("systems", "judge", "judge_hpir", "queries")}
    return {
        "headline": headline,
        **top,
        "tables": tables,
        "order": list(tables),
        "k": ev.k,
        "judge_backend": ev.judge.backend,
        "rewrite": {**rewrite, "fallbacks": queries.fallbacks},
    }
