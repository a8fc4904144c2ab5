"""Typed job configuration: the one place that holds defaults.

Every job is `python -m pipelines.<job> --config PATH [key=value ...]`. The YAML file and the dotted
overrides are merged into one plain dict and validated into `Config`. Unknown keys and wrong types
are errors (`ConfigError`), each naming the key, never warnings.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from align import io, paths
from align.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the key."""


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    address: str | None = Field(
        None,
        description="Ray cluster to join; None uses RAY_ADDRESS when set, else starts an embedded Ray.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for an embedded Ray (None: all).")


class WorldConfig(Section):
    """The synthetic aesthetic world (align.world), made by the make_world job."""

    output: str = Field(
        paths.WORLD, description="make_world writes the world here (align/paths.py: its files)."
    )
    seed: int = 0
    num_images: int = Field(6000, ge=1)
    image_size: int = Field(64, ge=16, le=512, description="Rendered side length in pixels.")
    shard_size: int = Field(1000, ge=1, description="Images per Parquet shard (one Ray task each).")
    caption_quality_share: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of captions that carry truthful quality words."
    )
    heldout_query_share: float = Field(0.25, gt=0.0, lt=1.0)
    heldout_images: int = Field(
        1000,
        ge=0,
        description="Image-caption pairs outside the corpus, never trained on: the gallery and "
        "captions of evaluate's recall@k.",
    )
    pretrain_images: int = Field(
        0,
        ge=0,
        description="Image-caption pairs apart from the corpus and the held-out pairs, for "
        "pretraining the base model (the web a real CLIP learned from; 0: none, and a base "
        "pretrains on the corpus's own captions).",
    )
    rated_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of corpus images people rated (ratings.parquet)."
    )
    rating_noise: float = Field(0.05, ge=0.0, description="Std of a rating around the truth.")
    hpir_items_per_query: int = Field(
        8, ge=0, description="HPIR items (row A vs row B) per held-out query."
    )
    low_level_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of pixel-visible attributes in the true aesthetic; the rest is "
        "composition and colour harmony.",
    )
    jpeg_quality: int = Field(92, ge=50, le=100)


class ModelConfig(Section):
    """A CLIP model, built by align.models.build_clip."""

    name: str = Field("tiny-clip", description="open_clip model name (project configs included).")
    pretrained: str | None = Field(
        None, description="open_clip pretrained tag (e.g. 'openai') or a local checkpoint path."
    )
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


class PoolConfig(Section):
    """Sizing of one Ray Data stage: passed to map_batches, never hard-coded in the stage."""

    batch_size: int = Field(256, ge=1)
    concurrency: int = Field(1, ge=1, description="Actor pool size (tasks: max parallel tasks).")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor (0: CPU).")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per actor; None keeps Ray's (OMP_NUM_THREADS from num_cpus). "
        "On a small CPU machine, more threads than logical CPUs lets one model actor use idle "
        "cores without reserving them (a reservation can starve Ray Data's read tasks).",
    )


class ScorerConfig(Section):
    """One aesthetic scorer and its weight in the combined score."""

    weight: float = Field(1.0, ge=0)
    checkpoint: str | None = Field(None, description="Weights file, for scorers that have one.")
    trained_on: str | None = Field(
        None,
        description="For scorers that read CLIP embeddings: the model ('name:pretrained') whose "
        "embeddings the head was trained on; index_corpus refuses to score another model's "
        "(None: the scorer's own default, e.g. laion_mlp's ViT-L-14:openai).",
    )


