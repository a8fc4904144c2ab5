"""The search app's pieces that need no Ray: request checks, re-ranking, image ids and types,
the image lookup of each corpus layout, the app's args and their resolution from job manifests."""

import base64
import io as _io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from align.config import ModelConfig, load_config
from align.models.clip import build_clip, check_model, image_tower_digest, weights_fingerprint
from align.runtime.manifest import JobManifest
from serve.config import ServeConfigError, parse_args, resolve_models
from serve.images import CorpusImages
from serve.search import (
    BadRequest,
    SearchLimits,
    check_image_id,
    content_type,
    parse_search_request,
)
from tests.helpers import REPO, ScriptedEndpoint

LIMITS = SearchLimits(
    models=("aligned", "base"),
    default_model="aligned",
    rewrite_available=True,
    dims={"aligned": 4, "base": 3},
)


def _encoded(fmt: str, colour=(200, 30, 30)) -> bytes:
    buf = _io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format=fmt)
    return buf.getvalue()


def test_request_defaults_and_types_from_query_strings_and_json():
    r = parse_search_request({"q": "  a red star "}, LIMITS)
    assert (r.q, r.k, r.rewrite, r.rerank, r.weight, r.model) == (
        "a red star", 10, False, False, 0.3, "aligned",
    )  # fmt: skip
    r = parse_search_request(
        {"q": "x", "k": "5", "rerank": "on", "weight": "1", "model": "base"}, LIMITS
    )
    assert (r.k, r.rerank, r.weight, r.model) == (5, True, 1.0, "base")
    r = parse_search_request({"q": "x", "k": 7, "rewrite": True, "weight": 0}, LIMITS)
    assert (r.k, r.rewrite, r.weight) == (7, True, 0.0)
    assert (r.dedup, r.min_aesthetic, r.filtered) == (False, None, False)
    # Queries by image and by embedding (of the asked model's width), and the result filters.
    png = _encoded("PNG")
    r = parse_search_request({"image": base64.b64encode(png).decode(), "dedup": True}, LIMITS)
    assert (r.q, r.image, r.embedding, r.dedup, r.filtered) == (None, png, None, True, True)
    r = parse_search_request(
        {"embedding": [0, 1, 0.5], "model": "base", "min_aesthetic": -1}, LIMITS
    )
    # The embedding comes back as searched: float32, unit length.
    np.testing.assert_allclose(r.embedding, np.array([0, 1, 0.5]) / np.sqrt(1.25), rtol=1e-6)
    assert (r.min_aesthetic, r.filtered) == (-1.0, True)
    assert parse_search_request({"q": "x", "min_aesthetic": ""}, LIMITS).min_aesthetic is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "give exactly one of 'q', 'image' and 'embedding' (got none)"),
        ({"q": "x", "embedding": [1, 2, 3, 4]}, "(got 'q', 'embedding')"),
        ({"image": "not base64!"}, "'image' must be a base64-encoded image"),
        ({"image": ""}, "'image' must be a base64-encoded image"),
        ({"embedding": [1, 2, 3]}, "'embedding' must be a list of 4 finite numbers"),
        ({"embedding": "1,2,3,4"}, "'embedding' must be a list of 4 finite numbers"),
        ({"embedding": [0, 0, 0, 0]}, "'embedding' is all zeros"),
        ({"embedding": [1, 2, 3], "model": "base", "rewrite": True}, "'rewrite' rewrites text"),
        ({"q": "x", "dedup": "maybe"}, "'dedup' must be true or false"),
        ({"q": "x", "min_aesthetic": "nan"}, "'min_aesthetic' must be a finite number"),
        ({"q": ""}, "'q' is empty"),
        ({"q": "\n\t "}, "'q' is empty"),
        ({"q": 3}, "'q' must be a string"),
        ({"q": "a" * 1001}, "'q' is 1001 characters; the limit is 1000"),
        ({"q": "x", "k": 0}, "'k' must be between 1 and 100"),
        ({"q": "x", "k": -3}, "'k' must be between 1 and 100"),
        ({"q": "x", "k": 101}, "'k' must be between 1 and 100"),
        ({"q": "x", "k": True}, "'k' must be an integer"),
        ({"q": "x", "k": 2.5}, "'k' must be an integer"),
        ({"q": "x", "k": "1e3"}, "'k' must be an integer"),
        ({"q": "x", "rerank": "perhaps"}, "'rerank' must be true or false"),
        ({"q": "x", "rewrite": 1}, "'rewrite' must be true or false"),
        ({"q": "x", "weight": "-0.1"}, "'weight' must be between 0 and 1"),
        ({"q": "x", "weight": "inf"}, "'weight' must be a finite number"),
        ({"q": "x", "model": "aligned2"}, "unknown model 'aligned2'"),
        ({"q": "x", "limit": 3}, "unknown field(s) ['limit']"),
    ],
)
def test_bad_requests_name_the_field(fields, message):
    with pytest.raises(BadRequest) as e:
        parse_search_request(fields, LIMITS)
    assert e.value.status == 400
    assert message in e.value.message


