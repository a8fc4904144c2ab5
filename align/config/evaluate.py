"""The evaluate job's settings: the systems compared, the query-time baselines and the judge."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from align.config.build_preferences import HttpRewriteConfig, RewriteConfig, VllmRewriteConfig
from align.config.sections import PoolConfig, Section
from align.method.prompts import RANKER_PROMPT
from align.storage import paths


class RerankConfig(Section):
    """The re-rank baseline (align/method/ranking.py): the top `depth` by similarity, ordered by
    (1 - w) z(similarity) + w aesthetic."""

    weight: float = Field(
        0.3, ge=0.0, le=1.0, description="Default blend: (1-w) z(similarity) + w aesthetic."
    )
    depth: int = Field(100, ge=1, description="Candidates retrieved and re-ranked (at least k).")


class SteerConfig(Section):
    """clip-retrieval's aesthetic steering (align/method/ranking.py): the query embedding plus `weight`
    times the mean embedding of the corpus's best-rated images, renormalised."""

    weight: float = Field(0.5, ge=0.0, description="How far the query moves towards beauty.")
    top_share: float = Field(
        0.1, gt=0.0, le=1.0, description="Share of the corpus, best aesthetic first, averaged."
    )


class EvalSystemConfig(Section):
    """One system evaluate compares: a model, with or without query rewriting, re-ranking or
    steering."""

    model: str | None = Field(None, description="open_clip model name (None: model.name).")
    pretrained: str | None = Field(
        None,
        description="Checkpoint path or open_clip tag; '{output_dir}' expands (None: "
        "model.pretrained).",
    )
    rewrite: bool = Field(False, description="Search with the rewritten query (evaluate.rewrite).")
    rerank: RerankConfig | None = Field(
        None, description="Re-rank the model's top `depth` by aesthetics (the cascade baseline)."
    )
    steer: SteerConfig | None = Field(
        None, description="Steer the query embedding towards beauty (clip-retrieval's baseline)."
    )
    index_corpus_dir: str | None = Field(
        None,
        description="An index_corpus output of the gallery (evaluate.corpus) built with this "
        "model, searched as it is (for large galleries). None: evaluate embeds the gallery with "
        "the model and searches exactly (the seen corpus is always embedded).",
    )


def _default_judge_prompt() -> str:
    return RANKER_PROMPT


class HttpJudgeConfig(HttpRewriteConfig):
    """A vision-capable OpenAI-compatible endpoint; images go as data URLs."""

    max_tokens: int = Field(16, ge=1)


class VllmJudgeConfig(VllmRewriteConfig):
    """A vision LLM on vLLM through ray.data.llm (GPU workers)."""

    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    engine_kwargs: dict = Field(
        default_factory=lambda: {"max_model_len": 8192, "limit_mm_per_prompt": {"image": 10}}
    )
    max_tokens: int = Field(16, ge=1)


class JudgeConfig(Section):
    """The LMM judge: system A's top-k row against system B's, per query, with the <ranker>
    prompt, asked twice with the rows swapped (a win only when both calls agree)."""

    backend: Literal["oracle", "http", "vllm", "none"] = Field(
        "oracle", description="oracle: the synthetic world's ground truth; none: no judge."
    )
    compare: list[tuple[str, str]] = Field(
        default_factory=lambda: [("aligned", "base"), ("base+rewrite", "base")],
        description="(A, B) system pairs; systems not configured are skipped with a warning.",
    )
    prompt: str = Field(default_factory=_default_judge_prompt)
    oracle_margin: float = Field(
        0.02, ge=0, description="Rows closer than this in oracle quality are similar."
    )
    image_size: int = Field(224, ge=16, description="Longest side of images sent to an LLM.")
    batch_size: int = Field(
        16, ge=1, description="Requests per task that prepares their images (http, vllm)."
    )
    http: HttpJudgeConfig = HttpJudgeConfig()
    vllm: VllmJudgeConfig = VllmJudgeConfig()