class IndexConfig(Section):
    """The FAISS index built over the scored embeddings."""

    type: Literal["auto", "flat", "hnsw", "ivfpq"] = Field(
        "auto",
        description="auto: flat up to flat_max_vectors, then HNSW within the memory "
        "budget, else IVF-PQ.",
    )
    flat_max_vectors: int = Field(200_000, ge=1)
    memory_budget_mb: int = Field(
        8192,
        ge=1,
        description="Per index shard (what one searching process holds): HNSW while a shard's "
        "graph fits, else IVF-PQ with the largest PQ code whose codes and ids fit.",
    )
    hnsw_m: int = Field(32, ge=4)
    hnsw_ef_search: int = Field(128, ge=1)
    ivf_nprobe: int | None = Field(
        None,
        ge=1,
        description="IVF lists searched per query (None: the smallest power of two whose "
        "measured recall@10 reaches target_recall, chosen at build time).",
    )
    target_recall: float = Field(
        0.95,
        gt=0,
        le=1,
        description="IVF-PQ: recall@10 of the corpus search (exact re-scoring included) that the "
        "chosen nprobe must reach on held-back sample vectors.",
    )
    ivf_nlist: int | None = Field(
        None,
        ge=1,
        description="IVF lists for the whole corpus (None: autofaiss' table: a power of two near "
        "4 sqrt(n) below 1M vectors, 16384 to 10M, 65536 to 300M, 131072 beyond).",
    )
    train_sample: int = Field(
        262_144,
        ge=1,
        description="Vectors drawn across every scored shard to train the IVF quantizer and PQ "
        "codebook once (all shards share them); grown to 39 per IVF list where the corpus has "
        "them. Recall queries are held back from the sample beside it.",
    )
    num_shards: int = Field(
        1,
        ge=1,
        description=">1: index shards built in parallel Ray tasks (each reads only its own scored "
        "files); a search assigns a query to IVF lists once and scans every shard's part of them.",
    )
    refine_factor: int = Field(
        8,
        ge=1,
        description="IVF-PQ search: the best refine_factor x k candidates by PQ score over the "
        "shards searched together, re-scored exactly from their stored float16 embeddings.",
    )
    in_process_max_vectors: int = Field(
        2_000_000,
        ge=0,
        description="Consumers of an index (build_preferences) load every shard in their own "
        "process up to this corpus size; beyond it search actors hold the shards.",
    )
    search_actors: int | None = Field(
        None,
        ge=1,
        description="Search actors over a corpus beyond in_process_max_vectors, each holding an "
        "equal, contiguous share of the shards and placed one per node (None: one per node with "
        "CPUs).",
    )
    shard_actor_cpus: float = Field(
        1.0, ge=0, description="CPUs reserved by each search actor (and its FAISS threads)."
    )
    merge_ondisk: bool = Field(
        False,
        description="IVF-PQ: also merge every shard's lists into one on-disk index "
        "(merged.faiss + merged.ivfdata, FAISS OnDiskInvertedLists, as autofaiss' merge_ondisk) "
        "for single-node serving; searches in one process then use it instead of the shards. "
        "A local index folder only.",
    )
    recall_queries: int = Field(200, ge=1, description="Sampled queries for measured recall@10.")
    drop_exact_duplicates: bool = Field(
        False,
        description="Leave images whose bytes (sha256) equal an earlier image's out of the "
        "index; they are listed in index/duplicates.parquet either way.",
    )
    seed: int = 0


