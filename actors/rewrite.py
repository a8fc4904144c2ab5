"""Query rewrite stage: keyword rewriting (batch function) or an LLM via ray.data.llm.

Every query comes out with a `rewritten` text. A failed, empty or over-long completion keeps the
original query and says why in `fallback`; it is never fatal.
"""

from __future__ import annotations

import os

import numpy as np

from actors import require_batch_columns
from align.config import RewriteConfig
from align.rewrite import keyword_rewrite

REQUIRED = {"query_id": "id of the query", "query": "the original query"}


def checked_completion(query: str, completion: str | None, error: str | None, max_chars: int):
    """(rewritten, fallback reason or None): the completion, or the query when it is unusable."""
    text = (completion or "").strip().strip('"').strip()
    if error:
        return query, f"llm error: {str(error).splitlines()[0][:200]}"
    if not text:
        return query, "empty completion"
    if len(text) > max_chars:
        return query, f"completion over {max_chars} characters ({len(text)})"
    return text, None


def keyword_rewrite_batch(batch: dict[str, np.ndarray], *, variant: str, keywords: int) -> dict:
    """The `keywords` backend as a batch function (CPU tasks): no model, deterministic."""
    require_batch_columns(batch, REQUIRED, "rewrite")
    rewritten = np.array(
        [keyword_rewrite(q, variant, keywords) for q in batch["query"]], dtype=object
    )
    return {
        **batch,
        "rewritten": rewritten,
        "fallback": np.full(len(rewritten), "", dtype=object),
    }


def _messages(query: str, cfg: RewriteConfig) -> list[dict]:
    return [
        {"role": "system", "content": cfg.system_prompt},
        {"role": "user", "content": cfg.prompt_templates[cfg.variant].format(query=query)},
    ]


def build_llm_rewriter(cfg: RewriteConfig):
    """A ray.data.llm processor (Dataset -> Dataset) for the http or vllm backend."""
    from ray.data.llm import build_processor

    if cfg.variant not in cfg.prompt_templates:
        raise ValueError(
            f"rewrite variant {cfg.variant!r} has no prompt template; "
            f"templates: {', '.join(cfg.prompt_templates)}"
        )
    max_chars = cfg.max_chars

    def postprocess(row: dict) -> dict:
        if cfg.backend == "http":
            response = row.get("http_response") or {}
            choices = response.get("choices") or [{}]
            completion = (choices[0].get("message") or {}).get("content")
            error = row.get("__inference_error__") or response.get("error")
        else:
            completion, error = row.get("generated_text"), row.get("__inference_error__")
        rewritten, fallback = checked_completion(row["query"], completion, error, max_chars)
        return {
            "query_id": row["query_id"],
            "query": row["query"],
            "rewritten": rewritten,
            "fallback": fallback or "",
        }

    if cfg.backend == "http":
        from ray.data.llm import HttpRequestProcessorConfig

        http = cfg.http
        headers = {}
        if http.api_key_env and os.environ.get(http.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[http.api_key_env]}"
        config = HttpRequestProcessorConfig(
            url=http.url,
            headers=headers,
            batch_size=http.batch_size,
            concurrency=http.concurrency,
            max_retries=http.max_retries,
            base_retry_wait_time_in_s=0.5,
        )
        # An error answer (4xx with an "error" body) falls back per row in postprocess; 429 and
        # 5xx are retried max_retries times by ray.data.llm, which then fails the job (its HTTP
        # stage has no continue-on-error switch in Ray 2.60).

        def preprocess(row: dict) -> dict:
            return {
                "query_id": row["query_id"],
                "query": row["query"],
                "payload": {
                    "model": http.model,
                    "messages": _messages(row["query"], cfg),
                    "max_tokens": http.max_tokens,
                    "temperature": http.temperature,
                },
            }

        return build_processor(config, preprocess=preprocess, postprocess=postprocess)

    from ray.data.llm import vLLMEngineProcessorConfig

    v = cfg.vllm
    config = vLLMEngineProcessorConfig(
        model_source=v.model,
        engine_kwargs=v.engine_kwargs,
        batch_size=v.batch_size,
        concurrency=v.concurrency,
        should_continue_on_error=True,
    )

    def vllm_preprocess(row: dict) -> dict:
        return {
            "query_id": row["query_id"],
            "query": row["query"],
            "messages": _messages(row["query"], cfg),
            "sampling_params": {"temperature": v.temperature, "max_tokens": v.max_tokens},
        }

    return build_processor(config, preprocess=vllm_preprocess, postprocess=postprocess)
