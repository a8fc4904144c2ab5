"""Remote storage: the jobs run with every input and output on S3, against a real S3-compatible
server on loopback (moto's server mode), as a user runs them: command-line jobs, each with its own
embedded Ray, the model checkpoint itself read from the bucket."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

from align.config import ModelConfig
from align.models.clip import build_clip
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
BUCKET = "align-test"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on loopback, its bucket, and the environment that points clients at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",  # read by pyarrow's S3 filesystem
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def _job(job: str, overrides: list[str], env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"pipelines.{job}", "--config", "configs/demo.yaml", *overrides],
        cwd=REPO,
        env={
            **os.environ,
            **env,
            "RAY_AUTH_MODE": "disabled",
            "AESTHETIC_ALIGN_CACHE": str(tmp_path / "cache"),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )


def _objects(prefix: str) -> list[str]:
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/{prefix}")
    selector = pafs.FileSelector(path, recursive=True)
    return sorted(i.path.removeprefix(f"{BUCKET}/") for i in fs.get_file_info(selector))


def test_jobs_read_and_write_s3(s3, tmp_path):
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/models/micro.pt")
    with fs.open_output_stream(path) as f:
        torch.save(build_clip(ModelConfig(name="micro-clip")).model.state_dict(), f)
    run = f"s3://{BUCKET}/run"
    overrides = [
        f"output_dir={run}",
        "ray.num_cpus=2",
        "world.num_images=200",
        "world.shard_size=100",
        "world.heldout_images=20",
        "world.pretrain_images=0",
        "model.name=micro-clip",
        f"model.pretrained=s3://{BUCKET}/models/micro.pt",
        "index_corpus.index.recall_queries=20",
        "build_preferences.top_k=32",
        "build_preferences.grid.v=4",  # 4 x 4 with stride 2 reads 31 of the 32 candidates
    ]
    for job in ("make_world", "index_corpus", "build_preferences"):
        done = _job(job, overrides, s3, tmp_path)
        assert done.returncode == 0, f"{job}:\n{done.stderr[-3000:]}"
    keys = _objects("run")
    for expected in (
        "run/world/_manifest.json",
        "run/world/images/shard-00000.parquet",
        "run/index_corpus/_manifest.json",
        "run/index_corpus/index/_index.json",
        "run/index_corpus/index/id_map.parquet",
        "run/build_preferences/_manifest.json",
    ):
        assert expected in keys, keys
    assert any(k.startswith("run/index_corpus/scored/part-") for k in keys)
    assert any(k.startswith("run/build_preferences/pairs/") for k in keys)
    manifest = json.loads(fs.open_input_stream(f"{BUCKET}/run/index_corpus/_manifest.json").read())
    assert manifest["counts"] == {"rows_in": 200, "rows_out": 200, "rows_error": 0}
    assert manifest["config"]["model"]["pretrained"] == f"s3://{BUCKET}/models/micro.pt"
    prefs = json.loads(
        fs.open_input_stream(f"{BUCKET}/run/build_preferences/_manifest.json").read()
    )
    assert prefs["pairs"] > 0

    # A re-run resumes from the bucket: every unit is skipped, nothing is written twice.
    again = _job("index_corpus", overrides, s3, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already done, skipped" in again.stderr + again.stdout
    scored = [k for k in keys if "index_corpus/scored/" in k]
    assert scored and _objects("run/index_corpus/scored") == scored


def test_a_missing_object_is_named(s3, tmp_path):
    missing = f"s3://{BUCKET}/nowhere/images"
    done = _job(
        "index_corpus", [f"index_corpus.input={missing}", "model.name=micro-clip"], s3, tmp_path
    )
    assert done.returncode == 2
    assert missing in done.stderr


def _scored_to_s3(prefix: str, vectors: np.ndarray) -> str:
    from actors.score import scored_to_arrow
    from align.data.contracts import SCORED, SCORER_COLUMN_PREFIX, conform
    from align.storage import io

    n = len(vectors)
    batch = {
        "image_id": np.array([f"img{i:02d}" for i in range(n)], dtype=object),
        "embedding": vectors.astype(np.float16),
        "status": np.full(n, "ok", dtype=object),
        "error": np.full(n, "", dtype=object),
    }
    table = scored_to_arrow(batch).append_column("aesthetic", pa.array(np.zeros(n, np.float32)))
    path = f"s3://{BUCKET}/{prefix}/scored/part-00000.parquet"
    io.write_parquet(conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX), path)
    return path


def test_an_index_rebuilt_at_the_same_path_is_searched_anew(s3, tmp_path, monkeypatch):
    """Shard files keep their names and sizes when an index is rebuilt in place: a node that
    cached the old build must not search its vectors with the new manifest."""
    from align.config import IndexConfig
    from align.search.build import write_index
    from align.search.corpus import Corpus

    monkeypatch.setenv("AESTHETIC_ALIGN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    index = f"s3://{BUCKET}/rebuilt/index"
    cfg = IndexConfig(type="flat", recall_queries=5)
    model = ModelConfig(name="tiny-clip")
    sizes = []
    for _ in range(2):  # two builds, other vectors, the same ids and the same file sizes
        x = rng.normal(size=(20, 8)).astype(np.float32)
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
        write_index([_scored_to_s3("rebuilt", x)], index, cfg, model, remote=False)
        listing = pafs.FileSystem.from_uri(index)[0].get_file_info(
            pafs.FileSelector(f"{BUCKET}/rebuilt/index")
        )
        sizes.append({i.base_name: i.size for i in listing if i.base_name.startswith("shard")})
        corpus = Corpus(index)
        found = corpus.candidates(x[3:4].astype(np.float32), 1)
        assert found.ids[0][0] == "img03" and found.scores[0][0] == pytest.approx(1.0, abs=1e-3)
        np.testing.assert_array_equal(corpus.vectors(np.arange(20)), x)
    assert len(sizes[0]) == 3 and sizes[0] == sizes[1]


def test_a_remote_checkpoint_rewritten_in_place_is_another_model(s3, tmp_path, monkeypatch):
    import time

    from align.models.clip import weights_fingerprint
    from align.storage import io

    monkeypatch.setenv("AESTHETIC_ALIGN_CACHE", str(tmp_path / "cache"))
    uri = f"s3://{BUCKET}/retrained/model.pt"
    io.write_bytes(uri, b"a" * 1000)
    model = ModelConfig(name="micro-clip", pretrained=uri)
    first = weights_fingerprint(model)
    assert first["checkpoint"]["bytes"] == 1000
    assert Path(io.local_copy(uri)).read_bytes() == b"a" * 1000
    time.sleep(1.1)  # S3's Last-Modified has whole seconds
    io.write_bytes(uri, b"b" * 1000)  # retrained: same path, same size
    assert weights_fingerprint(model) != first
    assert Path(io.local_copy(uri)).read_bytes() == b"b" * 1000
    assert len(list((tmp_path / "cache" / "files").rglob("*model.pt"))) == 1  # the old one gone
