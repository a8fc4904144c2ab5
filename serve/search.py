"""What the search endpoint does between the HTTP request and the deployments, without Ray:
parse and check a request, check image ids, and tell an image's content type from its bytes.

Every problem with a request raises `BadRequest` with the HTTP status and a message that names the
field; the ingress turns it into a JSON error. Nothing here may raise anything else on user input.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass, field

SEARCH_FIELDS = (
    "q", "image", "embedding", "k", "rewrite", "rerank", "weight", "model", "dedup",
    "min_aesthetic",
)  # fmt: skip
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class BadRequest(Exception):
    """A request the endpoint refuses: `status` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class SearchLimits:
    """What a request may ask for (from the serve config)."""

    models: tuple[str, ...]
    default_model: str
    default_k: int = 10
    max_k: int = 100
    max_query_chars: int = 1000
    rewrite_available: bool = False
    default_weight: float = 0.3
    # Each model's embedding width: what an `embedding` query must have.
    dims: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SearchRequest:
    q: str | None  # exactly one of q, image (encoded bytes) and embedding
    k: int
    rewrite: bool
    rerank: bool
    weight: float
    model: str
    image: bytes | None = None
    embedding: list[float] | None = None
    dedup: bool = False
    min_aesthetic: float | None = None

    @property
    def filtered(self) -> bool:
        return self.dedup or self.min_aesthetic is not None


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise BadRequest(400, f"'{name}' must be true or false (got {value!r})")


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(400, f"'{name}' must be an integer (got {value!r})")
    try:
        return int(value)
    except ValueError:
        raise BadRequest(400, f"'{name}' must be an integer (got {value!r})") from None


def _as_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(400, f"'{name}' must be a number (got {value!r})")
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(400, f"'{name}' must be a number (got {value!r})") from None
    if not math.isfinite(number):
        raise BadRequest(400, f"'{name}' must be a finite number (got {value!r})")
    return number


def parse_query_input(
    fields: dict, names: tuple[str, str, str], dim: int | None, max_query_chars: int
) -> tuple[str | None, bytes | None, list[float] | None]:
    """(text, image bytes, embedding) of a query given as exactly one of the fields `names`
    (text, base64 image, list of floats; absent or None: not given). `dim`: the width an
    embedding must have. Shared by /search and clip-back's /knn-service."""
    text_name, image_name, embedding_name = names
    text, image, embedding = (fields.get(n) for n in names)
    given = [n for n, v in zip(names, (text, image, embedding), strict=True) if v is not None]
    if len(given) != 1:
        raise BadRequest(
            400, f"give exactly one of '{text_name}', '{image_name}' and '{embedding_name}' "
            f"(got {', '.join(map(repr, given)) or 'none'})",
        )  # fmt: skip
    if text is not None:
        if not isinstance(text, str):
            raise BadRequest(400, f"'{text_name}' must be a string (got {type(text).__name__})")
        text = text.strip()
        if not text:
            raise BadRequest(400, f"'{text_name}' is empty")
        if len(text) > max_query_chars:
            raise BadRequest(
                400, f"'{text_name}' is {len(text)} characters; the limit is {max_query_chars}"
            )
        return text, None, None
    if image is not None:
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, TypeError, ValueError):
            data = b""
        if not data:
            raise BadRequest(400, f"'{image_name}' must be a base64-encoded image")
        return None, data, None
    ok = isinstance(embedding, list) and (dim is None or len(embedding) == dim)
    ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in embedding)
    if not ok or not all(math.isfinite(x) for x in embedding):
        raise BadRequest(400, f"'{embedding_name}' must be a list of {dim} finite numbers")
    if not any(embedding):
        raise BadRequest(400, f"'{embedding_name}' is all zeros: it has no direction")
    return None, None, [float(x) for x in embedding]


def parse_search_request(fields: dict, limits: SearchLimits) -> SearchRequest:
    """Check the fields of GET /search (strings) or POST /search (JSON values): the query is
    `q` (text), `image` (base64, POST) or `embedding` (floats of the model's width, POST).

    Raises:
        BadRequest: 400 for an unknown field, none or several of q / image / embedding, an
            empty q, a wrong type, k, weight or min_aesthetic out of range, a query over the
            configured length, rewriting asked of a server without a rewriter or of a query
            that is not text, or an unknown model.
    """
    unknown = sorted(set(fields) - set(SEARCH_FIELDS))
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(SEARCH_FIELDS)}"
        )
    model = fields.get("model", limits.default_model)
    if model not in limits.models:
        raise BadRequest(
            400, f"unknown model {model!r}; this server has {', '.join(limits.models)}"
        )
    q, image, embedding = parse_query_input(
        fields, ("q", "image", "embedding"), limits.dims.get(model), limits.max_query_chars
    )
    k = _as_int("k", fields.get("k", limits.default_k))
    if not 1 <= k <= limits.max_k:
        raise BadRequest(400, f"'k' must be between 1 and {limits.max_k} (got {k})")
    rewrite = _as_bool("rewrite", fields.get("rewrite", False))
    if rewrite and not limits.rewrite_available:
        raise BadRequest(400, "'rewrite' is not available: this server has no rewriter configured")
    if rewrite and q is None:
        raise BadRequest(400, "'rewrite' rewrites text: an image or embedding query has none")
    weight = _as_float("weight", fields.get("weight", limits.default_weight))
    if not 0.0 <= weight <= 1.0:
        raise BadRequest(400, f"'weight' must be between 0 and 1 (got {weight})")
    min_aesthetic = fields.get("min_aesthetic")
    if min_aesthetic is not None and min_aesthetic != "":
        min_aesthetic = _as_float("min_aesthetic", min_aesthetic)
    else:
        min_aesthetic = None
    return SearchRequest(
        q, k, rewrite, _as_bool("rerank", fields.get("rerank", False)), weight, model,
        image=image, embedding=embedding, dedup=_as_bool("dedup", fields.get("dedup", False)),
        min_aesthetic=min_aesthetic,
    )  # fmt: skip


MAX_IMAGE_ID_CHARS = 1000


def check_image_id(image_id: str) -> None:
    """Refuse ids that try to leave the corpus: '..' segments, absolute paths, backslashes, NUL.

    Raises:
        BadRequest: 400 naming the problem.
    """
    if not image_id or len(image_id) > MAX_IMAGE_ID_CHARS:
        raise BadRequest(400, f"image id must be 1 to {MAX_IMAGE_ID_CHARS} characters")
    if "\x00" in image_id or "\\" in image_id:
        raise BadRequest(400, "image id must not contain NUL or backslashes")
    if image_id.startswith("/") or ".." in image_id.split("/"):
        raise BadRequest(400, "image id must not be an absolute path or contain '..' segments")


_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def content_type(data: bytes) -> str:
    """The image's media type from its first bytes (names and extensions can lie)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return "application/octet-stream"
