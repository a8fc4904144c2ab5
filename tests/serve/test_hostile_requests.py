"""What a hostile client tried against the search app, without Ray: query images that cost a
replica seconds of CPU, integers Python will not convert, floats float32 cannot hold, multi-
megabyte values echoed in errors, a hung LLM behind the rewriter, and cross-origin pages."""

import asyncio
import io as _io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from align.data.images import decode_image
from serve.clip_back import (
    cors_headers,
    knn_answer,
    parse_knn_request,
    parse_metadata_request,
)
from serve.config import ServeConfigError, parse_args
from serve.metrics import fallback_reason
from serve.query_images import QueryImageDecoder, decode_query_image
from serve.search import (
    MAX_SHOWN_CHARS,
    BadRequest,
    SearchLimits,
    parse_json_body,
    parse_search_request,
    shown,
)
from tests.helpers import REPO

LIMITS = SearchLimits(models=("m",), default_model="m", rewrite_available=True, dims={"m": 4})
MODELS, DIMS = ("m",), {"m": 4}
QUERY_PIXELS = 4096**2


def _encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = _io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height RGB pixels and holds a few bytes of them: decoding it
    would fail as truncated, so a refusal naming the pixel limit was read from the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 100))
        + chunk(b"IEND", b"")
    )


def _refused(call, *args, **kwargs) -> str:
    with pytest.raises(BadRequest) as e:
        call(*args, **kwargs)
    assert e.value.status == 400
    return e.value.message


# ---------------------------------------------------------------------------------------------
# Query images


def test_query_images_have_their_own_pixel_limit_read_from_the_header():
    assert parse_args({"models": {"m": {"index_corpus": "/x"}}}).max_query_image_pixels == (
        QUERY_PIXELS
    )
    message = _refused(decode_query_image, _png_header_only(7900, 7900), 32, QUERY_PIXELS)
    assert message == (
        "'image' is 7900x7900 pixels; query images may have at most 16777216 "
        "(max_query_image_pixels)"
    )
    # Under the limit the same truncated bytes are decoded, and refused for what they are.
    assert "does not decode" in _refused(decode_query_image, _png_header_only(64, 64), 32, 10**8)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_query_images_are_jpeg_png_or_webp_only(fmt):
    data = _encoded(Image.new("RGB", (40, 40), (200, 30, 30)), fmt)
    message = _refused(decode_query_image, data, 32, QUERY_PIXELS)
    assert message == "'image' is not a JPEG, PNG or WebP image (the formats query images may have)"
    assert decode_image(data, 32, QUERY_PIXELS).shape == (32, 32, 3)  # the corpus takes it


