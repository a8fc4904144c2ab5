"""What the search endpoint does between the HTTP request and the deployments, without Ray:
read a JSON body, parse and check a request, check image ids, and tell an image's content type
from its bytes.

Every problem with a request raises `BadRequest` with the HTTP status and a message that names the
field; the ingress turns it into a JSON error. Nothing here may raise anything else on user input.
A message shows a client's value only through `shown`, which cuts it to a few hundred characters.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import reprlib
from dataclasses import dataclass, field

import numpy as np

SEARCH_FIELDS = (
    "q",
    "image",
    "embedding",
    "k",
    "rewrite",
    "rerank",
    "weight",
    "model",
    "dedup",
    "min_aesthetic",
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
# No field takes a longer integer (index rows are 64-bit, float32 ends at 39 digits); longer ones
# are not converted at all: int() of a long digit string costs time quadratic in its length, and
# Python refuses more than 4,300 digits with a ValueError.
MAX_INT_DIGITS = 100
MAX_SHOWN_CHARS = 200
_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = MAX_SHOWN_CHARS
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 8
_SHOWN.maxlevel = 3


class BadRequest(Exception):
    """A request the endpoint refuses: `status` (4xx) and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def shown(value) -> str:
    """A client's value as an error message may show it: its repr, at most MAX_SHOWN_CHARS
    characters (a 4 MB field must not come back as a 4 MB answer). Cheap on any size: only the
    part shown is formatted."""
    text = _SHOWN.repr(value)
    return text if len(text) <= MAX_SHOWN_CHARS else text[: MAX_SHOWN_CHARS - 3] + "..."


class LongInteger:
    """A JSON integer of more than MAX_INT_DIGITS digits, left unconverted: no field accepts it,
    and each field's check refuses it by name."""

    def __init__(self, digits: str):
        self.digits = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        return f"<an integer of {self.digits} digits>"


def _json_int(text: str) -> int | LongInteger:
    return int(text) if len(text) <= MAX_INT_DIGITS else LongInteger(text)


def parse_json_body(body: bytes):
    """A request body as JSON, whatever its Content-Type; integers over MAX_INT_DIGITS digits
    stay `LongInteger`s for the fields' checks to refuse.

    Raises:
        BadRequest: 400 for malformed JSON, text that is not UTF-8, or nesting too deep.
    """
    try:
        return json.loads(body, parse_int=_json_int)
    except RecursionError:
        raise BadRequest(400, "malformed JSON body: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(400, f"malformed JSON body: {shown(str(e))}") from None


def _too_long(name: str, value) -> None:
    """Refuse an integer too long for any field, from JSON or from a query string."""
    if isinstance(value, str):
        digits = value.strip().lstrip("+-")
        if len(digits) > MAX_INT_DIGITS and digits.isdigit():
            value = LongInteger(digits)
    if isinstance(value, LongInteger):
        raise BadRequest(
            400,
            f"'{name}' is an integer of {value.digits} digits; no field takes more than "
            f"{MAX_INT_DIGITS}",
        )


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
    raise BadRequest(400, f"'{name}' must be true or false (got {shown(value)})")


def _as_int(name: str, value) -> int:
    _too_long(name, value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(400, f"'{name}' must be an integer (got {shown(value)})")
    try:
        return int(value)
    except ValueError:
        raise BadRequest(400, f"'{name}' must be an integer (got {shown(value)})") from None


def _as_float(name: str, value) -> float:
    _too_long(name, value)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise BadRequest(400, f"'{name}' must be a number (got {shown(value)})")
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(400, f"'{name}' must be a number (got {shown(value)})") from None
    if not math.isfinite(number):
        raise BadRequest(400, f"'{name}' must be a finite number (got {shown(value)})")
    return number


def unit_vector(name: str, values: list, dim: int | None) -> list[float]:
    """An embedding query as searched: float32, L2-normalised. Checked after the cast to float32,
    where finite doubles can overflow to infinity (1e39) or underflow to zero (1e-50).

    Raises:
        BadRequest: 400 naming `name`: not a list of `dim` finite numbers, out of float32's range,
            or no direction (all zeros in float32).
    """
    ok = isinstance(values, list) and (dim is None or len(values) == dim)
    ok = ok and all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)
    if not ok or not all(math.isfinite(x) for x in values):
        raise BadRequest(400, f"'{name}' must be a list of {dim} finite numbers")
    with np.errstate(over="ignore"):
        vector = np.asarray(values, dtype=np.float64).astype(np.float32)
    if not np.isfinite(vector).all():
        largest = float(np.finfo(np.float32).max)
        raise BadRequest(400, f"'{name}' has values beyond float32's range (+-{largest:.4g})")
    # Scaled by its largest value first: the sum of squares of 1e-30s or 1e30s would underflow
    # or overflow float32 and the norm come out 0 or inf.
    scale = np.abs(vector).max() if len(vector) else 0.0
    if not scale > 0:
        raise BadRequest(400, f"'{name}' is all zeros (as float32): it has no direction")
    vector = vector / scale
    return (vector / np.linalg.norm(vector)).tolist()


def parse_query_input(
    fields: dict, names: tuple[str, str, str], dim: int | None, max_query_chars: int
) -> tuple[str | None, bytes | None, list[float] | None]:
    """(text, image bytes, embedding) of a query given as exactly one of the fields `names`
    (text, base64 image, list of floats; absent or None: not given). `dim`: the width an
    embedding must have; it comes back float32 and L2-normalised (`unit_vector`). Shared by
    /search and clip-back's /knn-service."""
    text_name, image_name, embedding_name = names
    text, image, embedding = (fields.get(n) for n in names)
    given = [n for n, v in zip(names, (text, image, embedding), strict=True) if v is not None]
    if len(given) != 1:
        raise BadRequest(
            400,
            f"give exactly one of '{text_name}', '{image_name}' and '{embedding_name}' "
            f"(got {', '.join(map(repr, given)) or 'none'})",
        )
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
    return None, None, unit_vector(embedding_name, embedding, dim)


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
            400, f"unknown field(s) {shown(unknown)}; known: {', '.join(SEARCH_FIELDS)}"
        )
    model = fields.get("model", limits.default_model)
    if not isinstance(model, str) or model not in limits.models:
        raise BadRequest(
            400, f"unknown model {shown(model)}; this server has {', '.join(limits.models)}"
        )
    q, image, embedding = parse_query_input(
        fields, ("q", "image", "embedding"), limits.dims.get(model), limits.max_query_chars
    )
    k = _as_int("k", fields.get("k", limits.default_k))
    if not 1 <= k <= limits.max_k:
        raise BadRequest(400, f"'k' must be between 1 and {limits.max_k} (got {shown(k)})")
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
        q,
        k,
        rewrite,
        _as_bool("rerank", fields.get("rerank", False)),
        weight,
        model,
        image=image,
        embedding=embedding,
        dedup=_as_bool("dedup", fields.get("dedup", False)),
        min_aesthetic=min_aesthetic,
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