def test_rewrite_refused_when_no_rewriter_is_configured():
    limits = SearchLimits(models=("m",), default_model="m", rewrite_available=False)
    assert parse_search_request({"q": "x", "rewrite": "false"}, limits).rewrite is False
    with pytest.raises(BadRequest, match="no rewriter configured"):
        parse_search_request({"q": "x", "rewrite": "true"}, limits)


@pytest.mark.parametrize("image_id", ["img-000001", "shard/0001.jpg", "a..b.jpg", "x y.png"])
def test_ordinary_image_ids_pass(image_id):
    check_image_id(image_id)


@pytest.mark.parametrize(
    "image_id", ["", "../x", "a/../../etc/passwd", "/etc/passwd", "a\\..\\b", "a\x00b", "x" * 1001]
)
def test_escaping_image_ids_are_refused(image_id):
    with pytest.raises(BadRequest) as e:
        check_image_id(image_id)
    assert e.value.status == 400


def test_content_type_is_read_from_the_bytes():
    for fmt, kind in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
                      ("GIF", "image/gif"), ("BMP", "image/bmp")):  # fmt: skip
        assert content_type(_encoded(fmt)) == kind
    assert content_type(b"%PDF-1.7") == "application/octet-stream"


# ---------------------------------------------------------------------------------------------
# Image lookup per corpus layout


def test_parquet_corpus_reads_each_row_from_its_row_group(tmp_path):
    ids = [f"img-{i:03d}" for i in range(50)]
    images = [_encoded("PNG", (i, 2 * i, 3 * i)) for i in range(50)]
    for part in range(2):
        rows = slice(25 * part, 25 * (part + 1))
        table = pa.table({"image_id": ids[rows], "image": pa.array(images[rows], pa.binary())})
        pq.write_table(table, tmp_path / f"part-{part}.parquet", row_group_size=7)
    corpus = {"input": str(tmp_path), "input_format": "parquet", "id_column": "image_id",
              "image_column": "image", "path_column": None}  # fmt: skip
    indexed = np.array(ids[:40], dtype=object)  # the last 10 failed to decode: not in the index
    group = 7 * max(map(len, images)) + 4 * 8  # the most one row group's column holds
    store = CorpusImages(corpus, indexed, cache_bytes=2 * group)
    assert len(store) == 40
    for i in (0, 6, 7, 24, 25, 39, 3):
        assert store.read(ids[i]) == images[i]
    assert store.read(ids[45]) is None and store.read("nope") is None
    assert len(store._cache) == 2 and store._cached_bytes <= 2 * group