class IndexCorpusConfig(Section):
    """The index_corpus job: decode, embed, score, write shards, build the index."""

    input: str = Field(paths.WORLD_IMAGES, description="Path or URI; {output_dir} expands.")
    input_format: Literal["parquet", "folder", "webdataset"] = "parquet"
    output: str = Field(
        paths.INDEX_CORPUS,
        description="Scored shards, index, errors, manifest; one folder per model indexed.",
    )
    id_column: str = "image_id"
    image_column: str | None = Field("image", description="Parquet column of image bytes.")
    path_column: str | None = Field(None, description="Parquet column of image paths (instead).")
    files_per_unit: int = Field(
        1,
        ge=1,
        description="Input files per unit of work (parquet, webdataset); a unit is what "
        "a resumed run skips when done.",
    )
    images_per_unit: int = Field(20_000, ge=1, description="Images per unit for folder input.")
    unit_retries: int = Field(
        2,
        ge=0,
        description="Times a unit is run again, from an empty folder, when its pipeline failed "
        "inside Ray rather than in this project's code or on the data (a node lost while the unit "
        "listed its files, a worker gone); bad images are error rows and never a failure.",
    )
    max_member_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="WebDataset: a tar member larger than this (after decompression) is an error "
        "row, never read into memory (tar bombs).",
    )
    tar_timeout_s: float = Field(
        600.0,
        gt=0,
        description="WebDataset: seconds a tar's reader (a child process) may be waited on; past "
        "it the reader is killed, the rest of the tar is an error row naming it and the job goes "
        "on. Bounds tars crafted to make the interpreter's tar parser loop or backtrack, and "
        "reads that stall.",
    )
    decode: PoolConfig = PoolConfig(batch_size=128, concurrency=2)
    embed: PoolConfig = PoolConfig()
    score: PoolConfig = PoolConfig()
    scorers: dict[str, ScorerConfig] = Field(
        default_factory=lambda: {"lowlevel": ScorerConfig()},
        description="Scorer name (lowlevel, laion_mlp) -> weight and checkpoint.",
    )
    index: IndexConfig = IndexConfig()
    steps: list[Literal["embed", "index"]] = Field(
        default_factory=lambda: ["embed", "index"],
        description="embed: decode, embed and score into scored/; index: build the index from "
        "the scored shards there. [index] rebuilds it with other index settings, embedding "
        "nothing.",
    )


class HttpRewriteConfig(Section):
    """An OpenAI-compatible chat-completions endpoint, called through ray.data.llm."""

    url: str = "http://127.0.0.1:8000/v1/chat/completions"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = Field(
        None,
        description="Environment variable holding the API key, sent as a Bearer token to `url` "
        "(None: no key is sent; there is no default variable, so no key goes to a URL by "
        "accident).",
    )
    allow_key_over_http: bool = Field(
        False,
        description="Send the key over plain http to a host that is not loopback (it travels "
        "readable on the network); https, or http to 127.0.0.1/localhost, need no permission.",
    )
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(1, ge=1)
    max_retries: int = Field(2, ge=0)
    max_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)


class VllmRewriteConfig(Section):
    """vLLM through ray.data.llm (the `gpu` extra, GPU workers)."""

    model: str = "Qwen/Qwen2.5-7B-Instruct"
    engine_kwargs: dict = Field(default_factory=lambda: {"max_model_len": 4096})
    batch_size: int = Field(64, ge=1)
    concurrency: int = Field(1, ge=1)
    max_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)


def _default_prompts() -> dict[str, str]:
    from align.rewrite import PROMPT_TEMPLATES

    return dict(PROMPT_TEMPLATES)


def _default_system_prompt() -> str:
    from align.rewrite import SYSTEM_PROMPT

    return SYSTEM_PROMPT


class RewriteConfig(Section):
    backend: Literal["keywords", "http", "vllm"] = "keywords"
    system_prompt: str = Field(default_factory=_default_system_prompt)
    prompt_templates: dict[str, str] = Field(
        default_factory=_default_prompts,
        description="LLM prompt per variant, with a {query} slot (align/rewrite.py has the "
        "defaults: the paper's <detail>, <k list>, <kw dict>, repeat, <reorg>).",
    )
    variant: Literal["original", "repeat", "k_list", "k_phrase", "kw_dict", "detail", "reorg"] = (
        "k_list"
    )
    keywords: int = Field(5, ge=1, description="Keywords (k_list) or aspects (kw_dict) added.")
    max_chars: int = Field(400, ge=1, description="Longer completions fall back to the query.")
    num_cpus: float = Field(0.25, ge=0, description="CPUs of a keywords-backend rewrite task.")
    http: HttpRewriteConfig = HttpRewriteConfig()
    vllm: VllmRewriteConfig = VllmRewriteConfig()

    @model_validator(mode="after")
    def _variant_fits_backend(self):
        from align.rewrite import KEYWORD_VARIANTS

        if self.backend == "keywords" and self.variant not in KEYWORD_VARIANTS:
            raise ValueError(
                f"variant {self.variant!r} needs an LLM (backend http or vllm); the keywords "
                f"backend does {', '.join(KEYWORD_VARIANTS)}"
            )
        if self.backend != "keywords" and self.variant == "original":
            raise ValueError(
                f"variant 'original' keeps the query as it is: it needs no LLM, use backend "
                f"keywords (not {self.backend})"
            )
        return self


