"""What the LLM stages share (query rewriting, the LMM judge): one ray.data.llm processor for
chat messages, sent to any OpenAI-compatible endpoint (`http`) or to vLLM on GPU workers
(`vllm`), and an HTTP session whose failures become error answers rather than a failed job.
The online client (`chat_completion`, serve's query rewriter) adds a deadline over all of a
call's attempts and a `CircuitBreaker` for an endpoint that keeps failing.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from align.config import ConfigError

# ray.data.llm is imported inside the functions that use it: it needs vLLM (the `gpu` extra), an
# optional dependency.

# Worth another try: timeouts, rate limits, a server that is restarting. Never 400/401/403: the
# same request would be refused again (and a wrong key retried is a lock-out waiting to happen).
RETRYABLE_STATUS = (408, 429, 500, 502, 503, 504)


def backoff_s(attempt: int, wait_s: float) -> float:
    """Seconds before retry `attempt` (1, 2, ...): exponential, with jitter so that many
    clients that failed together do not retry together."""
    return wait_s * 2 ** (attempt - 1) * (0.5 + random.random())


def network_error(e: BaseException) -> str:
    """What a client may be told of a failed call: the error's type, not its text (aiohttp's
    messages name the LLM's host and port)."""
    return f"{type(e).__name__}"


def chat_content(answer) -> str | None:
    """choices[0].message.content of an OpenAI-style answer, or None for anything else (a list,
    a non-string content, an error object, HTML read as text)."""
    if not isinstance(answer, dict):
        return None
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_headers(http, key: str) -> dict:
    """The Authorization header for an endpoint config (`url`, `api_key_env`,
    `allow_key_over_http`): a key only when the config names its variable, and never in the
    clear to another machine unless the config allows it.

    Raises:
        ConfigError: naming the key, for a variable that is named but empty, or a key that would
            go over plain http to a host that is not loopback.
    """
    if not http.api_key_env:
        return {}
    value = os.environ.get(http.api_key_env, "")
    if not value:
        raise ConfigError(f"{key}.api_key_env names {http.api_key_env!r}, which is empty here")
    url = urlsplit(http.url)
    if url.scheme != "https" and not _is_loopback(url.hostname) and not http.allow_key_over_http:
        raise ConfigError(
            f"{key}.url is plain {url.scheme} to {url.hostname}: the API key would travel "
            f"readable; use https, or set {key}.allow_key_over_http: true"
        )
    return {"Authorization": f"Bearer {value}"}


class _ErrorAnswer:
    """Stands in for an HTTP response after the last retry failed: an OpenAI-style error body,
    which postprocess turns into a fallback for that row alone."""

    status, reason = 200, "OK"

    def __init__(self, message: str):
        self.message = message
        self._body = {"error": {"message": message, "type": "request_failed"}}

    async def json(self, **_) -> dict:
        return self._body

    def release(self) -> None:
        pass

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
        problem = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(backoff_s(attempt, self.wait_s))
            try:
                response = await self.session.post(self.url, **self.kwargs)
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                problem = network_error(e)
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
        self._session = aiohttp.ClientSession()
        await self._session.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self._session.__aexit__(*exc)

    def post(self, url: str, **kwargs) -> _TolerantPost:
        return _TolerantPost(self._session, url, kwargs, self.retries, self.wait_s)


