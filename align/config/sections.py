"""The building blocks every config shares: `Section` (unknown keys are errors), the Ray
connection, the model, an actor or task pool, an aesthetic scorer, the FAISS index."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


class ModelConfig(Section):
    """A CLIP model, built by align.models.clip.build_clip."""

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