@pytest.mark.parametrize(
    ("mode", "fmt", "colour"),
    [
        ("RGB", "JPEG", (200, 30, 30)),
        ("CMYK", "JPEG", (0, 200, 200, 0)),
        ("RGB", "PNG", (20, 160, 40)),
        ("RGBA", "PNG", (20, 160, 40, 128)),
        ("LA", "PNG", (90, 255)),
        ("I;16", "PNG", 40000),
        ("P", "PNG", 3),
        ("RGB", "WEBP", (30, 30, 220)),
    ],
)
def test_large_query_images_are_reduced_before_their_mode_is_converted(
    mode, fmt, colour, monkeypatch
):
    """A 1,600 x 1,200 image for a 32-pixel model: JPEG decoded at reduced scale, others
    reduced by an integer factor, and only then converted to RGB (palettes and 16-bit greyscale,
    which cannot be averaged, first). The pixels are the corpus decoder's, within a few levels."""
    import serve.query_images as qi

    img = Image.new(mode, (1600, 1200), colour)
    if mode == "P":
        img.putpalette([v for i in range(256) for v in (i, 255 - i, 100)])
    data = _encoded(img, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    converted = []
    real = qi.to_rgb
    monkeypatch.setattr(qi, "to_rgb", lambda im: converted.append(im.size) or real(im))
    pixels = decode_query_image(data, 32, QUERY_PIXELS)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    expected = decode_image(data, 32, QUERY_PIXELS).astype(int)
    assert np.abs(pixels.astype(int) - expected).max() <= 3
    if mode not in ("P", "I;16"):
        assert max(min(size) for size in converted) < 4 * 32, converted


def test_corrupt_query_images_are_a_400_of_bounded_length():
    png = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    message = _refused(decode_query_image, png[: len(png) // 2], 32, QUERY_PIXELS)
    assert message.startswith("'image' does not decode: ")
    message = _refused(decode_query_image, b"\x89PNG\r\n\x1a\n" + b"x" * 10**6, 32, QUERY_PIXELS)
    assert len(message) < 2 * MAX_SHOWN_CHARS


def test_query_images_decode_off_the_event_loop_at_most_n_at_once(monkeypatch):
    """Four images on a decoder of two threads: two decode (each blocked in its thread until
    released), two wait their turn, and the event loop goes on running meanwhile; a decode run
    on the loop itself would block it, and this coroutine could not release them."""
    import serve.query_images as qi

    real, lock, release = qi.decode_query_image, threading.Lock(), threading.Event()
    running, seen = [0], {"most": 0, "threads": set()}

    def blocking_decode(*args):
        with lock:
            running[0] += 1
            seen["most"] = max(seen["most"], running[0])
            seen["threads"].add(threading.current_thread().name)
        try:
            assert release.wait(20), "the event loop never ran while decodes were under way"
            return real(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(qi, "decode_query_image", blocking_decode)
    png = _encoded(Image.new("RGB", (300, 200), (200, 30, 30)), "PNG")

    async def scenario():
        decoder = QueryImageDecoder(2, QUERY_PIXELS)
        tasks = [asyncio.create_task(decoder.decode(png, 32)) for _ in range(4)]
        for _ in range(500):
            if running[0] == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the other two would have started by now if allowed
        assert running[0] == 2
        release.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    assert all(r.shape == (32, 32, 3) for r in results)
    assert seen["most"] == 2 and all(n.startswith("query-image") for n in seen["threads"])


def test_query_image_decoding_is_configured():
    args = parse_args({"models": {"m": {"index_corpus": "/x"}}, "query_image_decoders": 3})
    assert args.query_image_decoders == 3
    with pytest.raises(ServeConfigError, match="query_image_decoders"):
        parse_args({"models": {"m": {"index_corpus": "/x"}}, "query_image_decoders": 0})


# ---------------------------------------------------------------------------------------------
# Integers Python will not convert, floats float32 cannot hold

LONG = "1" + "0" * 5000


def test_json_integers_past_pythons_limit_are_refused_by_field():
    with pytest.raises(ValueError, match="integer string conversion"):
        json.loads(LONG)  # what json.loads does with them: a ValueError, once a 500
    fields = parse_json_body(f'{{"q": "star", "k": {LONG}}}'.encode())
    message = _refused(parse_search_request, fields, LIMITS)
    assert message == "'k' is an integer of 5001 digits; no field takes more than 100"
    for name in ("weight", "min_aesthetic"):
        fields = parse_json_body(f'{{"q": "star", "{name}": -{LONG}}}'.encode())
        assert _refused(parse_search_request, fields, LIMITS).startswith(f"'{name}' is an integer")
    fields = parse_json_body(f'{{"embedding": [1, 2, 3, {LONG}]}}'.encode())
    assert "'embedding' must be a list of 4" in _refused(parse_search_request, fields, LIMITS)
    fields = parse_json_body(f'{{"q": {LONG}}}'.encode())
    assert "'q' must be a string" in _refused(parse_search_request, fields, LIMITS)
    fields = parse_json_body(f'{{"ids": [1, {LONG}], "indice_name": "m"}}'.encode())
    assert "'ids'" in _refused(parse_metadata_request, fields, MODELS, 10)
    knn = parse_json_body(f'{{"text": "x", "indice_name": "m", "num_images": {LONG}}}'.encode())
    assert "'num_images' is an integer" in _refused(parse_knn_request, knn, MODELS, DIMS, 100, 50)
    # The same digits in a query string.
    assert "'k' is an integer of 5001 digits" in _refused(
        parse_search_request, {"q": "star", "k": LONG}, LIMITS
    )


def test_metadata_ids_past_64_bits_are_refused():
    for row in (2**63, -(2**63) - 1, 10**30):
        message = _refused(parse_metadata_request, {"ids": [1, row], "indice_name": "m"}, MODELS, 9)
        assert message.startswith("'ids' holds ") and "64-bit" in message
    assert parse_metadata_request({"ids": [2**63 - 1], "indice_name": "m"}, MODELS, 9)[1] == [
        2**63 - 1
    ]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1e39] * 4, "'embedding' has values beyond float32's range"),
        ([1.0, 2.0, -1e300, 0.0], "'embedding' has values beyond float32's range"),
        ([1e-50] * 4, "'embedding' is all zeros (as float32)"),
        ([0, 0, 0, 0], "'embedding' is all zeros (as float32)"),
    ],
)
def test_embeddings_are_checked_as_float32(values, message):
    assert message in _refused(parse_search_request, {"embedding": values}, LIMITS)
    knn = {"embedding_input": values, "indice_name": "m"}
    assert message.replace("'embedding'", "'embedding_input'") in _refused(
        parse_knn_request, knn, MODELS, DIMS, 100, 50
    )


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e38])
def test_tiny_and_huge_embeddings_keep_their_direction(scale):
    """Representable in float32, but their sum of squares is not: normalised without NaN."""
    r = parse_search_request({"embedding": [scale, 0, 2 * scale, 0]}, LIMITS)
    np.testing.assert_allclose(r.embedding, [1 / 5**0.5, 0, 2 / 5**0.5, 0], rtol=1e-6)


