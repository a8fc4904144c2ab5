"""The search app's HTTP ingress: routes (/search, clip-back's /knn-service, /metadata and
/indices-list, /images/{id}, /healthz and the search page), API-key auth, host checks, CORS and
security headers, and the error handlers that turn every failure into a JSON answer. It holds no
model: it calls the deployments (serve/deployments.py) through their handles.
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
from pathlib import Path
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from align.method.ranking import rank
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
                req.model,
                vector,
                req.k,
                depth,
                req.min_aesthetic,
                filters["dedup_threshold"] if req.dedup else None,
            )

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
                413,
                f"request body is {size} bytes; the limit is {limit} "
                f"(max_image_body_bytes, {self.settings['max_image_body_bytes']}, is for "
                "bodies that hold a query image)",
            )
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
            fields,
            self.limits.models,
            self.limits.dims,
            self.limits.max_k,
            self.limits.max_query_chars,
        )
        if req.aesthetic_score is not None and not await _call(
            lambda: self.index.has_ratings.remote(req.model)
        ):
            raise BadRequest(
                400,
                f"'aesthetic_score': the index of {req.model!r} has no rating embeddings "
                "(built before them): run index_corpus again",
            )
        depth = max(req.num_result_ids, self.settings["rerank_depth"] if req.rerank else 0)

        async def knn():
            vector = await self._query_vector(req.model, req.text, req.image, req.embedding)
            return await self.index.knn.remote(
                req.model,
                vector,
                req.num_result_ids,
                depth,
                req.aesthetic_score,
                req.aesthetic_weight,
                req.deduplicate,
            )

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
