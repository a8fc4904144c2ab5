"""The search app's Ray Serve deployments (its HTTP ingress is serve/ingress.py).

    HTTP -> SearchIngress (FastAPI) -> QueryRewriter (optional) -> TextEncoder (@serve.batch)
         -> VectorIndex (@serve.batch, FAISS loaded once per replica) -> re-rank -> JSON
    GET /images/{id} -> ImageStore (the corpus index_corpus read; ids in the index only)

Each deployment scales on its own: the `deployments:` entries of the Serve config give its
autoscaling_config, ray_actor_options and max_ongoing_requests (the decorators hold only fallbacks
for a Python `serve.run`). Models, indexes and corpora come resolved from serve.config.
"""

import hashlib
import json
import time
from collections import OrderedDict

import aiohttp
import numpy as np
import pyarrow as pa
from ray import serve

from actors.llm import CircuitBreaker, api_key_headers, chat_completion
from actors.rewrite import checked_completion, rewrite_messages
from actors.text_embed import ClipTextEmbedder
from align.data.images import pixels_to_tensor
from align.method.ranking import filter_candidates, steer
from align.method.rewrite import keyword_rewrite
from align.search.corpus import Corpus
from align.search.stored import read_rating_embeddings
from align.storage import io
from serve import metrics
from serve.clip_back import (
    DEDUP_THRESHOLD,
)
from serve.config import RewriterConfig
from serve.images import CorpusImages

# torch is imported inside the functions that use it (1.8 s here): the image and rewriter replicas
# import this module and run no model.


def rows_by_model(models: list[str]):
    """(model name, the batch rows that asked for it) for each model named in a batch."""
    names = np.asarray(models, dtype=object)
    return [(name, np.flatnonzero(names == name)) for name in set(models)]


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class TextEncoder:
    """Query text -> L2-normalised CLIP text embedding, batched across concurrent requests."""

    def __init__(self, models: dict[str, dict], threads: int | None, batching: dict):
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

        clip = self.embedders[model].clip
        with torch.inference_mode(), metrics.StageTimer("encode"):
            x = pixels_to_tensor(pixels[None], clip.mean, clip.std, "cpu", torch.float32)
            emb = torch.nn.functional.normalize(clip.model.encode_image(x).float(), dim=-1)
        return emb[0].numpy().astype(np.float16)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def encode(self, models: list[str], texts: list[str]) -> list[np.ndarray]:
        out: list = [None] * len(texts)
        t0 = time.perf_counter()
        for name, rows in rows_by_model(models):
            embeddings = self.embedders[name].embed([texts[i] for i in rows]).astype(np.float16)
            for row, embedding in zip(rows, embeddings, strict=True):
                out[row] = embedding
        metrics.observe_batch("encode", t0, len(texts))
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class VectorIndex:
    """Top-n search of each model's FAISS index (loaded once per replica), batched; searches
    with result filters go deeper until enough results pass."""

    def __init__(self, index_dirs: dict[str, str], batching: dict, filters: dict):
        # Every shard memory-mapped (align.search.corpus): replicas on a node share the page cache and
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
        (align.method.ranking.filter_candidates), searching 4x deeper each time until `want` pass, the
        index runs out or `filters.max_depth` is reached; "filtered" says what was dropped,
        how deep it searched and whether that bound stopped it short of `want`."""

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
                found.aesthetic[0][hit],
                vectors,
                min_aesthetic=min_aesthetic,
                dedup_threshold=dedup_threshold,
                keep_most_aesthetic=keep_most_aesthetic,
            )
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

        query = np.asarray(vector, dtype=np.float32)[None]
        if score is not None:
            query = steer(query, self.ratings[model][score], weight)
        return self.filtered_search(
            model,
            query,
            want,
            depth,
            None,
            DEDUP_THRESHOLD if dedup else None,
            keep_most_aesthetic=False,
        )

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
        t0 = time.perf_counter()
        for name, rows in rows_by_model(models):
            corpus = self.corpora[name]
            depth = min(max(depths[i] for i in rows), corpus.ntotal)
            queries = np.stack([vectors[i] for i in rows]).astype(np.float32)
            scores, found = corpus.search(queries, depth)
            for row, s, f in zip(rows, scores, found, strict=True):
                keep = f[: depths[row]] >= 0
                out[row] = self._found(name, f[: depths[row]][keep], s[: depths[row]][keep])
        metrics.observe_batch("search", t0, len(vectors))
        return out


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class ImageStore:
    """Encoded image bytes by id, from the corpora of the served models."""

    def __init__(self, corpora: dict[str, tuple[dict, str]]):
        # One sorted location table per corpus source (serve.images), for the ids of every index
        # built over it; named by the indexes' manifests, so a rebuilt index builds a new one.
        by_source: dict[str, tuple[dict, list]] = {}
        for corpus, index_dir in corpora.values():
            by_source.setdefault(corpus["input"], (corpus, []))[1].append(index_dir)

        def ids_of(index_dirs):
            columns = [
                io.read_parquet(f"{d}/id_map.parquet", columns=["image_id"])["image_id"]
                for d in index_dirs
            ]
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