def test_aesthetic_weight_is_bounded_and_nan_similarities_answer_null():
    fields = {"text": "x", "indice_name": "m", "aesthetic_score": 9}
    for weight in (10.5, -0.1, 1e300):
        message = _refused(
            parse_knn_request, {**fields, "aesthetic_weight": weight}, MODELS, DIMS, 100, 50
        )
        assert message.startswith("'aesthetic_weight' must be between 0 and 10")
    req = parse_knn_request({**fields, "aesthetic_weight": 10}, MODELS, DIMS, 100, 50)
    assert req.aesthetic_weight == 10.0
    answer = knn_answer([3, 4], np.array([np.nan, 0.5], np.float32), [{"url": "u"}], 1)
    assert answer == [{"url": "u", "id": 3, "similarity": None}, {"id": 4, "similarity": 0.5}]
    json.dumps(answer, allow_nan=False)  # strict JSON


# ---------------------------------------------------------------------------------------------
# Echoed values

BIG = "x" * (4 * 2**20)


@pytest.mark.parametrize(
    ("call", "fields", "name"),
    [
        (parse_search_request, {"q": "star", "k": BIG}, "'k'"),
        (parse_search_request, {"q": "star", "weight": BIG}, "'weight'"),
        (parse_search_request, {"q": "star", "rerank": BIG}, "'rerank'"),
        (parse_search_request, {"q": "star", "dedup": [BIG] * 3}, "'dedup'"),
        (parse_search_request, {"q": "star", "min_aesthetic": {"a": BIG}}, "'min_aesthetic'"),
        (parse_search_request, {"q": "star", "model": BIG}, "unknown model"),
        (parse_search_request, {"q": "star", BIG: 1}, "unknown field(s)"),
        (parse_knn_request, {"text": "x", "indice_name": BIG}, "unknown indice_name"),
        (parse_knn_request, {"text": "x", "indice_name": "m", BIG: 1}, "unknown field(s)"),
        (parse_knn_request, {"text": "x", "indice_name": "m", "num_images": BIG}, "num_images"),
        (parse_knn_request, {"text": "x", "indice_name": "m", "deduplicate": BIG}, "deduplicate"),
        (
            parse_knn_request,
            {"text": "x", "indice_name": "m", "aesthetic_weight": BIG},
            "aesthetic_weight",
        ),
    ],
)
def test_errors_show_at_most_a_few_hundred_characters_of_a_value(call, fields, name):
    args = (LIMITS,) if call is parse_search_request else (MODELS, DIMS, 100, 50)
    message = _refused(call, fields, *args)
    assert name in message and len(message) < 500, message[:1000]