def test_image_lookup_is_a_sorted_table_on_disk_built_once(tmp_path, monkeypatch):
    """No dict of every id: a binary search over memory-mapped sorted ids; a second replica with
    the same key maps the table the first built, without reading the index's ids again."""
    monkeypatch.setenv("AESTHETIC_ALIGN_CACHE", str(tmp_path / "cache"))
    ids = [f"id-{i:04d}" for i in range(300)][::-1]  # stored out of order
    images = [_encoded("PNG", (i % 256, 0, 0)) for i in range(300)]
    table = pa.table({"image_id": ids, "image": pa.array(images, pa.binary())})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=64)
    corpus = {"input": str(tmp_path / "part-0.parquet"), "input_format": "parquet",
              "id_column": "image_id", "image_column": "image", "path_column": None}  # fmt: skip
    indexed = pa.array(ids[::2])  # every other image is in the index
    store = CorpusImages(corpus, indexed, key="k1")
    assert isinstance(store.ids, np.memmap) and len(store) == 150
    assert (store.ids[1:] > store.ids[:-1]).all()
    assert store.read(ids[10]) == images[10] and store.read(ids[11]) is None

    def not_needed():
        raise AssertionError("the table exists: the ids must not be read again")

    again = CorpusImages(corpus, not_needed, key="k1")
    assert again.read(ids[298]) == images[298] and "id-9999" not in again


def test_parquet_corpus_with_hugging_face_image_structs(tmp_path):
    data = _encoded("PNG")
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": data, "path": "a.png"}], kind)
    pq.write_table(pa.table({"image_id": ["a"], "image": images}), tmp_path / "hf.parquet")
    corpus = {"input": str(tmp_path), "input_format": "parquet", "id_column": "image_id",
              "image_column": "image", "path_column": None}  # fmt: skip
    assert CorpusImages(corpus, np.array(["a"], dtype=object)).read("a") == data


def test_parquet_path_corpus_serves_the_listed_paths(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_encoded("JPEG"))
    pq.write_table(
        pa.table({"key": ["a", "b"], "path": [str(tmp_path / "a.jpg"), "/etc/passwd"]}),
        tmp_path / "list.parquet",
    )
    corpus = {"input": str(tmp_path / "list.parquet"), "input_format": "parquet",
              "id_column": "key", "image_column": None, "path_column": "path"}  # fmt: skip
    store = CorpusImages(corpus, np.array(["a"], dtype=object))
    assert store.read("a") == (tmp_path / "a.jpg").read_bytes()
    assert store.read("b") is None  # listed, but not in the index


def test_folder_corpus_never_leaves_the_folder(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "sub/x.png").write_bytes(_encoded("PNG"))
    (tmp_path / "secret.png").write_bytes(_encoded("PNG", (1, 1, 1)))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    corpus = {"input": str(root), "input_format": "folder", "id_column": "image_id",
              "image_column": None, "path_column": None}  # fmt: skip
    store = CorpusImages(corpus, np.array(["sub/x.png", "link.png"], dtype=object))
    assert store.read("sub/x.png") == (root / "sub/x.png").read_bytes()
    assert store.read("link.png") is None  # in the index, but the file lies outside the corpus
    assert store.read("../secret.png") is None


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["plain", "gzip"])
def test_webdataset_corpus_reads_members_by_offset(tmp_path, mode):
    """Plain tars by offset; compressed ones (index_corpus reads them too) by streaming."""
    images = {f"{i:05d}": _encoded("JPEG", (10 * i, 0, 0)) for i in range(4)}
    with tarfile.open(tmp_path / "shard-0.tar", mode) as tar:
        for key, data in images.items():
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, _io.BytesIO(payload))
    corpus = {"input": str(tmp_path), "input_format": "webdataset", "id_column": "image_id",
              "image_column": None, "path_column": None}  # fmt: skip
    store = CorpusImages(corpus, np.array(list(images), dtype=object))
    assert all(store.read(k) == v for k, v in images.items())
    assert store.read("99999") is None


# ---------------------------------------------------------------------------------------------
# Args and their resolution from the jobs' manifests


