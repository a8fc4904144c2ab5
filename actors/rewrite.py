"""Query rewrite stage: keyword rewriting (batch function) or an LLM via ray.data.llm.

Every query comes out with a `rewritten` text. A failed, empty or over-long completion keeps the
original query and says why in `fallback`; it is never fatal.
"""

from __future__ import annotations

import functools
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


RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


class _ErrorAnswer:
    """Stands in for an HTTP response after the last retry failed: an OpenAI-style error body,
    which postprocess turns into a fallback for that row alone."""

    status, reason = 200, "OK"

    def __init__(self, message: str):
        self._body = {"error": {"message": message, "type": "request_failed"}}

    async def json(self) -> dict:
        return self._body

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> bool:
        return False


class _TolerantPost:
    """Awaitable in place of `session.post(...)`: retries 408/429/5xx and network errors with
    exponential backoff, then answers with an `_ErrorAnswer` instead of raising."""

    def __init__(self, session, url: str, kwargs: dict, retries: int, wait_s: float):
        self.session, self.url, self.kwargs = session, url, kwargs
        self.retries, self.wait_s = retries, wait_s

    def __await__(self):
        return self._send().__await__()

    async def _send(self):
        import asyncio

        import aiohttp

        problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.wait_s * 2 ** (attempt - 1))
            try:
                response = await self.session.post(self.url, **self.kwargs)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if response.status not in RETRYABLE_STATUS:
                return response
            problem = f"HTTP {response.status} {response.reason}"
            response.release()
        return _ErrorAnswer(f"{problem} (after {self.retries + 1} attempts)")


class TolerantSession:
    """aiohttp session for ray.data.llm's HTTP stage whose failed requests become error answers:
    Ray 2.60's HTTP stage raises (and fails the job) once its own retries run out."""

    def __init__(self, retries: int, wait_s: float):
        self.retries, self.wait_s = retries, wait_s

    async def __aenter__(self):
        import aiohttp

        self._session = aiohttp.ClientSession()
        await self._session.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self._session.__aexit__(*exc)

    def post(self, url: str, **kwargs) -> _TolerantPost:
        return _TolerantPost(self._session, url, kwargs, self.retries, self.wait_s)


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
            # Retries happen in TolerantSession, which answers a final failure with an error
            # body: postprocess then falls back for that row, and the job goes on.
            max_retries=0,
            session_factory=functools.partial(TolerantSession, http.max_retries, 0.5),
        )

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