class GridConfig(Section):
    """The u x v preference grid (align.pairing)."""

    u: int = Field(4, ge=1, description="Rows: semantic-relevance levels.")
    v: int = Field(4, ge=1, description="Columns: aesthetic levels within a row.")
    stride: int = Field(2, ge=1, description="Take every stride-th candidate by relevance.")


# The queries build_preferences can retrieve its candidates with (actors/retrieve.py).
RETRIEVE_WITH = ("rewritten", "original+rewritten", "original")


class BuildPreferencesConfig(Section):
    """The build_preferences job: rewrite, retrieve, re-rank, pairs."""

    output: str = Field(
        paths.BUILD_PREFERENCES, description="pairs/, candidates/, rewrites/, errors/, manifest."
    )
    queries: str = Field(paths.WORLD_QUERIES, description="Parquet, JSONL or text (one per line).")
    split: str | None = Field("train", description="Keep rows of this split (if a split column).")
    index_corpus_dir: str = Field(
        paths.INDEX_CORPUS, description="Output of index_corpus: index and scored shards."
    )
    top_k: int = Field(64, ge=1, description="Candidates retrieved per rewritten query.")
    retrieve_with: Literal[RETRIEVE_WITH] = Field(
        "rewritten",
        description="The query that retrieves the candidates: the rewritten one (the paper), "
        "the sum of both embeddings renormalised (keeps the content of the original and the "
        "rewrite's pull towards beauty), or the original alone (no rewrite in the pairs).",
    )
    rewrite: RewriteConfig = RewriteConfig()
    grid: GridConfig = GridConfig()
    embed: PoolConfig = PoolConfig(batch_size=256)
    retrieve: PoolConfig = PoolConfig(batch_size=64)

    @model_validator(mode="after")
    def _top_k_fills_the_grid(self):
        # Too few candidates would skip every query, and the job after it (finetune) would stop
        # on an empty pairs/ folder: say so here, naming both settings.
        from align.pairing import candidates_needed

        g = self.grid
        need = candidates_needed(g.u, g.v, g.stride)
        if self.top_k < need:
            raise ValueError(
                f"top_k ({self.top_k}) is under the {need} candidates that grid {g.u} x {g.v} "
                f"with stride {g.stride} reads: raise top_k to {need} or shrink the grid"
            )
        return self


class DpoConfig(Section):
    """Retrieval DPO (docs/method.md, Retrieval DPO; align.losses.retrieval_dpo_loss)."""

    beta: float = Field(0.1, gt=0)
    temperature: Literal["logit_scale"] | float = Field(
        "logit_scale",
        description="tau of pi(x|q) ~ exp(s/tau): 'logit_scale' uses 1 / the model's learned "
        "logit scale (detached), a number fixes it.",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="eps of conservative DPO.")
    ipo: bool = Field(False, description="IPO instead of sigmoid DPO.")
    reference: Literal["precomputed", "recompute"] = Field(
        "precomputed",
        description="precomputed: the pairs' stored reference similarities (no reference "
        "forward pass); recompute: a frozen copy of the initial model on every worker.",
    )

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, v):
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be > 0 or 'logit_scale'")
        return v


