"""clip-retrieval's back-end API (its `clip_back.py`), answered by the search app, without Ray:
what a `/knn-service` or `/metadata` request asks, checked, and its answer shaped as clip-back
shapes it, so ClipClient and clip-front work against this server unchanged.

Index names (`indice_name`, `GET /indices-list`): each served model, and `<model>+rerank` (our
aesthetic re-rank of its top results), so one client compares the plain model, the re-rank and
the aligned model. `aesthetic_score` (0-9) and `aesthetic_weight` keep clip-back's meaning: the
query moves towards the mean embedding of the corpus's images at that rating level (built by
index_corpus from the corpus's own scores: align.method.ranking.rating_*) and is renormalised;
`aesthetic_weight` is bounded (0 to MAX_AESTHETIC_WEIGHT).

CORS (`cors_headers`): the origins of the `cors_origins` arg, none by default; '*' is clip-back's
own answer, for a drop-in behind clip-front pages on any origin.

What this back-end cannot honour, answered as clip-back answers without the model: no safety
model and no violence detector are loaded, so `use_safety_model` and `use_violence_detector` filter
nothing (ClipClient sends them on by default). A multilingual text model (`use_mclip`), caption
search (`modality: "text"`) and `image_url` (the server fetching any URL) are refused with 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from serve.search import BadRequest, _as_bool, _as_float, _as_int, parse_query_input, shown

RERANK_SUFFIX = "+rerank"
# clip-back's near-duplicate threshold (cosine) for `deduplicate`.
DEDUP_THRESHOLD = 0.94
KNN_FIELDS = (
    "text",
    "image",
    "image_url",
    "embedding_input",
    "modality",
    "num_images",
    "num_result_ids",
    "indice_name",
    "deduplicate",
    "use_safety_model",
    "use_violence_detector",
    "aesthetic_score",
    "aesthetic_weight",
    "use_mclip",
)
# The query plus this many times the rating embedding (both unit vectors) is all the rating
# embedding past about 10: the query stops counting, and far larger weights overflow float32.
MAX_AESTHETIC_WEIGHT = 10.0
# /metadata ids are index rows, int64 in the index.
MAX_ROW_ID = 2**63 - 1


def cors_headers(origin: str | None, allowed: list[str], api_key: bool) -> dict:
    """CORS headers of an answer to a request from `origin` (its Origin header), for clip-front
    pages on other origins: none unless `allowed` (cors_origins) lists it or holds '*'. A listed
    origin is echoed with `Vary: Origin` (the answer depends on it: no shared cache may give it
    to another origin); with an API key, clip-front may send it in X-API-Key."""
    if not allowed:
        return {}
    headers = {} if "*" in allowed else {"Vary": "Origin"}
    if "*" in allowed or origin in allowed:
        headers["Access-Control-Allow-Origin"] = "*" if "*" in allowed else origin
        headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        headers["Access-Control-Allow-Headers"] = (
            "Content-Type, X-API-Key" if api_key else "Content-Type"
        )
    return headers


@dataclass(frozen=True)
class KnnRequest:
    model: str
    rerank: bool
    text: str | None
    image: bytes | None
    embedding: list[float] | None
    num_images: int
    num_result_ids: int
    deduplicate: bool
    aesthetic_score: int | None
    aesthetic_weight: float


def indice_names(models: tuple[str, ...]) -> list[str]:
    """Every index name a client may ask for: each model, then each model re-ranked."""
    return [*models, *(m + RERANK_SUFFIX for m in models)]


def _optional(fields: dict, name: str):
    """clip-back reads "" as not given."""
    value = fields.get(name, "")
    return None if value == "" or value is None else value


def parse_indice(name, models: tuple[str, ...]) -> tuple[str, bool]:
    """(model, rerank) of an index name; 400 naming the names served."""
    if not isinstance(name, str) or name not in indice_names(models):
        raise BadRequest(
            400,
            f"unknown indice_name {shown(name)}; this server has {', '.join(indice_names(models))}",
        )
    return name.removesuffix(RERANK_SUFFIX), name.endswith(RERANK_SUFFIX)


def _query_input(fields: dict, dim: int, max_query_chars: int):
    """(text, image bytes, embedding): exactly one of them ("" is not given, as in clip-back)."""
    if _optional(fields, "image_url") is not None:
        raise BadRequest(400, "'image_url' is not served: send the image itself as 'image'")
    names = ("text", "image", "embedding_input")
    return parse_query_input({n: _optional(fields, n) for n in names}, names, dim, max_query_chars)


def parse_knn_request(
    fields: dict, models: tuple[str, ...], dims: dict[str, int], max_k: int, max_query_chars: int
) -> KnnRequest:
    """Check a /knn-service body the way clip-back reads it (`num_result_ids` defaults to
    `num_images`, "" means not given), with a 400 naming the field for anything else; `dims`:
    each model's embedding width (for `embedding_input`)."""
    if not isinstance(fields, dict):
        raise BadRequest(400, "the JSON body must be an object")
    unknown = sorted(set(fields) - set(KNN_FIELDS))
    if unknown:
        raise BadRequest(400, f"unknown field(s) {shown(unknown)}")
    model, rerank = parse_indice(fields.get("indice_name"), models)
    if fields.get("modality", "image") != "image":
        raise BadRequest(400, "only modality 'image' is served (there is no caption index)")
    if _as_bool("use_mclip", fields.get("use_mclip", False)):
        raise BadRequest(400, "'use_mclip' is not served: no multilingual text model here")
    text, image, embedding = _query_input(fields, dims[model], max_query_chars)
    num_images = _as_int("num_images", fields.get("num_images", 40))
    num_result_ids = _as_int("num_result_ids", fields.get("num_result_ids", num_images))
    if not 1 <= num_images <= max_k:
        raise BadRequest(
            400, f"'num_images' must be between 1 and {max_k} (got {shown(num_images)})"
        )
    if num_result_ids < 1:
        raise BadRequest(400, f"'num_result_ids' must be at least 1 (got {shown(num_result_ids)})")
    # clip-front asks 3,000 ids (their metadata comes later through /metadata): at most max_k
    # are answered, as clip-back answers fewer than asked when the index runs out.
    num_result_ids = min(num_result_ids, max_k)
    score = _optional(fields, "aesthetic_score")
    weight = _optional(fields, "aesthetic_weight")
    if score is not None:
        score = _as_int("aesthetic_score", score)
        if not 0 <= score <= 9:
            raise BadRequest(400, f"'aesthetic_score' must be between 0 and 9 (got {shown(score)})")
    weight = _as_float("aesthetic_weight", weight) if weight is not None else 0.5
    if not 0.0 <= weight <= MAX_AESTHETIC_WEIGHT:
        raise BadRequest(
            400,
            f"'aesthetic_weight' must be between 0 and {MAX_AESTHETIC_WEIGHT:g} (got "
            f"{shown(weight)}): past that the rating embedding outweighs the query entirely",
        )
    return KnnRequest(
        model,
        rerank,
        text,
        image,
        embedding,
        num_images,
        num_result_ids,
        _as_bool("deduplicate", fields.get("deduplicate", False)),
        score,
        weight,
    )