class CircuitBreaker:
    """Stops calling an endpoint that keeps failing: after `failures` consecutive failed calls
    it is open for `cooldown_s` (callers fall back at once instead of each waiting out the
    outage), then lets one trial call through, whose success closes it and whose failure opens
    it again. For one event loop (no locking)."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] | None = None):
        self.failures, self.cooldown_s = failures, cooldown_s
        self.clock = clock or time.monotonic
        self.failed = 0  # consecutive failures
        self.opened_at: float | None = None
        self.trial = False  # a trial call is under way

    def allow(self) -> bool:
        """Whether a call may go to the endpoint now (the caller then reports it in `record`)."""
        if self.opened_at is None:
            return True
        if self.trial or self.clock() - self.opened_at < self.cooldown_s:
            return False
        self.trial = True
        return True

    def record(self, ok: bool) -> None:
        """The outcome of a call that `allow` let through."""
        self.trial = False
        if ok:
            self.failed, self.opened_at = 0, None
            return
        self.failed += 1
        if self.opened_at is not None or self.failed >= self.failures:
            self.opened_at = self.clock()

    def refusal(self) -> str:
        """Why a call was not let through, for a fallback reason."""
        since = 0.0 if self.opened_at is None else self.clock() - self.opened_at
        left = max(0.0, self.cooldown_s - since)
        return (
            f"circuit breaker open after {self.failed} consecutive endpoint failures "
            f"(next try in {left:.0f} s)"
        )


async def chat_completion(
    session,
    url: str,
    body: dict,
    headers: dict,
    retries: int,
    wait_s: float,
    deadline_s: float | None = None,
) -> tuple[str | None, str | None]:
    """(completion text, error) of one OpenAI-style chat request, with the retry policy of the
    batch stages (retryable statuses and network errors, exponential backoff) and the same
    parsing of choices[0]: the online client (serve's query rewriter). `deadline_s` bounds the
    whole call, every attempt and backoff included (None: only the session's timeouts). Never
    raises for what the endpoint does; the error never names its host."""

    call = _chat_completion(session, url, body, headers, retries, wait_s)
    if deadline_s is None:
        return await call
    try:
        return await asyncio.wait_for(call, deadline_s)
    except asyncio.TimeoutError:
        return None, f"no answer within {deadline_s:g} s (all attempts)"


async def _chat_completion(session, url, body, headers, retries, wait_s):
    kwargs = {"json": body, "headers": headers}
    response = await _TolerantPost(session, url, kwargs, retries, wait_s)
    if isinstance(response, _ErrorAnswer):
        return None, response.message
    try:
        if response.status != 200:
            return None, f"HTTP {response.status}"  # 400/401/403: refused, not retried
        # content_type=None: read JSON whatever the header says; HTML, a list or a non-string
        # content all end as "no usable completion".
        text = chat_content(await response.json(content_type=None))
        return text, None if text is not None else "the endpoint's answer has no text completion"
    except ValueError:  # not JSON (an HTML error page, a proxy's banner)
        return None, "the endpoint's answer is not JSON"
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return None, network_error(e)
    finally:
        response.release()


def completion(row: dict, backend: str) -> tuple[str | None, str | None]:
    """(completion text, error) of one answered row, for either backend."""
    if backend == "http":
        response = row.get("http_response")
        error = response.get("error") if isinstance(response, dict) else None
        return chat_content(response), row.get("__inference_error__") or error
    return row.get("generated_text"), row.get("__inference_error__")


def vllm_processor_config(vllm, multimodal: bool = False):
    """ray.data.llm's vLLM processor config from ours (validated by Ray; builds nothing, loads
    nothing: `build_processor` is what reads the model's tokenizer)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    extra = {"prepare_multimodal_stage": {"enabled": True}} if multimodal else {}
    return vLLMEngineProcessorConfig(
        model_source=vllm.model,
        engine_kwargs=vllm.engine_kwargs,
        batch_size=vllm.batch_size,
        concurrency=vllm.concurrency,
        should_continue_on_error=True,
        **extra,
    )


def _http_processor(http, messages: Callable[[dict], list[dict]], carry, key_prefix: str):
    """(processor config, preprocess) of the http backend: OpenAI chat payloads, retried in
    TolerantSession."""
    from ray.data.llm import HttpRequestProcessorConfig

    config = HttpRequestProcessorConfig(
        url=http.url,
        headers=api_key_headers(http, f"{key_prefix}.http"),
        batch_size=http.batch_size,
        concurrency=http.concurrency,
        # Retries happen in TolerantSession, which answers a final failure with an error
        # body: postprocess then handles that row alone, and the job goes on.
        max_retries=0,
        session_factory=functools.partial(TolerantSession, http.max_retries, 0.5),
    )

    def preprocess(row: dict) -> dict:
        return {
            **{c: row[c] for c in carry},
            "payload": {
                "model": http.model,
                "messages": messages(row),
                "max_tokens": http.max_tokens,
                "temperature": http.temperature,
            },
        }

    return config, preprocess


def build_chat_processor(
    backend: str,
    http,
    vllm,
    messages: Callable[[dict], list[dict]],
    carry: tuple[str, ...],
    postprocess: Callable[[dict], dict],
    multimodal: bool = False,
    key_prefix: str = "rewrite",
):
    """A ray.data.llm processor (Dataset -> Dataset): `messages(row)` to the model, the `carry`
    columns passed through to `postprocess(row)`.

    Args:
        backend: "http" (config `http`: url, model, api_key_env, batch_size, concurrency,
            max_retries, max_tokens, temperature) or "vllm" (config `vllm`: model,
            engine_kwargs, batch_size, concurrency, max_tokens, temperature).
        multimodal: messages carry images (vLLM's multimodal stage prepares them).
        key_prefix: the config section, for error messages (e.g. "evaluate.judge").
    """
    from ray.data.llm import build_processor

    if backend == "http":
        config, preprocess = _http_processor(http, messages, carry, key_prefix)
        return build_processor(config, preprocess=preprocess, postprocess=postprocess)
    if backend != "vllm":
        raise ValueError(f"backend {backend!r} does not call an LLM (http or vllm)")

    config = vllm_processor_config(vllm, multimodal)

    def vllm_preprocess(row: dict) -> dict:
        return {
            **{c: row[c] for c in carry},
            "messages": messages(row),
            "sampling_params": {"temperature": vllm.temperature, "max_tokens": vllm.max_tokens},
        }

    return build_processor(config, preprocess=vllm_preprocess, postprocess=postprocess)