def _args(**extra) -> dict:
    return {"models": {"m": {"index_corpus": "/nowhere"}}, **extra}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "serve args 'models': Field required"),
        (_args(max_kk=3), "serve args 'max_kk': Extra inputs are not permitted"),
        (_args(default_model="x"), "default_model 'x' is not one of the models (m)"),
        (_args(default_k=50, max_k=20), "default_k (50) is over max_k (20)"),
        (_args(rerank={"depth": 10}), "rerank.depth (10) is under max_k (100)"),
        (_args(rewriter={"method": {"backend": "vllm"}}), "use backend 'http'"),
        (_args(image_url_template="https://cdn/x"), "needs an {image_id} slot"),
        ({"models": {"m": {"run": "/r"}}}, "serve args 'models.m.index_corpus': Field required"),
    ],
)
def test_bad_args_name_the_key(args, message):
    with pytest.raises(ServeConfigError) as e:
        parse_args(args)
    assert message in str(e.value)


@pytest.fixture
def job_outputs(tmp_path):
    """Manifests as the jobs write them: a pretrain run exporting model.pt and an index_corpus
    output built with it."""
    ckpt = tmp_path / "pretrain/model.pt"
    ckpt.parent.mkdir()
    torch.save(build_clip(ModelConfig(name="micro-clip")).model.state_dict(), ckpt)
    run = JobManifest("finetune", load_config(None, ["model.name=micro-clip"]))
    run.extra["export"] = str(ckpt)
    run.write(str(tmp_path / "pretrain"), rows_in=1, rows_out=1, rows_error=0)
    config = load_config(None, ["model.name=micro-clip", f"model.pretrained={ckpt}"])
    ic = JobManifest("index_corpus", config)
    ic.extra["input"] = str(tmp_path / "images")
    ic.write(str(tmp_path / "index_corpus"), rows_in=1, rows_out=1, rows_error=0)
    (tmp_path / "index_corpus/index").mkdir()
    index_manifest = {  # _index.json's keys the checks read (align.search.stored)
        "model": config.model.model_dump(),
        "weights": weights_fingerprint(config.model),
        "dim": check_model(config.model).embed_dim,
        "shards": [],
    }
    (tmp_path / "index_corpus/index/_index.json").write_text(json.dumps(index_manifest))
    return tmp_path, ckpt


def test_models_resolve_from_the_manifests(job_outputs):
    root, ckpt = job_outputs
    args = parse_args(
        {
            "models": {
                "base": {"index_corpus": str(root / "index_corpus"), "run": str(root / "pretrain")}
            }
        }
    )
    served = resolve_models(args)["base"]
    assert served.model["pretrained"] == str(ckpt) and served.model["name"] == "micro-clip"
    assert served.index_dir == f"{root}/index_corpus/index"
    assert served.corpus["input"] == str(root / "images")
    assert served.corpus["input_format"] == "parquet"


def test_an_index_built_with_another_model_is_refused(job_outputs):
    root, ckpt = job_outputs
    other = JobManifest("finetune", load_config(None))
    other.extra["export"] = str(root / "finetune/model.pt")
    other.write(str(root / "finetune"), rows_in=1, rows_out=1, rows_error=0)
    args = {"index_corpus": str(root / "index_corpus"), "run": str(root / "finetune")}
    with pytest.raises(ServeConfigError) as e:
        resolve_models(parse_args({"models": {"aligned": args}}))
    message = str(e.value)
    assert "model 'aligned'" in message and f"model.pretrained={root}/finetune/model.pt" in message