def knn_answer(rows, similarity, metadata: list[dict], num_images: int) -> list[dict]:
    """clip-back's answer: one item per result, best first; the first `num_images` carry their
    metadata, the rest only id and similarity (a client asks /metadata for them later). A
    similarity that is not a finite number (NaN from a broken vector) is null, as /search answers
    it: JSON has no NaN, and a client parsing strictly would refuse the whole answer."""
    out = []
    for i, (row, sim) in enumerate(zip(rows, similarity, strict=True)):
        item = dict(metadata[i]) if i < num_images else {}
        sim = float(sim)
        item.update({"id": int(row), "similarity": sim if math.isfinite(sim) else None})
        out.append(item)
    return out


def parse_metadata_request(fields: dict, models: tuple[str, ...], max_ids: int):
    """(model, ids) of a /metadata body: `{"ids": [...], "indice_name": ...}`."""
    if not isinstance(fields, dict):
        raise BadRequest(400, "the JSON body must be an object")
    model, _ = parse_indice(fields.get("indice_name"), models)
    ids = fields.get("ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        raise BadRequest(400, "'ids' must be a list of integer ids (from /knn-service)")
    if len(ids) > max_ids:
        raise BadRequest(400, f"'ids' holds {len(ids)} ids; the limit is {max_ids}")
    outside = [i for i in ids if not -MAX_ROW_ID - 1 <= i <= MAX_ROW_ID]
    if outside:
        raise BadRequest(
            400, f"'ids' holds {shown(outside[0])}: ids are 64-bit index rows (at most 2^63-1)"
        )
    return model, ids
