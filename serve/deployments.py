"""The search app's Ray Serve deployments.

    HTTP -> SearchIngress (FastAPI) -> QueryRewriter (optional) -> TextEncoder (@serve.batch)
         -> VectorIndex (@serve.batch, FAISS loaded once per replica) -> re-rank -> JSON
    GET /images/{id} -> ImageStore (the corpus index_corpus read; ids in the index only)

Each deployment scales on its own: the `deployments:` entries of the Serve config give its
autoscaling_config, ray_actor_options and max_ongoing_requests (the decorators hold only fallbacks
for a Python `serve.run`). Models, indexes and corpora come resolved from serve.config.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from align.ranking import rank
from serve import metrics
from serve.clip_back import (
    cors_headers,
    indice_names,
    knn_answer,
    parse_knn_request,
    parse_metadata_request,
)
from serve.query_images import QueryImageDecoder
from serve.search import (
    BadRequest,
    SearchLimits,
    check_image_id,
    content_type,
    parse_json_body,
    parse_search_request,
    shown,
)

PAGE = Path(__file__).with_name("page.html")
API_KEY_HEADER = "X-API-Key"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
JSON_HEADERS = {"X-Content-Type-Options": "nosniff"}
# Handle calls to a replica that died are retried this often on another replica before the
# request fails with 503: a killed or scaled-down replica costs latency, not an error.
REPLICA_RETRIES = 2


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class TextEncoder:
    """Query text -> L2-normalised CLIP text embedding, batched across concurrent requests."""

    def __init__(self, models: dict[str, dict], threads: int | None, batching: dict):
        from actors.text_embed import ClipTextEmbedder

        self.embedders = {
            name: ClipTextEmbedder(model, threads, columns=("text",))
            for name, model in models.items()
        }
        self.encode.set_max_batch_size(batching["max_batch_size"])
        self.encode.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])
        for embedder in self.embedders.values():  # first call pays for lazy initialisation
            embedder.embed(["warm up"])

    def encode_pixels(self, model: str, pixels: np.ndarray) -> np.ndarray:
        """An image query (uint8 pixels at the model's size, decoded by the ingress) -> its
        L2-normalised embedding (clip-back's image queries)."""
        import torch

        from align.images import pixels_to_tensor

        clip = self.embedders[model].clip
        with torch.inference_mode(), metrics.StageTimer("encode"):
            x = pixels_to_tensor(pixels[None], clip.mean, clip.std, "cpu", torch.float32)
            emb = torch.nn.functional.normalize(clip.model.encode_image(x).float(), dim=-1)
        return emb[0].numpy().astype(np.float16)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode(self, models: list[str], texts: list[str]) -> list[np.ndarray]:
        out: list = [None] * len(texts)
        names = np.asarray(models, dtype=object)
        t0 = time.perf_counter()
        for name in set(models):
            rows = np.flatnonzero(names == name)
            embeddings = self.embedders[name].embed([texts[i] for i in rows]).astype(np.float16)
            for row, embedding in zip(rows, embeddings, strict=True):
                out[row] = embedding
        seconds = time.perf_counter() - t0
        for _ in texts:  # each request waited for the whole batch
            metrics.observe_stage("encode", seconds)
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class VectorIndex:
    """Top-n search of each model's FAISS index (loaded once per replica), batched; searches
    with result filters go deeper until enough results pass."""

    def __init__(self, index_dirs: dict[str, str], batching: dict, filters: dict):
        from align.corpus import Corpus
        from align.index import read_rating_embeddings

        # Every shard memory-mapped (align.corpus): replicas on a node share the page cache and
        # each holds what its searches touch, not the corpus.
        self.corpora, self.facts_, self.ratings = {}, {}, {}
        for name, index_dir in index_dirs.items():
            corpus = Corpus(index_dir)
            self.corpora[name] = corpus
            self.ratings[name] = read_rating_embeddings(index_dir, corpus.manifest)
            self.facts_[name] = {"images": corpus.ntotal, "index": corpus.spec["type"]}
        self.filters = filters
        sizes = {name: corpus.ntotal for name, corpus in self.corpora.items()}
        metrics.hold_gauge("index_vectors", sizes, tag="model")
        self.search.set_max_batch_size(batching["max_batch_size"])
        self.search.set_batch_wait_timeout_s(batching["batch_wait_timeout_s"])

    def facts(self) -> dict:
        return self.facts_

    def has_ratings(self, model: str) -> bool:
        return self.ratings[model] is not None

    def _found(self, model: str, rows: np.ndarray, similarity: np.ndarray) -> dict:
        info = self.corpora[model].row_info(rows)
        return {
            "rows": rows,
            "similarity": similarity.astype(np.float32),
            "ids": info["image_id"],
            "aesthetic": np.asarray(info["aesthetic"], dtype=np.float32),
            "caption": info["caption"],
            "source_url": info["url"],
        }

    def filtered_search(self, *args, **kwargs) -> dict:
        with metrics.StageTimer("filters"):
            return self._filtered_search(*args, **kwargs)

    def _filtered_search(
        self,
        model: str,
        vector: np.ndarray,
        want: int,
        depth: int,
        min_aesthetic: float | None,
        dedup_threshold: float | None,
        keep_most_aesthetic: bool = True,
    ) -> dict:
        """The top `depth` candidates (at least) that pass the result filters
        (align.ranking.filter_candidates), searching 4x deeper each time until `want` pass, the
        index runs out or `filters.max_depth` is reached; "filtered" says what was dropped,
        how deep it searched and whether that bound stopped it short of `want`."""
        from align.ranking import filter_candidates

        corpus = self.corpora[model]
        query = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        bound = min(self.filters["max_depth"], corpus.ntotal)
        depth = min(depth, bound)
        while True:
            found = corpus.candidates(query, depth)
            hit = found.rows[0] >= 0
            similarity, rows = found.scores[0][hit], found.rows[0][hit]
            # Near-duplicates by the stored (exact) embeddings of the candidates.
            vectors = corpus.vectors(rows).astype(np.float32) if dedup_threshold else None
            keep, dropped = filter_candidates(
                found.aesthetic[0][hit], vectors, min_aesthetic=min_aesthetic,
                dedup_threshold=dedup_threshold, keep_most_aesthetic=keep_most_aesthetic,
            )  # fmt: skip
            if keep.sum() >= want or depth >= bound:
                break
            depth = min(depth * 4, bound)
        found = self._found(model, rows[keep], similarity[keep])
        found["filtered"] = {
            **dropped,
            "searched": depth,
            # Fewer than asked because of the bound, not because the index has no more.
            "bound_hit": bool(keep.sum() < want and depth < corpus.ntotal),
        }
        return found

    def knn(self, model: str, vector: np.ndarray, want: int, depth: int, score, weight, dedup):
        """clip-back's search: the query steered towards rating level `score` (if given), the top
        `depth`, near-duplicates (clip-back's threshold, the first of each group kept) dropped
        when `dedup`, searching deeper until `want` remain."""
        from align.ranking import steer
        from serve.clip_back import DEDUP_THRESHOLD

        query = np.asarray(vector, dtype=np.float32)[None]
        if score is not None:
            query = steer(query, self.ratings[model][score], weight)
        return self.filtered_search(
            model, query, want, depth, None, DEDUP_THRESHOLD if dedup else None,
            keep_most_aesthetic=False,
        )  # fmt: skip

    def rows(self, model: str, rows: list[int]) -> dict:
        """Image ids, aesthetic scores and metadata of index rows (clip-back's /metadata);
        `valid` is False for rows past the end."""
        rows = np.asarray(rows, dtype=np.int64)
        valid = (rows >= 0) & (rows < self.corpora[model].ntotal)
        found = self._found(model, np.where(valid, rows, 0), np.zeros(len(rows)))
        return {**found, "valid": valid}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def search(
        self, models: list[str], vectors: list[np.ndarray], depths: list[int]
    ) -> list[dict]:
        out: list = [None] * len(vectors)
        names = np.asarray(models, dtype=object)
        t0 = time.perf_counter()
        for name in set(models):
            rows = np.flatnonzero(names == name)
            corpus = self.corpora[name]
            depth = min(max(depths[i] for i in rows), corpus.ntotal)
            queries = np.stack([vectors[i] for i in rows]).astype(np.float32)
            scores, found = corpus.search(queries, depth)
            for row, s, f in zip(rows, scores, found, strict=True):
                keep = f[: depths[row]] >= 0
                out[row] = self._found(name, f[: depths[row]][keep], s[: depths[row]][keep])
        seconds = time.perf_counter() - t0
        for _ in vectors:  # each request waited for the whole batch
            metrics.observe_stage("search", seconds)
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class ImageStore:
    """Encoded image bytes by id, from the corpora of the served models."""

    def __init__(self, corpora: dict[str, tuple[dict, str]]):
        import hashlib
        import json

        import pyarrow as pa

        from align import io
        from serve.images import CorpusImages

        # One sorted location table per corpus source (serve.images), for the ids of every index
        # built over it; named by the indexes' manifests, so a rebuilt index builds a new one.
        by_source: dict[str, tuple[dict, list]] = {}
        for corpus, index_dir in corpora.values():
            by_source.setdefault(corpus["input"], (corpus, []))[1].append(index_dir)

        def ids_of(index_dirs):
            columns = [io.read_parquet(f"{d}/id_map.parquet", columns=["image_id"])["image_id"]
                       for d in index_dirs]  # fmt: skip
            return pa.chunked_array([c for col in columns for c in col.chunks]).unique()

        self.stores = []
        for corpus, index_dirs in by_source.values():
            key = hashlib.sha1(json.dumps(corpus, sort_keys=True).encode())
            for index_dir in sorted(set(index_dirs)):
                key.update(io.read_bytes(f"{index_dir}/_index.json"))
            ids = lambda dirs=index_dirs: ids_of(dirs)  # noqa: E731 (read only to build)
            self.stores.append(CorpusImages(corpus, ids, key=key.hexdigest()[:20]))

    def read(self, image_id: str) -> bytes | None:
        for store in self.stores:
            if image_id in store:
                return store.read(image_id)
        return None


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class QueryRewriter:
    """The query with its aesthetic expectations spelled out: keywords, or an OpenAI-compatible
    chat endpoint (then cached, and the query as is when the endpoint fails, misses the
    `timeout_s` deadline, or has failed so often that the circuit breaker is open)."""

    def __init__(self, rewriter: dict):
        from actors.llm import CircuitBreaker, api_key_headers
        from serve.config import RewriterConfig

        self.cfg = RewriterConfig.model_validate(rewriter)
        self.cache: OrderedDict[str, dict] = OrderedDict()
        self.session = None
        self.breaker = CircuitBreaker(self.cfg.breaker_failures, self.cfg.breaker_cooldown_s)
        self.headers = (
            api_key_headers(self.cfg.method.http, "rewriter.method.http")
            if self.cfg.method.backend == "http"
            else {}
        )

    async def rewrite(self, query: str) -> dict:
        from align.rewrite import keyword_rewrite

        method = self.cfg.method
        if method.backend == "keywords":
            return {
                "rewritten": keyword_rewrite(query, method.variant, method.keywords),
                "fallback": None,
            }
        if query in self.cache:
            self.cache.move_to_end(query)
            return self.cache[query]
        result = await self._ask_llm(query)
        if result["fallback"] is None and self.cfg.cache_size:
            self.cache[query] = result
            if len(self.cache) > self.cfg.cache_size:
                self.cache.popitem(last=False)
        return result

    async def _ask_llm(self, query: str) -> dict:
        import aiohttp

        from actors.llm import chat_completion
        from actors.rewrite import checked_completion, rewrite_messages

        http = self.cfg.method.http
        if not self.breaker.allow():
            return {"rewritten": query, "fallback": self.breaker.refusal()}
        if self.session is None:
            # No per-attempt timeout: the deadline below bounds the call, attempts and backoff.
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        body = {
            "model": http.model,
            "messages": rewrite_messages(query, self.cfg.method),
            "max_tokens": http.max_tokens,
            "temperature": http.temperature,
        }
        error = "cancelled"  # a call cancelled (its client gone) counts as a failure
        try:
            text, error = await chat_completion(
                self.session,
                http.url,
                body,
                self.headers,
                http.max_retries,
                self.cfg.retry_wait_s,
                deadline_s=self.cfg.timeout_s,
            )
        finally:
            self.breaker.record(error is None)
        rewritten, fallback = checked_completion(query, text, error, self.cfg.method.max_chars)
        return {"rewritten": rewritten, "fallback": fallback}


# ---------------------------------------------------------------------------------------------
# HTTP ingress

api = FastAPI(title="aesthetic-align search", docs_url=None, redoc_url=None)
api.add_middleware(metrics.RequestMetrics)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


def _finite(x: float) -> float | None:
    """A number for JSON: rounded, or None (null) for NaN and infinities."""
    x = float(x)
    return round(x, 5) if math.isfinite(x) else None


def host_name(host_header: str) -> str:
    """The name of a Host header, without the port: 'a.b:80' -> 'a.b', '[::1]:8000' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
    return _error(exc.status, exc.message)


def page_csp(page: str, image_url_template: str | None) -> str:
    """The search page's Content-Security-Policy: its one inline script by hash, nothing loaded
    from elsewhere but images from the configured image host, no framing."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in scripts
    )
    images = "'self' data: blob:"
    if image_url_template and "://" in image_url_template:
        scheme, rest = image_url_template.split("://", 1)
        images += f" {scheme}://{rest.split('/', 1)[0]}"
    return (
        f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; "
        f"img-src {images}; connect-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error(400, problems)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug, not bad input: still JSON, and Serve's log has the traceback.
    return _error(500, f"internal error: {type(exc).__name__}")


class ServiceUnavailable(Exception):
    """A deployment could not answer after retries on other replicas."""


@api.exception_handler(ServiceUnavailable)
async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return _error(503, f"service unavailable, retry: {exc}")


async def _call(request):
    """Await `request()` (a deployment call), sending it again, to another replica, when the
    replica it went to died."""
    for attempt in range(REPLICA_RETRIES + 1):
        try:
            return await request()
        except (RayActorError, ActorUnavailableError) as e:
            if attempt == REPLICA_RETRIES:
                raise ServiceUnavailable(type(e).__name__) from e
            await asyncio.sleep(0.05 * (attempt + 1))


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class SearchIngress:
    def __init__(self, encoder, index, images, rewriter, settings: dict):
        self.encoder, self.index, self.images, self.rewriter = encoder, index, images, rewriter
        self.settings = settings
        self.limits = SearchLimits(
            models=tuple(settings["models"]),
            default_model=settings["default_model"],
            default_k=settings["default_k"],
            max_k=settings["max_k"],
            max_query_chars=settings["max_query_chars"],
            rewrite_available=rewriter is not None,
            default_weight=settings["rerank_weight"],
            dims={n: f["dim"] for n, f in settings["model_facts"].items()},
        )
        self.api_key = None
        if settings["api_key_env"]:
            self.api_key = os.environ.get(settings["api_key_env"], "")
            if not self.api_key:
                # Refuse to start open when the config asks for a key.
                raise RuntimeError(
                    f"api_key_env is {settings['api_key_env']!r} but that environment variable "
                    "is empty on this node"
                )
        page = {
            "models": settings["models"],
            "default_model": settings["default_model"],
            "default_k": settings["default_k"],
            "max_k": settings["max_k"],
            "rewrite": rewriter is not None,
            "weight": settings["rerank_weight"],
            "api_key": self.api_key is not None,
        }
        # "<" escaped: a label holding "</script>" must not end the page's script.
        settings_js = json.dumps(page).replace("<", "\\u003c")
        self.page = PAGE.read_text().replace("__SETTINGS__", settings_js)
        self.page_headers = {
            "Content-Security-Policy": page_csp(self.page, settings["image_url_template"]),
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        }
        hosts = settings["allowed_hosts"]
        if hosts is None:
            hosts = ["*"] if self.api_key is not None else list(LOOPBACK_HOSTS)
        self.allowed_hosts = None if "*" in hosts else {h.lower() for h in hosts}
        self.query_images = QueryImageDecoder(
            settings["query_image_decoders"], settings["max_query_image_pixels"]
        )

    def _authorise(self, request: Request) -> None:
        self._check_host(request)
        if self.api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise BadRequest(401, f"missing or wrong API key (header {API_KEY_HEADER})")

    def _check_host(self, request: Request) -> None:
        """A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) sends its own
        name as Host: a keyless server answers only the names it is meant to have."""
        if self.allowed_hosts is None:
            return
        name = host_name(request.headers.get("host", ""))
        if name not in self.allowed_hosts:
            raise BadRequest(
                400,
                f"Host {shown(name)} is not served here (allowed_hosts: "
                f"{sorted(self.allowed_hosts)})",
            )

    def _image_url(self, request: Request, image_id: str) -> str:
        template = self.settings["image_url_template"]
        if template:
            return template.format(image_id=quote(image_id, safe="/"))
        root = request.scope.get("root_path", "").rstrip("/")
        return f"{root}/images/{quote(image_id, safe='/')}"

    async def _query_vector(self, model: str, text, image, embedding):
        """What a query is searched with: the encoder's answer for text or an image (handed to
        the index as is: Serve passes it on without a round trip through this replica), or the
        given embedding (already float32 and L2-normalised by the request's parsing)."""
        if text is not None:
            return self.encoder.encode.remote(model, text)
        if image is not None:
            size = self.settings["model_facts"][model]["image_size"]
            pixels = await self.query_images.decode(image, size)  # off the event loop
            return self.encoder.encode_pixels.remote(model, pixels)
        return np.asarray(embedding, dtype=np.float32)

    def _results(self, request: Request, found: dict, order: np.ndarray) -> list[dict]:
        return [
            {
                "rank": r + 1,
                "image_id": found["ids"][i],
                "similarity": _finite(found["similarity"][i]),
                "aesthetic": _finite(found["aesthetic"][i]),
                "url": self._image_url(request, found["ids"][i]),
                "caption": found["caption"][i],
                "source_url": found["source_url"][i],
            }
            for r, i in enumerate(order.tolist())
        ]

    async def _rewrite(self, query: str) -> tuple[str, str | None]:
        """(the text to search with, the fallback reason when that is the query as given)."""
        with metrics.StageTimer("rewrite"):
            answer = await _call(lambda: self.rewriter.rewrite.remote(query))
        if answer["fallback"] is not None:
            reason = metrics.fallback_reason(answer["fallback"])
            metrics.metric("rewrite_fallbacks").inc(tags={"reason": reason})
        return answer["rewritten"], answer["fallback"]

    async def _search(self, request: Request, fields: dict) -> JSONResponse:
        self._authorise(request)
        req = parse_search_request(fields, self.limits)
        t0 = time.perf_counter()
        timings, text, fallback = {}, req.q, None
        if req.rewrite:
            text, fallback = await self._rewrite(req.q)
            timings["rewrite"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        depth = self.settings["rerank_depth"] if req.rerank else req.k
        filters = self.settings["filters"]

        async def search():
            vector = await self._query_vector(req.model, text, req.image, req.embedding)
            if not req.filtered:
                return await self.index.search.remote(req.model, vector, depth)
            return await self.index.filtered_search.remote(
                req.model, vector, req.k, depth, req.min_aesthetic,
                filters["dedup_threshold"] if req.dedup else None,
            )  # fmt: skip

        found = await _call(search)
        with metrics.StageTimer("rerank"):
            order = rank(found["similarity"], found["aesthetic"], req.k, req.rerank, req.weight)
        if len(order) < req.k:
            metrics.metric("results_below_k").inc(tags={"model": req.model})
        results = self._results(request, found, order)
        timings.update(
            {"encode_and_search": time.perf_counter() - t1, "total": time.perf_counter() - t0}
        )
        metrics.observe_stage("total", timings["total"])
        return JSONResponse(
            {
                "query": req.q,
                "query_kind": "text" if req.q else "image" if req.image else "embedding",
                "rewritten": text if req.rewrite else None,
                "rewrite_fallback": fallback,
                "model": req.model,
                "k": req.k,
                "rerank": req.rerank,
                "weight": req.weight if req.rerank else None,
                "dedup": req.dedup,
                "min_aesthetic": req.min_aesthetic,
                # With filters: how many each dropped, how deep the search went, and whether
                # the depth bound (filters.max_depth) stopped it with fewer than k results.
                "filtered": found.get("filtered"),
                "results": results,
                "timings_ms": {k: round(v * 1000, 2) for k, v in timings.items()},
            },
            headers=self._cache_headers(0),
        )

    @api.get("/search")
    async def search_get(self, request: Request) -> JSONResponse:
        self._authorise(request)
        fields = dict(request.query_params)
        if len(request.query_params.multi_items()) != len(fields):
            raise BadRequest(400, "each field may be given once")
        return await self._search(request, fields)

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        """The request body, refused with 413 past `limit` (max_body_bytes) before more is
        read."""
        limit = limit or self.settings["max_body_bytes"]
        declared = request.headers.get("content-length", "")
        # Over 18 digits is over any limit (and int() of thousands of digits would raise).
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            raise BadRequest(413, f"request body is {shown(declared)} bytes; the limit is {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadRequest(413, f"request body is over the limit of {limit} bytes")
        return bytes(body)

    async def _json_body(self, request: Request, limit: int | None = None):
        """The body as JSON whatever the Content-Type (ClipClient sends none, clip-front
        text/plain), and its size."""
        body = await self._body(request, limit)
        return parse_json_body(body), len(body)

    @api.post("/search")
    async def search_post(self, request: Request) -> JSONResponse:
        self._authorise(request)  # before a byte of the body is read
        # The body may hold a query image: read up to the image limit, and hold a body
        # without one to the JSON limit.
        fields, size = await self._json_body(request, self.settings["max_image_body_bytes"])
        if not isinstance(fields, dict):
            raise BadRequest(400, "the JSON body must be an object of search fields")
        limit = self.settings["max_body_bytes"]
        if size > limit and fields.get("image") is None:
            raise BadRequest(
                413, f"request body is {size} bytes; the limit is {limit} "
                f"(max_image_body_bytes, {self.settings['max_image_body_bytes']}, is for "
                "bodies that hold a query image)",
            )  # fmt: skip
        return await self._search(request, fields)

    # -----------------------------------------------------------------------------------------
    # clip-retrieval's back-end API (serve/clip_back.py): ClipClient and clip-front unchanged.

    def _cors_headers(self, request: Request) -> dict:
        return cors_headers(
            request.headers.get("origin"), self.settings["cors_origins"], self.api_key is not None
        )

    def _knn_headers(self, request: Request) -> dict:
        return {**self._cache_headers(0), **self._cors_headers(request)}

    def _metadata(self, request: Request, found: dict, i: int) -> dict:
        """clip-back's metadata of result i: `url` is where this app serves the image (the
        source may be gone), `caption` and `source_url` what the corpus said about it."""
        image_id = found["ids"][i]
        url = self._image_url(request, image_id)
        if url.startswith("/"):  # clip-front runs on another origin: absolute URLs
            url = str(request.base_url).rstrip("/") + url
        return {
            "url": url,
            "image_path": image_id,
            "caption": found["caption"][i],
            "source_url": found["source_url"][i],
            "aesthetic": _finite(found["aesthetic"][i]),
        }

    @api.options("/knn-service")
    @api.options("/metadata")
    @api.options("/indices-list")
    async def cors_preflight(self, request: Request) -> Response:
        return Response(status_code=204, headers=self._cors_headers(request))

    @api.get("/indices-list")
    async def indices_list(self, request: Request) -> JSONResponse:
        self._authorise(request)
        return JSONResponse(indice_names(self.limits.models), headers=self._knn_headers(request))

    @api.post("/knn-service")
    async def knn_service(self, request: Request) -> JSONResponse:
        self._authorise(request)
        fields, _ = await self._json_body(request, self.settings["max_image_body_bytes"])
        req = parse_knn_request(
            fields, self.limits.models, self.limits.dims, self.limits.max_k,
            self.limits.max_query_chars,
        )  # fmt: skip
        if req.aesthetic_score is not None and not await _call(
            lambda: self.index.has_ratings.remote(req.model)
        ):
            raise BadRequest(
                400, f"'aesthetic_score': the index of {req.model!r} has no rating embeddings "
                "(built before them): run index_corpus again",
            )  # fmt: skip
        depth = max(req.num_result_ids, self.settings["rerank_depth"] if req.rerank else 0)

        async def knn():
            vector = await self._query_vector(req.model, req.text, req.image, req.embedding)
            return await self.index.knn.remote(
                req.model, vector, req.num_result_ids, depth, req.aesthetic_score,
                req.aesthetic_weight, req.deduplicate,
            )  # fmt: skip

        found = await _call(knn)
        n = min(req.num_result_ids, len(found["rows"]))
        if n < req.num_result_ids:
            metrics.metric("results_below_k").inc(tags={"model": req.model})
        with metrics.StageTimer("rerank"):
            order = (
                rank(
                    found["similarity"], found["aesthetic"], n, True, self.settings["rerank_weight"]
                )
                if req.rerank
                else np.arange(n)
            )
        metadata = [self._metadata(request, found, i) for i in order[: req.num_images]]
        answer = knn_answer(
            found["rows"][order], found["similarity"][order], metadata, req.num_images
        )
        return JSONResponse(answer, headers=self._knn_headers(request))

    @api.post("/metadata")
    async def metadata(self, request: Request) -> JSONResponse:
        self._authorise(request)
        fields, _ = await self._json_body(request, self.settings["max_body_bytes"])
        model, ids = parse_metadata_request(fields, self.limits.models, 10 * self.limits.max_k)
        found = await _call(lambda: self.index.rows.remote(model, ids))
        answer = [
            {"id": i, "metadata": self._metadata(request, found, j) if found["valid"][j] else {}}
            for j, i in enumerate(ids)
        ]
        return JSONResponse(answer, headers=self._knn_headers(request))

    @api.get("/images/{image_id:path}")
    async def image(self, request: Request, image_id: str) -> Response:
        self._authorise(request)
        check_image_id(image_id)
        data = await _call(lambda: self.images.read.remote(image_id))
        if data is None:
            raise BadRequest(404, f"unknown image id {shown(image_id)}")
        return Response(data, media_type=content_type(data), headers=self._cache_headers(86400))

    @api.get("/healthz")
    async def healthz(self, request: Request) -> dict:
        self._check_host(request)
        return {"status": "ok", "models": await _call(lambda: self.index.facts.remote())}

    @api.get("/", response_class=HTMLResponse)
    async def page(self, request: Request) -> HTMLResponse:
        self._check_host(request)
        return HTMLResponse(self.page, headers=self.page_headers)

    def _cache_headers(self, max_age: int) -> dict:
        # With a key, answers are the key holder's: no shared cache (proxy, CDN) may keep them.
        scope = "private" if self.api_key is not None else "public"
        return {"Cache-Control": f"{scope}, max-age={max_age}", **JSON_HEADERS}