def test_a_run_of_the_same_image_tower_serves_over_the_index_as_it_is(job_outputs):
    """A fine-tune that kept the image tower (finetune.lock_image): its model embeds the queries
    over the base's index; one that moved the image tower is refused, naming the index to build."""
    root, ckpt = job_outputs
    index_json = root / "index_corpus/index/_index.json"
    base = ModelConfig(name="micro-clip", pretrained=str(ckpt))
    manifest = {**json.loads(index_json.read_text()), "image_tower": image_tower_digest(base)}
    index_json.write_text(json.dumps(manifest))
    state = torch.load(ckpt, weights_only=True)
    state["text_projection"] = -state["text_projection"]
    export = root / "finetune/model.pt"
    export.parent.mkdir()
    torch.save(state, export)
    run = JobManifest("finetune", load_config(None, ["model.name=micro-clip"]))
    run.extra["export"] = str(export)
    run.write(str(root / "finetune"), rows_in=1, rows_out=1, rows_error=0)
    aligned = {"index_corpus": str(root / "index_corpus"), "run": str(root / "finetune")}
    args = {"models": {"aligned": aligned}}
    served = resolve_models(parse_args(args))["aligned"]
    assert served.model["pretrained"] == str(export)
    assert served.index_dir == f"{root}/index_corpus/index"
    state["visual.proj"] = -state["visual.proj"]
    torch.save(state, export)
    with pytest.raises(ServeConfigError, match="the two image towers differ") as e:
        resolve_models(parse_args(args))
    assert f"model.pretrained={export}" in str(e.value)
    # An index whose _index.json records no image tower: named, with the step that adds it.
    index_json.write_text(json.dumps({**manifest, "image_tower": None}))
    with pytest.raises(ServeConfigError, match=r"records no image tower.*steps=\[index\]"):
        resolve_models(parse_args(args))


def test_a_checkpoint_retrained_at_the_same_path_is_refused(job_outputs):
    root, ckpt = job_outputs
    args = {
        "models": {
            "base": {"index_corpus": str(root / "index_corpus"), "run": str(root / "pretrain")}
        }
    }
    resolve_models(parse_args(args))  # as indexed: fine
    state = torch.load(ckpt, weights_only=True)
    torch.save({k: v * 0.5 for k, v in state.items()}, ckpt)  # another run, same path
    os.utime(ckpt, ns=(1, 1))
    with pytest.raises(ServeConfigError, match="rewritten after the index"):
        resolve_models(parse_args(args))


def test_missing_outputs_and_checkpoints_are_named(job_outputs):
    root, ckpt = job_outputs
    with pytest.raises(ServeConfigError, match="no _manifest.json in /nowhere"):
        resolve_models(parse_args(_args()))
    wrong_job = {"index_corpus": str(root / "pretrain")}
    with pytest.raises(ServeConfigError, match="output of 'finetune', not of index_corpus"):
        resolve_models(parse_args({"models": {"m": wrong_job}}))
    ckpt.unlink()
    with pytest.raises(ServeConfigError, match="model 'm'.*model.pt"):
        resolve_models(parse_args({"models": {"m": {"index_corpus": str(root / "index_corpus")}}}))


def test_every_deployment_bounds_its_queue_and_requests_time_out():
    from serve.app import load_serve_config

    config = load_serve_config(str(Path(__file__).parents[2] / "configs" / "serve.yaml"))
    assert config["http_options"]["request_timeout_s"] > 0
    deployments = config["applications"][0]["deployments"]
    assert {d["name"] for d in deployments} == {
        "SearchIngress",
        "TextEncoder",
        "VectorIndex",
        "ImageStore",
        "QueryRewriter",
    }
    assert all(d.get("max_queued_requests", -1) > 0 for d in deployments)


def test_nan_scores_answer_null_and_host_names_parse():
    import json

    from fastapi.responses import JSONResponse

    from serve.ingress import _finite, host_name, page_csp

    assert json.loads(JSONResponse({"a": _finite(float("nan")), "b": _finite(0.123456)}).body) == {
        "a": None,
        "b": 0.12346,
    }
    with pytest.raises(ValueError):  # why _finite exists: a NaN would make the answer a 500
        JSONResponse({"a": float("nan")})
    assert host_name("127.0.0.1:8000") == "127.0.0.1"
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost") == "localhost"
    csp = page_csp("<script>let a = 1;</script>", "https://cdn.example.com/{image_id}")
    assert "'sha256-" in csp and "https://cdn.example.com" in csp and "'unsafe-eval'" not in csp