class OptimConfig(Section):
    """AdamW with linear warm-up then cosine (or constant) learning rate."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0: no clipping).")
    fused: bool = Field(
        True,
        description="torch's fused AdamW kernel, one pass over every parameter. On CPU torch "
        "otherwise loops over the tensors: 26 ms against 3.5 ms a step for micro-rn-clip on one "
        "thread, most of it the 3.2M-row token embedding.",
    )


class DeepSpeedConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU (DeepSpeed's CPU accelerator)."
    )


class TrainScalingConfig(Section):
    """Ray Train's ScalingConfig: one training worker per GPU, or CPU workers."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="Reserved per worker; leave room for the Ray Data ingest tasks beside them.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray Train's placement of the workers: PACK fills a node first (fast "
        "collectives); SPREAD puts them on different nodes where it can (a lost node costs "
        "fewer workers).",
    )
    threads: int | None = Field(None, ge=1, description="torch threads per worker (None: Ray's).")
    threads_follow_load: bool = Field(
        True,
        description="Each worker uses no more torch threads than the cores other processes "
        "leave free, re-checked as it trains (a thread beside a busy process stalls every op). "
        "false: always `threads`, so two runs repeat bit for bit (a float sum rounds differently "
        "split over another number of threads), however busy the machine.",
    )


class JoinConfig(Section):
    """Ray Data's hash join that attaches image bytes to the pairs."""

    num_partitions: int = Field(2, ge=1)
    num_cpus: float = Field(0.1, gt=0, description="Per join aggregator actor.")


class FinetuneConfig(Section):
    """The finetune job: Ray Train + DeepSpeed (or DDP), retrieval DPO + contrastive."""

    objective: Literal["dpo", "contrastive"] = Field(
        "dpo",
        description="dpo: L_dpo + contrastive_weight * L_contrastive (alignment); contrastive: "
        "CLIP InfoNCE on image-caption pairs alone (pretraining the demo's base model).",
    )
    pairs: str = Field(paths.PAIRS, description="Pairs shards.")
    images: str = Field(
        paths.WORLD_IMAGES, description="Image shards holding the pairs' image bytes."
    )
    captions: str = Field(
        paths.WORLD_IMAGES, description="Image-caption shards for the contrastive term."
    )
    output: str = Field(paths.FINETUNE, description="Run storage, export, metrics.")
    contrastive_weight: float = Field(
        0.5, ge=0, description="lambda of L_dpo + lambda * L_contrastive (0: no caption stream)."
    )
    pairs_per_batch: int = Field(64, ge=1, description="Per worker and step.")
    captions_per_batch: int = Field(64, ge=2, description="Per worker and step.")
    max_steps: int = Field(100, ge=1, description="Optimiser steps; the streams repeat as needed.")
    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: TrainScalingConfig = TrainScalingConfig()
    dpo: DpoConfig = DpoConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: no limit)."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Consecutive non-finite-loss steps (skipped) before the run stops."
    )
    decode: PoolConfig = PoolConfig(batch_size=128, concurrency=2, num_cpus=0.25)

    @property
    def uses_pairs(self) -> bool:
        """The pairs stream feeds the DPO term."""
        return self.objective == "dpo"

    @property
    def uses_captions(self) -> bool:
        """The caption stream feeds InfoNCE: the whole loss, or DPO's regulariser when lambda > 0."""
        return self.objective == "contrastive" or self.contrastive_weight > 0

    pair_images: Literal["auto", "broadcast", "join"] = Field(
        "auto",
        description="How pairs get their image bytes: broadcast (every decode actor holds the "
        "pairs' images), join (Ray Data hash join), auto (broadcast up to broadcast_max_mb).",
    )
    broadcast_max_mb: int = Field(2048, ge=0)
    join: JoinConfig = JoinConfig()
    shuffle_buffer: int = Field(1024, ge=0, description="Local shuffle buffer, rows per worker.")
    cache_decoded_mb: int = Field(
        1024,
        ge=0,
        description="A training stream whose decoded images fit in this many MB is decoded once "
        "and kept in the object store (each epoch in a new block order); a larger one is read "
        "and decoded again every epoch. 0: never cache. Only on a one-node cluster: on several, "
        "a lost node would take cached blocks that cannot be rebuilt.",
    )
    seed: int = 0
    preserve_order: bool = Field(
        True,
        description="Ray Data hands the workers their blocks in a fixed order (Ray's "
        "execution_options.preserve_order), so every step's batches follow from `seed` (the "
        "weights too, where the thread count repeats: scaling.threads_follow_load). false: "
        "blocks in the order their tasks finish, which can feed a stream decoded every epoch "
        "faster when some tasks lag.",
    )
    batchnorm: Literal["auto", "train", "frozen"] = Field(
        "auto",
        description="BatchNorm layers (ResNet towers): frozen keeps the base model's running "
        "statistics and normalises with them (eval mode) while their gains and biases still "
        "train, as ResNet CLIPs are fine-tuned; train updates them from each batch; auto: frozen "
        "for dpo (a small shift on top of a trained model, whose reference log-probabilities "
        "were computed in eval mode), train for contrastive pretraining.",
    )

    @property
    def batchnorm_frozen(self) -> bool:
        """Whether BatchNorm layers run in eval mode during training."""
        if self.batchnorm == "auto":
            return self.objective == "dpo"
        return self.batchnorm == "frozen"


