"""The search app's Prometheus metrics, recorded through Ray Serve's metrics API.

Ray exports every custom metric from each node's metrics agent with a `ray_` prefix, so the
scraped names read `ray_aesthetic_align_...`; Serve adds `deployment`, `replica` and
`application` tags. METRICS lists each one with its kind and tags: docs/serving.md documents
them, the Grafana dashboard (dashboards/aesthetic_align.json) plots them, and
tests/integration/test_metrics.py scrapes every name after a few searches.
"""

from __future__ import annotations

import functools
import threading
import time

from ray.serve import metrics as serve_metrics

PREFIX = "aesthetic_align_"
# Seconds: 1 ms to 10 s, the span of a search stage from a cached encode to a slow LLM rewrite.
STAGE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
STAGES = ("rewrite", "encode", "search", "filters", "rerank", "total")

# name (without PREFIX): (kind, description, tag keys)
METRICS = {
    "stage_seconds": (
        "histogram",
        "Seconds a search spends in a stage: rewrite, encode, search, filters, rerank, total",
        ("stage",),
    ),
    "requests": (
        "counter",
        "HTTP requests answered, by route template and status",
        ("route", "status"),
    ),
    "rewrite_fallbacks": (
        "counter",
        "Searches that asked for a rewrite and searched with the query as given, by reason",
        ("reason",),
    ),
    "results_below_k": (
        "counter",
        "Searches that returned fewer results than asked for (filters, or a small index)",
        ("model",),
    ),
    "index_vectors": (
        "gauge",
        "Vectors in the index a VectorIndex replica serves, per model",
        ("model",),
    ),
}
_KINDS = {
    "counter": serve_metrics.Counter,
    "gauge": serve_metrics.Gauge,
    "histogram": functools.partial(serve_metrics.Histogram, boundaries=STAGE_BUCKETS),
}


@functools.cache
def metric(name: str):
    """The metric `name` (a METRICS key), made once per process: inside a replica, where Serve's
    context gives it the replica's tags."""
    kind, description, tags = METRICS[name]
    return _KINDS[kind](PREFIX + name, description=description, tag_keys=tags)


def hold_gauge(name: str, values: dict[str, float], tag: str, every_s: float = 5.0) -> None:
    """Set gauge `name` to each of `values` ({tag value: value}) now and every `every_s` seconds
    in a daemon thread: Ray exports a gauge's value once after it is set, so a value that should
    stay on the dashboard is set again."""

    def set_all() -> None:
        for key, value in values.items():
            metric(name).set(value, tags={tag: key})

    def loop() -> None:
        while True:
            time.sleep(every_s)
            set_all()

    set_all()
    threading.Thread(target=loop, daemon=True, name=f"gauge-{name}").start()


def observe_stage(stage: str, seconds: float) -> None:
    metric("stage_seconds").observe(seconds, tags={"stage": stage})


def observe_batch(stage: str, t0: float, requests: int) -> None:
    """A batched call's wall time since `t0`, once for each request of the batch: each waited
    for the whole batch."""
    seconds = time.perf_counter() - t0
    for _ in range(requests):
        observe_stage(stage, seconds)


class StageTimer:
    """`with StageTimer("search"): ...` records the block's wall time under `stage`."""

    def __init__(self, stage: str):
        self.stage = stage

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        observe_stage(self.stage, self.seconds)


def fallback_reason(fallback: str) -> str:
    """A rewrite fallback's message -> a reason of a few values (a metric tag must not take
    every message: the LLM's error texts vary without bound)."""
    if fallback.startswith("circuit breaker"):
        return "circuit_open"
    if fallback.startswith("llm error: no answer within"):
        return "timeout"
    if fallback.startswith("llm error"):
        return "llm_error"
    if fallback.startswith("empty completion"):
        return "empty_completion"
    if fallback.startswith("completion over"):
        return "too_long"
    return "other"


class RequestMetrics:
    """ASGI middleware counting every answered request by its route template (`/images/{...}`,
    not each image's path) and status; a route that raised counts as 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            tags = {"route": getattr(route, "path", "unmatched"), "status": str(status[0])}
            metric("requests").inc(tags=tags)