def test_shown_is_a_bounded_repr():
    assert shown("star") == "'star'" and shown(3) == "3"
    for value in (BIG, [BIG] * 1000, {BIG: [BIG]}, 10**4000 // 7, b"\x00" * 10**6):
        assert len(shown(value)) <= MAX_SHOWN_CHARS


# ---------------------------------------------------------------------------------------------
# CORS


def test_cors_answers_only_the_configured_origins():
    assert parse_args({"models": {"m": {"index_corpus": "/x"}}}).cors_origins == []
    assert cors_headers("https://any.example", [], api_key=False) == {}
    anyone = cors_headers("https://any.example", ["*"], api_key=False)
    assert anyone["Access-Control-Allow-Origin"] == "*" and "Vary" not in anyone
    assert anyone["Access-Control-Allow-Headers"] == "Content-Type"
    listed = ["https://front.example", "http://127.0.0.1:3000"]
    echoed = cors_headers("http://127.0.0.1:3000", listed, api_key=True)
    assert echoed["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    assert echoed["Vary"] == "Origin"
    assert "X-API-Key" in echoed["Access-Control-Allow-Headers"]
    assert cors_headers("https://evil.example", listed, api_key=True) == {"Vary": "Origin"}
    assert cors_headers(None, listed, api_key=False) == {"Vary": "Origin"}
    for bad in ("front.example", "https://front.example/", "ftp://x", "https://"):
        with pytest.raises(ServeConfigError, match="cors_origins"):
            parse_args({"models": {"m": {"index_corpus": "/x"}}, "cors_origins": [bad]})


# ---------------------------------------------------------------------------------------------
# The LLM rewriter: one deadline, a circuit breaker


class LlmEndpoint:
    """An OpenAI-compatible endpoint on loopback (aiohttp, on the test's event loop) that
    answers, fails with 503 or hangs, as `mode` says, and counts its calls."""

    def __init__(self):
        self.mode, self.calls = "ok", 0

    async def _chat(self, request):
        from aiohttp import web

        self.calls += 1
        await request.read()
        if self.mode == "hang":
            await self.released.wait()
        if self.mode != "ok":
            return web.Response(status=503, text="down")
        return web.json_response({"choices": [{"message": {"content": "a lovely red star"}}]})

    async def __aenter__(self):
        from aiohttp import web

        self.released = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc):
        self.released.set()
        await self.runner.cleanup()


def _rewriter(url: str, **cfg):
    from serve.deployments import QueryRewriter

    method = {"backend": "http", "variant": "k_list", "http": {"url": url, "max_retries": 2}}
    return QueryRewriter.func_or_class({"method": method, "retry_wait_s": 0.2, **cfg})


def test_unusable_completions_fall_back_with_a_reason_of_their_own():
    from actors.rewrite import checked_completion

    reasons = [
        fallback_reason(checked_completion("q", completion, None, max_chars=10)[1])
        for completion in ("  ", "x" * 11)
    ]
    assert reasons == ["empty_completion", "too_long"]


def test_a_hung_llm_costs_one_deadline_for_the_whole_call():
    """timeout_s bounds every attempt and backoff together: 3 attempts of a hung endpoint end at
    1 s with the query as is (per attempt, they took over 3 s)."""

    async def scenario():
        async with LlmEndpoint() as endpoint:
            endpoint.mode = "hang"
            rewriter = _rewriter(endpoint.url, timeout_s=1.0)
            t0 = time.perf_counter()
            result = await rewriter.rewrite("a red star")
            return result, time.perf_counter() - t0

    result, elapsed = asyncio.run(scenario())
    assert result["rewritten"] == "a red star"
    assert result["fallback"] == "llm error: no answer within 1 s (all attempts)"
    assert fallback_reason(result["fallback"]) == "timeout"  # the metric's tag
    assert 1.0 <= elapsed < 1.6


def test_the_circuit_breaker_opens_answers_without_calling_and_lets_one_trial_through():
    async def scenario():
        async with LlmEndpoint() as endpoint:
            endpoint.mode = "fail"
            rewriter = _rewriter(
                endpoint.url, retry_wait_s=0.01, breaker_failures=2, breaker_cooldown_s=0.5
            )
            for i in range(2):  # two failed calls, of 3 attempts each
                answer = await rewriter.rewrite(f"query {i}")
                assert answer["fallback"].startswith("llm error: HTTP 503")
                assert fallback_reason(answer["fallback"]) == "llm_error"
            assert endpoint.calls == 6
            t0 = time.perf_counter()
            answer = await rewriter.rewrite("query 2")
            assert time.perf_counter() - t0 < 0.05
            assert answer == {
                "rewritten": "query 2",
                "fallback": "circuit breaker open after 2 consecutive endpoint failures "
                "(next try in 0 s)",
            }
            assert endpoint.calls == 6  # answered without calling the endpoint
            assert fallback_reason(answer["fallback"]) == "circuit_open"
            await asyncio.sleep(0.6)  # the cool-down: one trial goes through, and fails
            await rewriter.rewrite("query 3")
            assert endpoint.calls == 9
            answer = await rewriter.rewrite("query 4")
            assert answer["fallback"].startswith("circuit breaker open") and endpoint.calls == 9
            await asyncio.sleep(0.6)  # the endpoint is back: the trial closes the breaker
            endpoint.mode = "ok"
            assert (await rewriter.rewrite("query 5"))["fallback"] is None
            assert (await rewriter.rewrite("query 6"))["fallback"] is None
            assert endpoint.calls == 11

    asyncio.run(scenario())


def test_circuit_breaker_lets_one_trial_through_at_a_time():
    from actors.llm import CircuitBreaker

    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.record(False)
    breaker.record(True)  # a success resets the count
    for _ in range(3):
        assert breaker.allow()
        breaker.record(False)
    assert not breaker.allow()
    now[0] = 9.9
    assert not breaker.allow() and "next try in 0 s" in breaker.refusal()
    now[0] = 10.0
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # one at a time
    breaker.record(False)
    assert not breaker.allow()  # open again, for another cool-down
    now[0] = 20.0
    assert breaker.allow()
    breaker.record(True)
    assert breaker.allow() and breaker.allow()


def test_the_rewriter_deadline_must_fit_the_proxy_timeout(tmp_path):
    from serve.app import load_serve_config

    http = {"backend": "http", "variant": "k_list", "http": {"url": "http://127.0.0.1:1/v1"}}
    args = {"models": {"m": {"index_corpus": "/x"}}, "rewriter": {"method": http}}
    parse_args({**args, "request_timeout_s": 30})  # 10 s of 30: fine
    with pytest.raises(ServeConfigError, match=r"rewriter.timeout_s \(20\) is over half of "):
        parse_args({**args, "request_timeout_s": 30, "rewriter": {"method": http, "timeout_s": 20}})
    # configs/serve.yaml hands the proxy's timeout to the app (one YAML anchor) ...
    config = load_serve_config(str(REPO / "configs/serve.yaml"))
    timeout = config["http_options"]["request_timeout_s"]
    assert config["applications"][0]["args"]["request_timeout_s"] == timeout == 30
    # ... and a config where the two differ is refused, naming both.
    config["applications"][0]["args"]["request_timeout_s"] = 60
    path = tmp_path / "serve.yaml"
    path.write_text(json.dumps(config))
    with pytest.raises(ServeConfigError, match=r"args.request_timeout_s \(60\) is not http_opt"):
        load_serve_config(str(path))