class TrainScorerConfig(Section):
    """The train_scorer job: the rated_cnn aesthetic scorer, learned from people's ratings."""

    ratings: str = Field(paths.WORLD_RATINGS, description="The ratings contract.")
    images: str = Field(paths.WORLD_IMAGES, description="Images contract (bytes).")
    output: str = Field(paths.AESTHETIC_SCORER, description="model.pt, metrics.json.")
    image_size: int = Field(32, ge=16, description="Input side; a multiple of 16.")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0, description="Peak of a one-cycle schedule (AdamW).")
    weight_decay: float = Field(1e-4, ge=0)
    validation_share: float = Field(0.1, gt=0, lt=1, description="Ratings held out to score it.")
    num_cpus: float = Field(2, gt=0, description="CPUs of the training task (its torch threads).")
    num_gpus: float = Field(0, ge=0)
    decode: PoolConfig = PoolConfig(batch_size=256, concurrency=2, num_cpus=0.25)
    seed: int = 0


class RerankConfig(Section):
    """The re-rank baseline (align/ranking.py): the top `depth` by similarity, ordered by
    (1 - w) z(similarity) + w aesthetic."""

    weight: float = Field(
        0.3, ge=0.0, le=1.0, description="Default blend: (1-w) z(similarity) + w aesthetic."
    )
    depth: int = Field(100, ge=1, description="Candidates retrieved and re-ranked (at least k).")