def _rewriter(url: str, **http):
    from serve.deployments import QueryRewriter

    cls = QueryRewriter.func_or_class
    return cls(
        {
            "method": {
                "backend": "http",
                "variant": "k_list",
                "http": {"url": url, "max_retries": 2, **http},
            },
            "retry_wait_s": 0.01,
        }
    )


def _ok(content) -> tuple[int, str, bytes]:
    import json

    return (
        200,
        "application/json",
        json.dumps({"choices": [{"message": {"content": content}}]}).encode(),
    )


@pytest.mark.parametrize(
    "answer",
    [
        (200, "application/json", b"[1, 2]"),
        _ok(["not", "a string"]),
        (200, "text/html", b"<html><body>502 Bad Gateway</body></html>"),
        (200, "application/json", b'{"choices": "none"}'),
    ],
    ids=["a-list", "non-string-content", "html", "malformed-choices"],
)
def test_unusable_endpoint_answers_fall_back_to_the_query(answer):
    import asyncio

    endpoint = ScriptedEndpoint([answer])
    try:
        result = asyncio.run(_rewriter(endpoint.url).rewrite("a red star"))
    finally:
        endpoint.close()
    assert result["rewritten"] == "a red star" and result["fallback"]
    assert len(endpoint.calls) == 1


def test_retries_back_off_skip_refusals_and_never_name_the_host():
    import asyncio

    refused = ScriptedEndpoint([(401, "application/json", b'{"error": "bad key"}')])
    flaky = ScriptedEndpoint(
        [(503, "text/plain", b"busy"), (503, "text/plain", b"busy"), _ok("a lovely red star")]
    )
    try:
        first = asyncio.run(_rewriter(refused.url).rewrite("a red star"))
        second = asyncio.run(_rewriter(flaky.url).rewrite("a red star"))
    finally:
        refused.close()
        flaky.close()
    assert len(refused.calls) == 1 and first["fallback"] == "llm error: HTTP 401"
    assert len(flaky.calls) == 3 and second == {"rewritten": "a lovely red star", "fallback": None}
    port = refused.url.split(":")[2].split("/")[0]
    closed = asyncio.run(_rewriter(f"http://127.0.0.1:{port}/v1").rewrite("a red star"))
    assert closed["rewritten"] == "a red star" and port not in closed["fallback"]
    assert "127.0.0.1" not in closed["fallback"]


def test_api_keys_go_only_where_the_config_says(monkeypatch):
    from actors.llm import api_key_headers
    from align.config import ConfigError, HttpRewriteConfig

    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    assert api_key_headers(HttpRewriteConfig(url="https://llm.example.com/v1"), "k") == {}
    named = HttpRewriteConfig(url="https://llm.example.com/v1", api_key_env="MY_KEY")
    assert api_key_headers(named, "k") == {"Authorization": "Bearer sk-mine"}
    local = HttpRewriteConfig(url="http://127.0.0.1:8000/v1", api_key_env="MY_KEY")
    assert api_key_headers(local, "k") == {"Authorization": "Bearer sk-mine"}
    plain = HttpRewriteConfig(url="http://llm.internal:8000/v1", api_key_env="MY_KEY")
    with pytest.raises(ConfigError, match="k.url is plain http to llm.internal"):
        api_key_headers(plain, "k")
    allowed = plain.model_copy(update={"allow_key_over_http": True})
    assert api_key_headers(allowed, "k") == {"Authorization": "Bearer sk-mine"}


@pytest.mark.parametrize(
    "method, message",
    [
        ({"backend": "keywords", "variant": "detail"}, "variant 'detail' needs an LLM"),
        ({"backend": "http", "variant": "original"}, "needs no LLM"),
    ],
)
def test_rewriters_that_cannot_work_are_refused_naming_the_key(method, message):
    with pytest.raises(ServeConfigError, match=f"rewriter.method.*{message}"):
        parse_args(_args(rewriter={"method": method}))