class SeenGalleryConfig(Section):
    """A second gallery reported beside the first: the corpus the fine-tune trained on (pairs
    and ratings came from its images), labelled 'seen'. Each system embeds it with its model and
    searches it exactly."""

    corpus: str = Field(paths.WORLD_IMAGES, description="Parquet in the images contract.")
    scores: str = Field(
        paths.INDEX_CORPUS, description="index_corpus output whose scorers give aesthetic@k."
    )
    ground_truth: str | None = Field(
        paths.WORLD_GROUND_TRUTH, description="Its ground truth (None for a real corpus)."
    )
    splits: tuple[str, ...] = Field(
        ("heldout",),
        min_length=1,
        description="Query splits reported on it (of evaluate.splits; the unseen families have "
        "no image in the corpus).",
    )


class EvaluateConfig(Section):
    """The evaluate job: named systems compared on retrieval, aesthetics, HPIR and a judge."""

    output: str = Field(paths.EVALUATE, description="metrics.json, report.html, ...")
    systems: dict[str, EvalSystemConfig] = Field(
        default_factory=lambda: {
            "base": EvalSystemConfig(),
            "base+rewrite": EvalSystemConfig(rewrite=True),
            "aligned": EvalSystemConfig(pretrained=paths.ALIGNED_MODEL),
        }
    )
    queries: str = Field(paths.WORLD_QUERIES, description="The query set.")
    splits: tuple[str, ...] | None = Field(
        ("unseen", "heldout"),
        min_length=1,
        description="Query splits evaluated, each reported apart; the first, on the gallery "
        "(evaluate.corpus), is the headline. None: every query of the file as one set.",
    )
    gallery_title: str = Field(
        "gallery of images no training step read",
        description="What the gallery (evaluate.corpus) is, in the tables' titles.",
    )
    corpus: str = Field(
        paths.WORLD_EVAL_IMAGES,
        description="The gallery, Parquet with image_id and image bytes (the images contract): "
        "images no training step read, what systems without an index_corpus_dir search, and the "
        "images the judge and report show.",
    )
    scores: str = Field(
        paths.INDEX_CORPUS_EVAL,
        description="index_corpus output of the gallery whose scorers give aesthetic@k (fixed "
        "for every system).",
    )
    captions: str | None = Field(
        paths.WORLD_HELDOUT_IMAGES,
        description="Held-out image-caption pairs (images contract) for recall@k (None: skip).",
    )
    ground_truth: str | None = Field(
        paths.WORLD_EVAL_GROUND_TRUTH,
        description="The gallery's ground truth on the synthetic world: true_aesthetic@k, "
        "true_precision@k and the oracle judge (None for a real corpus).",
    )
    hpir: str | None = Field(
        paths.WORLD_HPIR,
        description="HPIR file whose rows are gallery images (the hpir contract; None: skip).",
    )
    seen: SeenGalleryConfig | None = Field(
        default_factory=SeenGalleryConfig,
        description="The training corpus, reported beside the gallery as 'seen' (None: skip).",
    )
    k: int = Field(5, ge=1, description="Top-k for aesthetic@k, true_*@k and the judge's rows.")
    recall_ks: tuple[int, ...] = (1, 5, 10)
    rewrite: RewriteConfig = RewriteConfig()
    judge: JudgeConfig = JudgeConfig()
    decode: PoolConfig = PoolConfig(batch_size=128, concurrency=2, num_cpus=0.25)
    embed: PoolConfig = PoolConfig(batch_size=256, num_cpus=0.5)
    report_queries: int = Field(
        12, ge=0, description="Queries shown as image grids in report.html."
    )

    @model_validator(mode="after")
    def _seen_splits_are_evaluated(self):
        if self.splits is not None and len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits {list(self.splits)} names a split twice")
        if self.seen is not None and self.splits is not None:
            extra = [s for s in self.seen.splits if s not in self.splits]
            if extra:
                raise ValueError(
                    f"seen.splits {list(self.seen.splits)} name {extra}, not in splits "
                    f"{list(self.splits)}"
                )
        return self

    @model_validator(mode="after")
    def _rerank_reaches_k(self):
        for name, system in self.systems.items():
            if system.rerank and system.rerank.depth < self.k:
                raise ValueError(
                    f"systems.{name}.rerank.depth ({system.rerank.depth}) is under k ({self.k}): "
                    "a re-rank needs at least k candidates"
                )
        return self