class SteerConfig(Section):
    """clip-retrieval's aesthetic steering (align/ranking.py): the query embedding plus `weight`
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
        description="An index_corpus output built with this model, searched as it is (for large "
        "corpora). None: evaluate embeds evaluate.corpus with the model and searches exactly.",
    )


def _default_judge_prompt() -> str:
    from align.evaluation import RANKER_PROMPT

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
    split: str | None = Field("heldout", description="Keep queries of this split.")
    corpus: str = Field(
        paths.WORLD_IMAGES,
        description="Parquet with image_id and image bytes (the images contract): what systems "
        "without an index_corpus_dir search, and the images the judge and report show.",
    )
    scores: str = Field(
        paths.INDEX_CORPUS,
        description="index_corpus output whose scorers give aesthetic@k (fixed for every system).",
    )
    captions: str | None = Field(
        paths.WORLD_HELDOUT_IMAGES,
        description="Held-out image-caption pairs (images contract) for recall@k (None: skip).",
    )
    ground_truth: str | None = Field(
        paths.WORLD_GROUND_TRUTH,
        description="The synthetic world's ground truth: true_aesthetic@k, true_precision@k and "
        "the oracle judge (None for a real corpus).",
    )
    hpir: str | None = Field(
        paths.WORLD_HPIR, description="HPIR file (the hpir contract; None: skip)."
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
    def _rerank_reaches_k(self):
        for name, system in self.systems.items():
            if system.rerank and system.rerank.depth < self.k:
                raise ValueError(
                    f"systems.{name}.rerank.depth ({system.rerank.depth}) is under k ({self.k}): "
                    "a re-rank needs at least k candidates"
                )
        return self


# Where the pretrain section differs from finetune's defaults (also under a `pretrain:` section
# of a file that leaves them out).
PRETRAIN_DEFAULTS = {
    "objective": "contrastive",
    "output": paths.PRETRAIN,
    "max_steps": 300,
    "captions_per_batch": 128,
    "optim": {"lr": 1e-3, "warmup_steps": 10},
}


class Config(Section):
    """Root config shared by every job; each job reads the sections it needs."""

    output_dir: str = Field("outputs/demo", description="Every job writes under this path or URI.")
    max_image_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Decompression-bomb guard of every decoder (index_corpus, train_scorer, "
        "finetune, evaluate and its report): larger images are error rows.",
    )
    ray: RayConfig = RayConfig()
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    index_corpus: IndexCorpusConfig = IndexCorpusConfig()
    build_preferences: BuildPreferencesConfig = BuildPreferencesConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    train_scorer: TrainScorerConfig = TrainScorerConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    pretrain: FinetuneConfig = Field(
        default_factory=lambda: FinetuneConfig(**PRETRAIN_DEFAULTS),
        description="The pretrain job (and the demo's first training step): CLIP InfoNCE on "
        "image-caption pairs from model.pretrained (None: random init); same keys as finetune.",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrain_section_defaults(cls, data):
        # A `pretrain:` section in a file replaces the default section whole, and its keys would
        # otherwise default to the finetune job's: it would write into finetune's output.
        if isinstance(data, dict) and isinstance(data.get("pretrain"), dict):
            data = {**data, "pretrain": {**PRETRAIN_DEFAULTS, **data["pretrain"]}}
        return data

    @model_validator(mode="after")
    def _pretrain_is_contrastive(self):
        if self.pretrain.objective != "contrastive":
            raise ValueError("pretrain.objective must be 'contrastive' (dpo is the finetune job)")
        return self

    @model_validator(mode="after")
    def _expand_model_path(self):
        # A checkpoint may live under output_dir (the demo's pretrained base model, its scorer).
        pretrained = self.model.pretrained
        if pretrained and "{output_dir}" in pretrained:
            self.model.pretrained = self.expand(pretrained)
        for scorer in self.index_corpus.scorers.values():
            if scorer.checkpoint and "{output_dir}" in scorer.checkpoint:
                scorer.checkpoint = self.expand(scorer.checkpoint)
        return self

    def for_other_processes(self) -> Config:
        """This config with every local path that names a file absolute, resolved here in the
        driver: output_dir and a local model checkpoint. For processes whose working directory
        differs: Ray Train moves each worker into its run folder (`os.chdir`), where a relative
        `outputs/demo` would name another place."""
        pretrained = self.model.pretrained
        if pretrained and not io.is_uri(pretrained) and os.path.exists(pretrained):
            pretrained = os.path.abspath(pretrained)  # a checkpoint file, not an open_clip tag
        return self.model_copy(
            update={
                "output_dir": io.absolute(self.output_dir),
                "model": self.model.model_copy(update={"pretrained": pretrained}),
            }
        )

    def expand(self, path: str) -> str:
        """Expand `{output_dir}` in a configured path; local paths become absolute."""
        path = path.replace("{output_dir}", self.output_dir.rstrip("/"))
        return io.absolute(path)

    def path(self, *parts: str) -> str:
        """A path under output_dir, joined with '/' so that URIs (s3://...) work too. A local
        path is made absolute here, in the driver, so Ray workers write to the same place."""
        root = io.absolute(self.output_dir)
        return "/".join([root.rstrip("/"), *parts])


# ---------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML (so 3, 0.5, true, null, [1,2] work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. world.seed=3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _model_class(annotation: Any) -> type[BaseModel] | None:
    """The section class of a field's annotation; an optional section (`Section | None`, such as
    a system's `rerank`) counts as that section, so dotted overrides reach inside it."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [a for a in get_args(annotation) if a is not type(None)]
    if len(members) == 1 and get_args(annotation) and type(None) in get_args(annotation):
        return _model_class(members[0])
    return None


def _node_at(path: list[str]) -> tuple[str, type[BaseModel]] | None:
    """What sits at a dotted path: ("section", cls), ("mapping", value cls) for a
    `dict[str, Section]` field such as index_corpus.scorers (any key, Section values), or None
    when the path names a plain value or nothing."""
    node: tuple[str, type[BaseModel]] | None = ("section", Config)
    for part in path:
        if node is None:
            return None
        kind, cls = node
        if kind == "mapping":
            node = ("section", cls)
            continue
        field = cls.model_fields.get(part)
        if field is None:
            return None
        if get_origin(field.annotation) is dict:
            value_cls = _model_class(get_args(field.annotation)[1])
            node = ("mapping", value_cls) if value_cls else None
        else:
            sub = _model_class(field.annotation)
            node = ("section", sub) if sub else None
    return node


def _unknown_key_message(path: list[str]) -> str:
    parent = _node_at(path[:-1])
    where = ".".join(path[:-1]) or "the top level"
    valid = ", ".join(parent[1].model_fields) if parent and parent[0] == "section" else "(none)"
    return f"unknown config key '{'.'.join(path)}'; valid keys under {where}: {valid}"


def _format_validation_error(err: ValidationError) -> str:
    problems = []
    for e in err.errors():
        path = [str(p) for p in e["loc"]]
        if e["type"] == "extra_forbidden":
            problems.append(_unknown_key_message(path))
        elif not path:  # a check across sections; its message names the keys
            problems.append(e["msg"].removeprefix("Value error, "))
        elif e["type"] == "value_error" and isinstance(e.get("input"), dict):
            # A check across one section's keys: its message names them, relative to the section.
            problems.append(
                f"config section '{'.'.join(path)}': {e['msg'].removeprefix('Value error, ')}"
            )
        else:
            got = e.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            problems.append(f"config key '{'.'.join(path)}': {e['msg'].lower()}{got_text}")
    return "; ".join(problems)


def _set_dotted(data: dict, path: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(path[:-1]):
        if _node_at(path[: i + 1]) is None:
            parent = _node_at(path[:i])
            if parent and parent[0] == "section" and part in parent[1].model_fields:
                raise ConfigError(
                    f"config key '{'.'.join(path[: i + 1])}' is a value, not a section"
                )
            raise ConfigError(_unknown_key_message(path[: i + 1]))
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{'.'.join(path[: i + 1])}' is a section, not a value")
        node = child
    node[path[-1]] = value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config, apply dotted overrides, validate.

    Args:
        path: YAML file; None gives the defaults.
        overrides: `key.sub=value` strings applied after the file, in order.
    Returns:
        The validated Config.
    Raises:
        ConfigError: missing or malformed file, unknown key, wrong type. One line, naming the key.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    data = copy.deepcopy(data)
    for text in overrides:
        key_path, value = parse_override(text)
        _set_dotted(data, key_path, value)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def config_to_dict(config: Config) -> dict:
    """Plain JSON-able dict of a config (for manifests and Ray task arguments)."""
    return config.model_dump(mode="json")
