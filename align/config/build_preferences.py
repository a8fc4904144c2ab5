"""The build_preferences job's settings: the rewriter (keywords, an HTTP endpoint or vLLM), the
retrieval and the u x v preference grid."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from align.config.sections import PoolConfig, Section
from align.method.pairing import candidates_needed
from align.method.prompts import PROMPT_TEMPLATES, SYSTEM_PROMPT
from align.method.rewrite import KEYWORD_VARIANTS
from align.storage import paths


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
    return dict(PROMPT_TEMPLATES)


def _default_system_prompt() -> str:
    return SYSTEM_PROMPT


class RewriteConfig(Section):
    backend: Literal["keywords", "http", "vllm"] = "keywords"
    system_prompt: str = Field(default_factory=_default_system_prompt)
    prompt_templates: dict[str, str] = Field(
        default_factory=_default_prompts,
        description="LLM prompt per variant, with a {query} slot (align/method/prompts.py has the "
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
    """The u x v preference grid (align.method.pairing)."""

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

        g = self.grid
        need = candidates_needed(g.u, g.v, g.stride)
        if self.top_k < need:
            raise ValueError(
                f"top_k ({self.top_k}) is under the {need} candidates that grid {g.u} x {g.v} "
                f"with stride {g.stride} reads: raise top_k to {need} or shrink the grid"
            )
        return self
