"""The search app end to end: configs/serve.yaml deployed as `serve run` deploys it (Serve's own
config schema and deploy path), real replicas, real FAISS, real open_clip, a real HTTP proxy on
loopback, and the search page driven in headless Chromium."""

import asyncio
import base64
import copy
import http.client
import io as _io
import json
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from align.config import ModelConfig, load_config
from align.method.rewrite import keyword_rewrite
from align.models.clip import build_clip
from align.search.build import read_scored_embeddings
from align.storage import io
from pipelines.index_corpus import index_corpus
from serve.app import deploy, load_serve_config
from tests.helpers import (
    HeadlessChromium,
    free_port,
    indexed_world,
    metric_total,
    scraped_metrics,
    wait_for_metrics,
)

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
KEY_ENV, KEY = "SEARCH_TEST_API_KEY", "test-secret-123"
FRONT_ORIGIN = "http://front.example:3000"


class Client:
    """Raw HTTP/1.1 on loopback: paths are sent exactly as given (no client-side normalising)."""

    def __init__(self, port: int):
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.getheader("Content-Type") or "", r.read()
        finally:
            conn.close()

    def search(self, **fields):
        status, kind, body = self.request("GET", "/search?" + urllib.parse.urlencode(fields))
        assert status == 200, body
        assert kind.startswith("application/json")
        return json.loads(body)


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """A small world indexed by two micro-clip checkpoints (`base`, `other`), and two apps from
    configs/serve.yaml: `search` (both models, keywords rewriter, CORS for any origin, as the
    config has it) and `secured` (an API key, CORS for one origin)."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    overrides = indexed_world(root, 300)
    torch.manual_seed(1)
    other = root / "other.pt"
    state = torch.load(root / "micro.pt", weights_only=True)
    torch.save(
        {
            k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v
            for k, v in state.items()
        },
        other,
    )
    index_corpus(
        load_config(
            REPO / "configs/demo.yaml",
            [
                *overrides,
                f"model.pretrained={other}",
                f"index_corpus.output={root}/index_corpus_other",
            ],
        )
    )
    config = load_serve_config(REPO / "configs/serve.yaml")
    search = config["applications"][0]
    search["args"]["models"] = {
        "base": {"index_corpus": str(root / "index_corpus"), "label": "base model"},
        "other": {"index_corpus": str(root / "index_corpus_other")},
    }
    search["args"]["default_model"] = "base"
    secured = copy.deepcopy(search)
    secured.update(name="secured", route_prefix="/secured")
    secured["args"].update(models={"base": search["args"]["models"]["base"]}, api_key_env=KEY_ENV)
    secured["args"].pop("default_model")
    secured["args"]["filters"] = {"max_depth": 150}  # a filtered search stops short here
    secured["args"]["cors_origins"] = [FRONT_ORIGIN]
    secured["runtime_env"] = {"env_vars": {KEY_ENV: KEY}}
    # An LLM rewriter whose endpoint is down (nothing listens on the port): rewrites fall back.
    secured["args"]["rewriter"] = {
        "method": {
            "backend": "http",
            "variant": "k_phrase",
            "http": {"url": f"http://127.0.0.1:{free_port()}/v1/chat/completions", "model": "m"},
        },
        "timeout_s": 2.0,
    }
    config["applications"].append(secured)
    port = free_port()
    deploy(config, host="127.0.0.1", port=port)
    yield Client(port), root
    serve.shutdown()


def _stored(root: Path, index_dir: str):
    vectors, table = read_scored_embeddings(
        io.list_files(str(root / index_dir / "scored"), ".parquet")
    )
    return vectors, np.asarray(table["image_id"].to_pylist()), table["aesthetic"].to_numpy()


def _embed(checkpoint: Path, text: str) -> np.ndarray:
    clip = build_clip(ModelConfig(name="micro-clip", pretrained=str(checkpoint)))
    with torch.inference_mode():
        e = clip.model.encode_text(clip.tokenizer([text]))
    return torch.nn.functional.normalize(e.float(), dim=-1).numpy()[0]


def test_search_matches_an_exact_search_done_independently(served):
    client, root = served
    answer = client.search(q="a red star", k=8)
    vectors, ids, aesthetic = _stored(root, "index_corpus")
    sims = vectors @ _embed(root / "micro.pt", "a red star")
    top = np.argsort(-sims)[:8]
    assert [r["image_id"] for r in answer["results"]] == ids[top].tolist()
    got = np.array([r["similarity"] for r in answer["results"]])
    np.testing.assert_allclose(got, sims[top], atol=3e-3)  # float16 query and corpus vectors
    np.testing.assert_allclose(
        [r["aesthetic"] for r in answer["results"]], aesthetic[top], atol=1e-4
    )
    assert [r["rank"] for r in answer["results"]] == list(range(1, 9))
    assert answer["model"] == "base" and answer["rewritten"] is None


def test_post_gives_what_get_gives(served):
    client, _ = served
    fields = {"q": "a blue circle", "k": 5, "rerank": True}
    status, _, body = client.request("POST", "/search", json.dumps(fields).encode())
    assert status == 200
    assert json.loads(body)["results"] == client.search(**fields)["results"]


def _post(client, path="/search", headers=None, **fields):
    status, _, body = client.request("POST", path, json.dumps(fields).encode(), headers)
    assert status == 200, body
    return json.loads(body)


def test_image_and_embedding_queries_and_captions_in_results(served):
    client, root = served
    vectors, ids, _ = _stored(root, "index_corpus")
    corpus = io.read_parquet(str(root / "world/images"), columns=["image_id", "image", "caption"])
    captions = dict(zip(corpus["image_id"].to_pylist(), corpus["caption"].to_pylist(), strict=True))
    # By image: the corpus image itself comes first, decoded by the jobs' guarded decoder.
    row = corpus.filter(pc.equal(corpus["image_id"], str(ids[11])))
    image = base64.b64encode(row["image"][0].as_py()).decode()
    answer = _post(client, image=image, k=4)
    assert answer["query_kind"] == "image" and answer["query"] is None
    assert answer["results"][0]["image_id"] == ids[11]
    assert answer["results"][0]["similarity"] > 0.99
    # By embedding (any scale: it is normalised): exactly the stored vectors' own top 6.
    query = 3.0 * vectors[20]
    answer = _post(client, embedding=query.tolist(), k=6, model="base")
    top = _exact_top(vectors, vectors[20], 6)
    assert [r["image_id"] for r in answer["results"]] == ids[top].tolist()
    np.testing.assert_allclose(
        [r["similarity"] for r in answer["results"]],
        (vectors[top] @ vectors[20]) / np.linalg.norm(vectors[20]), atol=2e-3,
    )  # fmt: skip
    # Every result carries the corpus's caption (the world's images table has one).
    assert all(r["caption"] == captions[r["image_id"]] for r in answer["results"])
    assert all(r["source_url"] is None for r in answer["results"])  # the world has no urls
    # A large query image (the corpus image, 47 times as large) is reduced to the model's size.
    small = Image.open(_io.BytesIO(row["image"][0].as_py()))
    buf = _io.BytesIO()
    small.resize((small.width * 47, small.height * 47), Image.Resampling.NEAREST).save(buf, "PNG")
    answer = _post(client, image=base64.b64encode(buf.getvalue()).decode(), k=4)
    assert answer["results"][0]["image_id"] == ids[11]
    assert answer["results"][0]["similarity"] > 0.95
    buf = _io.BytesIO()
    small.save(buf, "GIF")
    gif = base64.b64encode(buf.getvalue()).decode()
    for fields, message in (
        ({"image": "bm90IGFuIGltYWdl"}, "'image' is not a JPEG, PNG or WebP image"),
        ({"image": gif}, "'image' is not a JPEG, PNG or WebP image"),
        ({"embedding": [1.0] * 7}, "list of 32 finite numbers"),
        ({"image": image, "rewrite": True}, "'rewrite' rewrites text"),
    ):
        status, _, body = client.request("POST", "/search", json.dumps(fields).encode())
        assert status == 400 and message in json.loads(body)["error"], body


def test_filters_return_k_results_whenever_the_corpus_has_them(served):
    """dedup and min_aesthetic search deeper until k pass, and the answer says what was dropped
    and whether the depth bound was hit (the `secured` app bounds it at 150 candidates)."""
    client, root = served
    vectors, ids, aesthetic = _stored(root, "index_corpus")
    query = _embed(root / "micro.pt", "a red star")
    # dedup: most of this model's top results are near-duplicates; 10 distinct ones come back,
    # the most aesthetic of each group, as computed here.
    answer = client.search(q="a red star", k=10, dedup="true")
    expected, searched = _deduplicated(vectors, query, 10, 0.94, aesthetic)
    assert [r["image_id"] for r in answer["results"]] == ids[expected].tolist()
    assert answer["filtered"]["searched"] == searched > 10 and not answer["filtered"]["bound_hit"]
    assert answer["filtered"]["duplicates"] > 0
    # min_aesthetic with a query whose top half holds nothing that passes: the first 5 that pass
    # lie deeper than 150 candidates.
    away = -vectors[int(np.nanargmax(aesthetic))]
    order = _exact_top(vectors, away, len(vectors))
    threshold = float(np.nanmax(aesthetic[order[:150]])) + 1e-3
    passing = [int(i) for i in order if aesthetic[i] >= threshold]
    assert passing
    answer = _post(client, embedding=away.tolist(), k=5, min_aesthetic=threshold)
    assert [r["image_id"] for r in answer["results"]] == ids[passing[:5]].tolist()
    assert all(r["aesthetic"] >= threshold - 1e-5 for r in answer["results"])
    assert answer["filtered"]["below_min_aesthetic"] >= 150
    assert not answer["filtered"]["bound_hit"]
    bounded = _post(client, "/secured/search", {"X-API-Key": KEY}, embedding=away.tolist(),
                    k=5, min_aesthetic=threshold)  # fmt: skip
    assert bounded["results"] == []
    assert bounded["filtered"] == {"below_min_aesthetic": 150, "duplicates": 0, "searched": 150,
                                   "bound_hit": True}  # fmt: skip


def test_rerank_blends_similarity_and_aesthetic(served):
    client, root = served
    q = "a green square"
    by_aesthetic = client.search(q=q, k=10, rerank="true", weight=1)["results"]
    assert [r["aesthetic"] for r in by_aesthetic] == sorted(
        (r["aesthetic"] for r in by_aesthetic), reverse=True
    )
    # weight 1 picks the most aesthetic of the top `rerank.depth` (100) by similarity.
    vectors, ids, aesthetic = _stored(root, "index_corpus")
    depth = np.argsort(-(vectors @ _embed(root / "micro.pt", q)))[:100]
    best = depth[np.argsort(-aesthetic[depth], kind="stable")[:10]]
    assert [r["image_id"] for r in by_aesthetic] == ids[best].tolist()
    by_similarity = client.search(q=q, k=10, rerank="true", weight=0)["results"]
    assert by_similarity == client.search(q=q, k=10)["results"]
    assert by_aesthetic != by_similarity


def test_rewrite_searches_with_the_rewritten_query(served):
    client, root = served
    answer = client.search(q="a red star", k=5, rewrite="true")
    assert answer["rewritten"] == keyword_rewrite("a red star", "k_phrase")
    vectors, ids, _ = _stored(root, "index_corpus")
    top = np.argsort(-(vectors @ _embed(root / "micro.pt", answer["rewritten"])))[:5]
    assert [r["image_id"] for r in answer["results"]] == ids[top].tolist()


def test_models_are_switchable(served):
    client, root = served
    other = client.search(q="a red star", k=8, model="other")
    vectors, ids, _ = _stored(root, "index_corpus_other")
    top = np.argsort(-(vectors @ _embed(root / "other.pt", "a red star")))[:8]
    assert [r["image_id"] for r in other["results"]] == ids[top].tolist()
    assert other["results"] != client.search(q="a red star", k=8)["results"]


def test_images_are_served_with_their_content_type(served):
    client, root = served
    result = client.search(q="a yellow triangle", k=3)["results"][0]
    status, kind, body = client.request("GET", result["url"])
    assert status == 200 and kind == "image/jpeg"
    images = io.read_parquet(str(root / "world/images"), columns=["image_id", "image"])
    row = images.filter(pc.equal(images["image_id"], result["image_id"]))
    assert body == row["image"][0].as_py()


BAD_REQUESTS = [
    ("GET", "/search?q=", 400, "'q' is empty"),
    ("GET", "/search?q=%20%20", 400, "'q' is empty"),
    ("GET", "/search?k=3", 400, "give exactly one of 'q', 'image' and 'embedding'"),
    ("GET", "/search?q=" + "a" * 1001, 400, "limit is 1000"),
    ("GET", "/search?q=star&k=0", 400, "'k' must be between 1 and 100"),
    ("GET", "/search?q=star&k=101", 400, "'k' must be between 1 and 100"),
    ("GET", "/search?q=star&k=ten", 400, "'k' must be an integer"),
    ("GET", "/search?q=star&rerank=maybe", 400, "'rerank' must be true or false"),
    ("GET", "/search?q=star&weight=2", 400, "'weight' must be between 0 and 1"),
    ("GET", "/search?q=star&weight=nan", 400, "'weight' must be a finite number"),
    ("GET", "/search?q=star&model=huge", 400, "unknown model 'huge'"),
    ("GET", "/search?q=star&colour=red", 400, "unknown field(s) ['colour']"),
    ("GET", "/search?q=star&q=moon", 400, "each field may be given once"),
    ("POST", "/search", 400, "malformed JSON body"),
    ("POST", "/search", 400, "must be an object"),
    ("POST", "/search", 400, "'k' must be an integer"),
    ("GET", "/images/no-such-image", 404, "unknown image id 'no-such-image'"),
    ("GET", "/images/../../etc/passwd", 400, "'..' segments"),
    ("GET", "/images/..%2F..%2Fetc%2Fpasswd", 400, "'..' segments"),
    ("GET", "/images/%2Fetc%2Fpasswd", 400, "absolute path"),
    ("GET", "/images/a%5C..%5Cb", 400, "backslashes"),
    ("GET", "/nowhere", 404, "Not Found"),
    ("DELETE", "/search", 405, "Method Not Allowed"),
]
POST_BODIES = {"malformed JSON body": b'{"q": "star"', "must be an object": b'["star"]',
               "'k' must be an integer": b'{"q": "star", "k": [3]}'}  # fmt: skip


@pytest.mark.parametrize(("method", "path", "status", "message"), BAD_REQUESTS)
def test_bad_input_is_a_4xx_json_error_naming_the_problem(served, method, path, status, message):
    client, _ = served
    got, kind, body = client.request(method, path, POST_BODIES.get(message))
    assert got == status, body
    assert kind.startswith("application/json")
    assert message in json.loads(body)["error"]


def test_healthz_reports_each_model(served):
    client, _ = served
    status, _, body = client.request("GET", "/healthz")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert health["models"]["base"]["images"] == health["models"]["other"]["images"] == 300


def test_api_key_is_required_when_configured(served):
    client, _ = served
    for headers in ({}, {"X-API-Key": "wrong"}):
        status, _, body = client.request("GET", "/secured/search?q=star", headers=headers)
        assert status == 401 and "API key" in json.loads(body)["error"]
    status, _, body = client.request("GET", "/secured/search?q=star", headers={"X-API-Key": KEY})
    assert status == 200
    url = json.loads(body)["results"][0]["url"]
    assert url.startswith("/secured/images/")
    assert client.request("GET", url)[0] == 401
    assert client.request("GET", url, headers={"X-API-Key": KEY})[0] == 200
    assert client.request("GET", "/secured/healthz")[0] == 200


def test_search_page_in_headless_chromium(served, tmp_path):
    client, _ = served

    async def scenario():
        async with HeadlessChromium(tmp_path / "profile") as page:
            await page.navigate(f"http://127.0.0.1:{client.port}/")
            assert await page.evaluate("document.getElementById('model').options.length") == 2
            await page.evaluate("document.getElementById('q').focus()")
            await page.type_text("a red star")
            await page.evaluate("document.getElementById('rerank').click()")
            await page.press_enter()
            await page.wait_for("document.body.dataset.state === 'results'")
            await page.wait_for(
                "document.querySelectorAll('figure[data-loaded=true]').length === 10"
            )
            status = await page.evaluate("document.getElementById('status').textContent")
            captions = await page.evaluate(
                "[...document.querySelectorAll('figcaption')].map(c => c.textContent)"
            )
            shot = await page.screenshot(tmp_path / "search-page.png")
            return status, captions, shot

    status, captions, shot = asyncio.run(scenario())
    assert status.startswith("10 results from base model")
    assert captions[0].startswith("#1 similarity")
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
    reranked = client.search(q="a red star", k=10, rerank="true")["results"]
    assert [c.split(" ")[0] for c in captions] == [f"#{r['rank']}" for r in reranked]


def test_search_page_keeps_its_state_in_the_url_and_takes_dropped_images(served, tmp_path):
    """A shared link runs its search; a new search is a history entry that Back restores; an
    image dropped on the page searches by that image."""
    client, root = served
    corpus = io.read_parquet(str(root / "world/images"), columns=["image_id", "image"])
    dropped_id, dropped = corpus["image_id"][9].as_py(), corpus["image"][9].as_py()
    settle = "document.body.dataset.state = 'stale'"
    done = "document.body.dataset.state === 'results'"
    figures = "document.querySelectorAll('figure').length"

    async def scenario():
        async with HeadlessChromium(tmp_path / "profile") as page:
            base = f"http://127.0.0.1:{client.port}/"
            await page.navigate(base + "?q=a+blue+circle&k=5&min_aesthetic=-5&model=other")
            await page.wait_for(done)
            shared = await page.evaluate(
                "[document.getElementById('q').value,"
                " document.getElementById('min-aesthetic').value,"
                " document.getElementById('model').value, document.getElementById('status')"
                ".textContent]"
            )
            shared.append(await page.evaluate(figures))
            await page.evaluate(f"{settle}; document.getElementById('q').value = 'a green square'")
            await page.evaluate("document.getElementById('q').focus()")
            await page.press_enter()
            await page.wait_for(done)
            pushed = await page.evaluate("document.location.search")
            await page.evaluate(f"{settle}; history.back()")
            await page.wait_for(done)
            back = await page.evaluate(
                f"[document.location.search, document.getElementById('q').value, {figures}]"
            )
            await page.evaluate(
                f"""{settle};
                const bytes = Uint8Array.from(atob('{base64.b64encode(dropped).decode()}'),
                                              (c) => c.charCodeAt(0));
                const data = new DataTransfer();
                data.items.add(new File([bytes], 'query.jpg', {{type: 'image/jpeg'}}));
                document.getElementById('drop').dispatchEvent(
                    new DragEvent('drop', {{dataTransfer: data, bubbles: true}}));"""
            )
            await page.wait_for(done)
            by_image = await page.evaluate(
                "[document.getElementById('status').textContent,"
                " document.querySelector('figure img').title, document.location.search]"
            )
            return shared, pushed, back, by_image

    shared, pushed, back, by_image = asyncio.run(scenario())
    q, min_aesthetic, model, status, count = shared
    assert (q, min_aesthetic, model, count) == ("a blue circle", "-5", "other", 5)
    assert "5 results from other" in status and "under the minimum" in status
    assert pushed.startswith("?q=a+green+square&k=5&model=other")
    assert back[0] == "?q=a+blue+circle&k=5&min_aesthetic=-5&model=other"
    assert back[1:] == ["a blue circle", 5]
    assert by_image[0].startswith("5 results for the image from other")
    assert by_image[1] == dropped_id
    assert "q=" not in by_image[2]  # the image's settings are in the URL, not the image


def test_a_killed_replica_costs_no_request(served):
    """Kill the only TextEncoder replica: requests wait for or retry onto its replacement."""
    import ray

    client, _ = served
    before = client.search(q="a red star", k=5)["results"]
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::search#TextEncoder#")
    ]
    assert len(replicas) == 1
    ray.kill(
        ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True
    )
    for _ in range(5):
        assert client.search(q="a red star", k=5)["results"] == before
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    assert replicas[0]["name"] not in names


def test_hardened_http_answers(served):
    """Review findings: key before body, body limit, deep JSON, cache scope, page headers,
    a foreign Host on the keyless server (DNS rebinding)."""
    client, _ = served
    # The key is checked before the body is read: a keyless malformed body is 401, not 400.
    status, _, _ = client.request("POST", "/secured/search", b"{not json")
    assert status == 401
    # Over max_body_bytes without a query image: 413; over max_image_body_bytes: 413 before
    # it is parsed.
    big = json.dumps({"q": "star", "pad": "x" * 100_000}).encode()
    status, _, body = client.request("POST", "/search", big)
    assert status == 413 and "the limit is 65536" in json.loads(body)["error"]
    status, _, body = client.request("POST", "/search", b"[" * (5 * 2**20))
    assert status == 413 and "the limit is 4194304" in json.loads(body)["error"]
    status, _, body = client.request("POST", "/search", b"[" * 30_000 + b"]" * 30_000)
    assert status == 400 and "nested too deeply" in json.loads(body)["error"]

    key = {"X-API-Key": KEY}
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    conn.request("GET", "/secured/search?q=star", headers=key)
    answer = conn.getresponse()
    url = json.loads(answer.read())["results"][0]["url"]
    assert answer.getheader("Cache-Control").startswith("private")
    conn.request("GET", url, headers=key)
    image = conn.getresponse()
    image.read()
    assert image.getheader("Cache-Control").startswith("private")
    assert image.getheader("X-Content-Type-Options") == "nosniff"
    conn.request("GET", "/")
    page = conn.getresponse()
    page.read()
    assert page.getheader("X-Content-Type-Options") == "nosniff"
    csp = page.getheader("Content-Security-Policy")
    assert "script-src 'sha256-" in csp and "frame-ancestors 'none'" in csp
    conn.close()

    evil = {"Host": "attacker.example:8000"}
    for path in ("/search?q=star", "/", "/healthz"):
        status, _, body = client.request("GET", path, headers=evil)
        assert status == 400 and "attacker.example" in json.loads(body)["error"], path
    status, _, _ = client.request("GET", "/secured/search?q=star", headers={**evil, **key})
    assert status == 200  # a keyed server may sit behind any name


HOSTILE = [
    # Integers Python will not convert, ids past 64 bits, floats float32 cannot hold.
    ("POST", "/search", b'{"q": "star", "k": 1' + b"0" * 5000 + b"}", "'k' is an integer of"),
    ("GET", "/search?q=star&k=1" + "0" * 5000, None, "'k' is an integer of 5001 digits"),
    ("POST", "/metadata", b'{"indice_name": "base", "ids": [9223372036854775808]}', "'ids' holds"),
    ("POST", "/search", json.dumps({"embedding": [1e39] * 32}).encode(), "float32's range"),
    ("POST", "/search", json.dumps({"embedding": [1e-50] * 32}).encode(), "is all zeros"),
    (
        "POST",
        "/knn-service",
        json.dumps(
            {"text": "star", "indice_name": "base", "aesthetic_score": 9, "aesthetic_weight": 1e6}
        ).encode(),
        "'aesthetic_weight' must be between 0 and 10",
    ),
    # A body of megabytes echoes a few hundred characters of it.
    (
        "POST",
        "/search",
        json.dumps({"image": "AAAA", "k": "9" * 10 + "x" * (3 * 2**20)}).encode(),
        "'k' must be an integer (got '9999999999xxx",
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), HOSTILE)
def test_hostile_values_are_a_short_400_naming_the_field(served, method, path, body, message):
    client, _ = served
    status, kind, answer = client.request(method, path, body)
    assert status == 400 and kind.startswith("application/json"), answer[:1000]
    assert message in json.loads(answer)["error"] and len(answer) < 1000


def test_cors_echoes_only_the_configured_origin_and_allows_the_key_header(served):
    """`secured` lists one origin and needs an API key: that origin is echoed (Vary: Origin) and
    may send X-API-Key; another origin gets no CORS answer."""
    client, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    try:
        for origin, allowed in ((FRONT_ORIGIN, True), ("http://evil.example", False)):
            conn.request("OPTIONS", "/secured/knn-service", headers={"Origin": origin})
            preflight = conn.getresponse()
            preflight.read()
            assert preflight.status == 204 and preflight.getheader("Vary") == "Origin"
            echoed = preflight.getheader("Access-Control-Allow-Origin")
            assert echoed == (origin if allowed else None)
            if allowed:
                assert "X-API-Key" in preflight.getheader("Access-Control-Allow-Headers")
        headers = {"Origin": FRONT_ORIGIN, "X-API-Key": KEY}
        conn.request("GET", "/secured/indices-list", headers=headers)
        answer = conn.getresponse()
        assert answer.status == 200 and json.loads(answer.read()) == ["base", "base+rerank"]
        assert answer.getheader("Access-Control-Allow-Origin") == FRONT_ORIGIN
    finally:
        conn.close()


def _image_bomb() -> bytes:
    """A 7,900 x 7,900 single-colour PNG: about 200 KB that decode to 190 MB of pixels."""
    buf = _io.BytesIO()
    Image.new("RGB", (7900, 7900), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_image_bombs_are_refused_while_text_searches_go_on(served):
    """The load case: 8 clients search by text while 4 send 7,900 x 7,900 PNG queries at once.
    The bombs get a 400 naming max_query_image_pixels from the header alone; every text search
    is answered (benchmarks/serve_load.py --image-bombs measures their latency)."""
    client, _ = served
    bomb = json.dumps({"image": base64.b64encode(_image_bomb()).decode(), "k": 5}).encode()
    stop, searches, bombs = threading.Event(), [], []

    def search():
        while not stop.is_set():
            t0 = time.perf_counter()
            status, _, _ = client.request("GET", "/search?q=a+red+star&k=10")
            searches.append((status, time.perf_counter() - t0))

    def send_bomb():
        status, _, body = client.request("POST", "/search", bomb)
        bombs.append((status, json.loads(body)["error"]))

    searchers = [threading.Thread(target=search) for _ in range(8)]
    for t in searchers:
        t.start()
    time.sleep(1.0)
    senders = [threading.Thread(target=send_bomb) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    time.sleep(1.0)
    stop.set()
    for t in searchers:
        t.join()
    refusal = (
        "'image' is 7900x7900 pixels; query images may have at most 16777216 "
        "(max_query_image_pixels)"
    )
    assert bombs == [(400, refusal)] * 4
    assert len(searches) > 8 and all(status == 200 for status, _ in searches)
    print(f"text searches: {len(searches)}, slowest {max(s for _, s in searches):.2f} s")


# ---------------------------------------------------------------------------------------------
# clip-retrieval's back-end API, driven by clip-retrieval's own ClipClient


def _clip_client():
    """clip-retrieval's ClipClient from the installed wheel (pinned in the Makefile), loaded by
    path: the package's __init__ imports its server and that server's dependencies."""
    import importlib.util

    package = importlib.util.find_spec("clip_retrieval")
    path = Path(package.submodule_search_locations[0]) / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ClipClient


def _exact_top(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(vectors @ query), kind="stable")[:k]


def _deduplicated(vectors, query, k, threshold, aesthetic, depth=None, max_depth=2000):
    """The spec of a deduplicated search, computed here: the exact top `depth` (k unless
    re-ranking) in similarity order, each joining the group of the first group leader within
    cosine `threshold` or leading a new group; one kept per group (the most aesthetic, or the
    leader without `aesthetic`); 4x deeper until k are kept. (kept rows in similarity order,
    depth searched)."""
    depth, bound = depth or k, min(max_depth, len(vectors))
    depth = min(depth, bound)
    while True:
        top = _exact_top(vectors, query, depth)
        v = vectors[top] / np.linalg.norm(vectors[top], axis=1, keepdims=True)
        groups: list[list[int]] = []  # positions in `top`, leader first
        for i in range(depth):
            home = next((g for g in groups if v[i] @ v[g[0]] >= threshold), None)
            if home is None:
                groups.append([i])
            else:
                home.append(i)
        if aesthetic is None:
            best = [g[0] for g in groups]
        else:
            best = [max(g, key=lambda i: (aesthetic[top[i]], -i)) for g in groups]
        kept = [int(top[i]) for i in sorted(best)]
        if len(kept) >= k or depth >= bound:
            return kept, depth
        depth = min(depth * 4, bound)


def test_clip_client_text_image_and_embedding_queries(served, tmp_path):
    client, root = served
    ClipClient = _clip_client()
    url = f"http://127.0.0.1:{client.port}/knn-service"
    vectors, ids, _ = _stored(root, "index_corpus")
    plain = ClipClient(url=url, indice_name="base", num_images=8, aesthetic_weight=0.0,
                       deduplicate=False)  # fmt: skip
    found = plain.query(text="a red star")
    top = _exact_top(vectors, _embed(root / "micro.pt", "a red star"), 8)
    assert [r["id"] for r in found] == top.tolist()  # clip-back's ids: rows of the index
    assert [r["image_path"] for r in found] == ids[top].tolist()
    assert all(r["url"].startswith("http://127.0.0.1:") for r in found)
    corpus = io.read_parquet(str(root / "world/images"), columns=["image_id", "image", "caption"])
    captions = dict(zip(corpus["image_id"].to_pylist(), corpus["caption"].to_pylist(), strict=True))
    assert [r["caption"] for r in found] == [captions[i] for i in ids[top]]  # clip-front shows it
    image_status, kind, _ = client.request("GET", found[0]["url"].split(str(client.port), 1)[1])
    assert image_status == 200 and kind.startswith("image/")
    # An image query: the image itself comes first.
    (tmp_path / "query.jpg").write_bytes(corpus["image"][7].as_py())
    by_image = plain.query(image=str(tmp_path / "query.jpg"))
    assert by_image[0]["image_path"] == corpus["image_id"][7].as_py()
    assert by_image[0]["similarity"] > 0.99
    # An embedding query: a stored vector finds its own row first.
    by_embedding = plain.query(embedding_input=vectors[5].tolist())
    assert by_embedding[0]["id"] == 5 and len(by_embedding) == 8


def test_clip_client_aesthetic_score_steers_towards_the_rating_level(served):
    """aesthetic_score 9 with weight 0.5: the query plus half the mean embedding of the corpus's
    best-rated tenth, renormalised (computed here from the stored vectors and scores)."""
    client, root = served
    ClipClient = _clip_client()
    url = f"http://127.0.0.1:{client.port}/knn-service"
    vectors, _, aesthetic = _stored(root, "index_corpus")
    edges = np.quantile(aesthetic, np.arange(1, 10) / 10)
    best = vectors[np.searchsorted(edges, aesthetic, side="right") == 9]
    rating9 = (best / np.linalg.norm(best, axis=1, keepdims=True)).mean(axis=0)
    query = _embed(root / "micro.pt", "a red star")
    steered = query + 0.5 * rating9
    steered /= np.linalg.norm(steered)
    found = ClipClient(url=url, indice_name="base", num_images=8, aesthetic_score=9,
                       aesthetic_weight=0.5, deduplicate=False).query(text="a red star")  # fmt: skip
    assert [r["id"] for r in found] == _exact_top(vectors, steered, 8).tolist()
    assert np.mean(aesthetic[[r["id"] for r in found]]) > np.mean(
        aesthetic[_exact_top(vectors, query, 8)]
    )


def test_clip_client_deduplicate_and_the_rest_of_the_api(served):
    client, root = served
    ClipClient = _clip_client()
    url = f"http://127.0.0.1:{client.port}/knn-service"
    vectors, _, _ = _stored(root, "index_corpus")
    # deduplicate drops every result within cosine 0.94 of a better one, as clip-back does, but
    # searches deeper until the asked number remain (clip-back filters after the search and
    # answers fewer: https://github.com/rom1504/clip-retrieval/issues/283).
    # This random-init model maps the corpus to few distinct directions (how many depends on the
    # CPU's float rounding), so ask for as many results as the whole corpus has groups, up to 3.
    groups = len(_deduplicated(vectors, vectors[3], len(vectors), 0.94, None)[0])
    asked = min(3, groups)
    assert asked >= 2, "the fixture's corpus collapsed to one direction"
    found = ClipClient(url=url, indice_name="base", num_images=asked, aesthetic_weight=0.0,
                       deduplicate=True).query(embedding_input=vectors[3].tolist())  # fmt: skip
    rows = [r["id"] for r in found]
    expected, searched = _deduplicated(vectors, vectors[3], asked, 0.94, None)
    assert rows == expected and rows[0] == 3 and len(rows) == asked and searched > asked
    # indices-list, re-rank as an index, num_result_ids past num_images, /metadata, CORS.
    status, _, body = client.request("GET", "/indices-list")
    assert status == 200 and json.loads(body) == ["base", "other", "base+rerank", "other+rerank"]
    fields = {"text": "a blue circle", "indice_name": "base+rerank", "num_images": 3,
              "num_result_ids": 6, "modality": "image"}  # fmt: skip
    status, _, body = client.request(
        "POST", "/knn-service", json.dumps(fields).encode(), {"Content-Type": "text/plain"}
    )
    answer = json.loads(body)
    assert status == 200 and len(answer) == 6
    assert all("url" in r for r in answer[:3]) and all(set(r) == {"id", "similarity"}
                                                      for r in answer[3:])  # fmt: skip
    status, headers_kind, body = client.request(
        "POST", "/metadata", json.dumps({"ids": [r["id"] for r in answer[3:]],
                                         "indice_name": "base+rerank"}).encode(),
    )  # fmt: skip
    metadata = json.loads(body)
    assert status == 200 and [m["id"] for m in metadata] == [r["id"] for r in answer[3:]]
    assert all(m["metadata"]["url"].startswith("http://") for m in metadata)
    conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    conn.request("OPTIONS", "/knn-service")
    preflight = conn.getresponse()
    assert preflight.status == 204 and preflight.getheader("Access-Control-Allow-Origin") == "*"
    conn.close()
    for bad, message in (
        ({**fields, "modality": "text"}, "modality"),
        ({**fields, "use_mclip": True}, "use_mclip"),
        ({**fields, "indice_name": "nope"}, "indice_name"),
        ({**fields, "embedding_input": [1.0, 2.0]}, "exactly one"),
        ({"indice_name": "base", "embedding_input": [1.0, 2.0]}, "embedding_input"),
        ({**fields, "aesthetic_score": 12}, "aesthetic_score"),
    ):
        status, _, body = client.request("POST", "/knn-service", json.dumps(bad).encode())
        assert status == 400 and message in json.loads(body)["error"], body


_DEEP_IMAGES = """(() => {
  const found = [];
  const walk = (root) => root.querySelectorAll('*').forEach((el) => {
    if (el.tagName === 'IMG') found.push(el);
    if (el.shadowRoot) walk(el.shadowRoot);
  });
  walk(document);
  return found.filter((img) => img.src.includes('/images/'))
              .map((img) => [img.src, img.complete && img.naturalWidth > 0]);
})()"""


def test_clip_front_build_searches_this_backend_in_headless_chromium(served, tmp_path):
    """clip-retrieval's own front-end build (from the pinned wheel), served from another origin,
    pointed at this app with ?back=: it lists our indices, runs the query and its images load."""
    import functools
    import http.server
    import importlib.util
    import threading

    client, root = served
    package = Path(importlib.util.find_spec("clip_retrieval").submodule_search_locations[0])
    build = package.parent / "front" / "build"
    assert (build / "index.html").is_file(), build
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(build))
    handler.log_message = lambda *a: None
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=front.serve_forever, daemon=True).start()
    back = f"http://127.0.0.1:{client.port}"
    page_url = (
        f"http://127.0.0.1:{front.server_port}/?back={urllib.parse.quote(back, safe='')}"
        f"&index=base&query={urllib.parse.quote('a red star')}"
    )

    async def scenario():
        async with HeadlessChromium(tmp_path / "profile") as page:
            await page.navigate(page_url)
            # clip-front hides near-duplicates by default (deduplicate on): on this corpus and
            # random-init model most top results are within cosine 0.94 of the first.
            # Wait for the first result's image itself: another can finish loading before it.
            await page.wait_for(f"(({_DEEP_IMAGES})[0] || [null, false])[1]", 60)
            images = await page.evaluate(_DEEP_IMAGES)
            shot = await page.screenshot(tmp_path / "clip-front.png")
            return images, shot

    try:
        images, shot = asyncio.run(scenario())
    finally:
        front.shutdown()
        front.server_close()
    print("clip-front screenshot:", tmp_path / "clip-front.png")
    vectors, ids, _ = _stored(root, "index_corpus")
    # clip-front asks with its own defaults (aesthetic steering off, dedup and safety on): the
    # first image it shows is our best match for the query, loaded from our /images.
    top = _exact_top(vectors, _embed(root / "micro.pt", "a red star"), 1)
    assert images and images[0][1]
    assert images[0][0] == f"{back}/images/{urllib.parse.quote(str(ids[top[0]]), safe='/')}"
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000


def test_prometheus_metrics_of_every_stage_route_and_model(served):
    """After a few searches, every metric serve/metrics.py documents is on the node's Prometheus
    endpoint with what those searches did: requests by route template and status, each stage's
    latency, a rewrite fallback by reason, a search short of k, each model's index size."""
    from serve.metrics import METRICS, PREFIX, STAGES

    client, _ = served
    key = {"X-API-Key": KEY}
    name = {
        m: f"ray_{PREFIX}{m}" + {"counter": "_total", "gauge": "", "histogram": "_count"}[kind]
        for m, (kind, _, _) in METRICS.items()
    }
    before = scraped_metrics()
    answer = client.search(q="a red star", k=5, rerank="true", dedup="true")
    client.request("GET", answer["results"][0]["url"])
    status, _, body = client.request("GET", "/secured/search?q=star&rewrite=true", headers=key)
    assert status == 200 and json.loads(body)["rewrite_fallback"].startswith("llm error")
    short = _post(client, "/secured/search", key, q="a red star", k=5, min_aesthetic=50.0)
    assert short["results"] == []

    def grew(now, metric, **labels):
        return metric_total(now, name[metric], **labels) > metric_total(
            before, name[metric], **labels
        )

    expected = [
        ("requests", {"route": "/search", "status": "200", "application": "search"}),
        ("requests", {"route": "/images/{image_id:path}", "status": "200"}),
        ("rewrite_fallbacks", {"reason": "llm_error"}),
        ("results_below_k", {"model": "base", "application": "secured"}),
        *[("stage_seconds", {"stage": stage}) for stage in STAGES],
    ]
    now = wait_for_metrics(lambda now: all(grew(now, m, **tags) for m, tags in expected))
    for model in ("base", "other"):  # the gauge of each VectorIndex replica
        sizes = {
            s.value for s in now if s.name == name["index_vectors"] and s.labels["model"] == model
        }
        assert sizes == {300}, [(s.labels, s.value) for s in now if s.name == name["index_vectors"]]
    assert {s.name for s in now} >= set(name.values())
