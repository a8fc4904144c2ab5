"""What the search endpoint does between the HTTP request and the deployments, without Ray:
parse and check a request, check image ids, and tell an image's content type from its bytes.

Every problem with a request raises `BadRequest` with the HTTP status and a message that names the
field; the ingress turns it into a JSON error. Nothing here may raise anything else on user input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SEARCH_FIELDS = ("q", "k", "rewrite", "rerank", "weight", "model")
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


@dataclass(frozen=True)
class SearchRequest:
    q: str
    k: int
    rewrite: bool
    rerank: bool
    weight: float
    model: str


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


def parse_search_request(fields: dict, limits: SearchLimits) -> SearchRequest:
    """Check the fields of GET /search (strings) or POST /search (JSON values).

    Raises:
        BadRequest: 400 for an unknown field, a missing or empty q, a wrong type, k or weight out
            of range, a query over the configured length, rewriting asked of a server without a
            rewriter, or an unknown model.
    """
    unknown = sorted(set(fields) - set(SEARCH_FIELDS))
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {', '.join(unknown)}; known: {', '.join(SEARCH_FIELDS)}"
        )
    q = fields.get("q")
    if q is None:
        raise BadRequest(400, "'q' (the query) is required")
    if not isinstance(q, str):
        raise BadRequest(400, f"'q' must be a string (got {type(q).__name__})")
    q = q.strip()
    if not q:
        raise BadRequest(400, "'q' is empty")
    if len(q) > limits.max_query_chars:
        raise BadRequest(400, f"'q' is {len(q)} characters; the limit is {limits.max_query_chars}")
    k = _as_int("k", fields.get("k", limits.default_k))
    if not 1 <= k <= limits.max_k:
        raise BadRequest(400, f"'k' must be between 1 and {limits.max_k} (got {k})")
    rewrite = _as_bool("rewrite", fields.get("rewrite", False))
    if rewrite and not limits.rewrite_available:
        raise BadRequest(400, "'rewrite' is not available: this server has no rewriter configured")
    weight = _as_float("weight", fields.get("weight", limits.default_weight))
    if not 0.0 <= weight <= 1.0:
        raise BadRequest(400, f"'weight' must be between 0 and 1 (got {weight})")
    model = fields.get("model", limits.default_model)
    if model not in limits.models:
        raise BadRequest(
            400, f"unknown model {model!r}; this server has {', '.join(limits.models)}"
        )
    return SearchRequest(
        q, k, rewrite, _as_bool("rerank", fields.get("rerank", False)), weight, model
    )


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