SERVE_CONFIGS = [
    p for p in sorted((REPO / "configs").glob("*.yaml")) if "\napplications:" in p.read_text()
]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=[p.name for p in SERVE_CONFIGS])
def test_every_serve_yaml_in_configs_validates(path):
    """Serve configs (`applications:`) against Serve's own schema, and each application's args
    against the search app's."""
    from serve.app import load_serve_config

    text = path.read_text()
    assert text.startswith("#") and "serve run configs/" in text.split("\n\n")[0]
    for app in load_serve_config(path)["applications"]:
        assert app["import_path"] == "serve.app:build_app"
        parse_args(app["args"])


def test_knn_requests_read_as_clip_back_reads_them():
    from serve.clip_back import knn_answer, parse_knn_request, parse_metadata_request
    from serve.search import BadRequest

    models, dims = ("base", "aligned"), {"base": 4, "aligned": 4}
    req = parse_knn_request(
        {"text": "a red star", "image": None, "indice_name": "aligned+rerank", "num_images": 5,
         "aesthetic_score": "", "aesthetic_weight": "", "use_safety_model": True},
        models, dims, max_k=100, max_query_chars=50,
    )  # fmt: skip
    assert (req.model, req.rerank, req.text, req.num_result_ids) == (
        "aligned",
        True,
        "a red star",
        5,
    )
    assert req.aesthetic_score is None and not req.deduplicate
    req = parse_knn_request(
        {"embedding_input": [1, 0, 0, 0], "indice_name": "base", "aesthetic_score": 9,
         "aesthetic_weight": "0.25", "num_images": 2, "num_result_ids": 7},
        models, dims, max_k=100, max_query_chars=50,
    )  # fmt: skip
    assert (req.embedding, req.aesthetic_score, req.aesthetic_weight) == ([1.0, 0, 0, 0], 9, 0.25)
    for bad in ({"indice_name": "base"}, {"indice_name": "base", "text": "x", "num_images": 0},
                {"indice_name": "base", "image": "not base64!"},
                {"indice_name": "base", "text": "x", "image_url": "http://169.254.169.254/"},
                {"indice_name": "base", "text": "x", "surprise": 1}):  # fmt: skip
        with pytest.raises(BadRequest):
            parse_knn_request(bad, models, dims, max_k=100, max_query_chars=50)
    answer = knn_answer([4, 9, 2], [0.9, 0.8, 0.7], [{"url": "u4"}, {"url": "u9"}], num_images=2)
    assert answer == [{"url": "u4", "id": 4, "similarity": 0.9},
                      {"url": "u9", "id": 9, "similarity": 0.8}, {"id": 2, "similarity": 0.7}]  # fmt: skip
    assert parse_metadata_request({"ids": [1, 2], "indice_name": "base"}, models, 10) == (
        "base",
        [1, 2],
    )
    with pytest.raises(BadRequest):
        parse_metadata_request({"ids": ["1"], "indice_name": "base"}, models, 10)


def test_the_grafana_dashboard_plots_every_metric_and_only_those():
    """dashboards/aesthetic_align.json: each query names metrics the app or the jobs export (as
    Ray names them: `ray_` first, `_total` on counters, `_bucket` on histograms), and every one
    of them is on a panel; docs/serving.md documents each."""
    import re

    from align.runtime.progress import METRICS as JOB_METRICS
    from align.runtime.progress import PREFIX as JOB_PREFIX
    from serve.metrics import METRICS, PREFIX

    suffix = {"counter": "_total", "gauge": "", "histogram": "_bucket"}
    exported = {f"ray_{PREFIX}{n}{suffix[kind]}" for n, (kind, *_) in METRICS.items()}
    exported |= {f"ray_{JOB_PREFIX}{n}{suffix[kind]}" for n, (kind, _) in JOB_METRICS.items()}
    dashboard = json.loads((REPO / "dashboards/aesthetic_align.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    plotted = {name for q in queries for name in re.findall(r"ray_aesthetic_align_\w+", q)}
    assert plotted == exported
    docs = (REPO / "docs/serving.md").read_text()
    names = sorted(name.removesuffix("_bucket") for name in exported)
    assert [name for name in names if f"`{name}`" not in docs] == []
