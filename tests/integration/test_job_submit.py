"""`ray job submit` end to end: a local Ray cluster (`ray start --head` on loopback), the demo
submitted with the repository as its working dir (small settings), its outputs checked, the
cluster stopped. The job's driver joins the cluster through RAY_ADDRESS, as on a real cluster."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from align.config import load_config
from tests.helpers import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
RAY = str(Path(sys.executable).with_name("ray"))
SMALL_DEMO = [
    "world.num_images=300",
    "world.shard_size=150",
    "world.heldout_images=60",
    "world.pretrain_images=300",
    "world.eval_images=150",
    "world.hpir_items_per_query=2",
    "train_scorer.epochs=2",
    "index_corpus.files_per_unit=2",  # one unit: each unit starts its own actor pools
    "index_corpus.index.recall_queries=20",
    "build_preferences.top_k=32",
    "build_preferences.grid.v=4",  # 4 x 4 with stride 2 reads 31 of the 32 candidates
    "pretrain.max_steps=6",
    "pretrain.checkpoint_every=6",
    "pretrain.captions_per_batch=32",
    "finetune.max_steps=6",
    "finetune.checkpoint_every=6",
    "finetune.pairs_per_batch=16",
    "finetune.captions_per_batch=16",
]


@pytest.fixture
def cluster():
    """`ray start --head --block` on loopback with its own temp dir; stopped (with everything it
    started) when the test ends."""
    temp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray's socket paths
    dashboard = free_port()
    # The venv first on PATH, as cluster.yaml sets it up: the job's `python` is the project's.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": path}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", f"--port={free_port()}",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", "--include-dashboard=true", "--num-cpus=2",
            "--disable-usage-stats", f"--temp-dir={temp}",
            # Ports of their own: another Ray on this machine (the test session's) holds the
            # defaults, and a job agent that cannot bind leaves the job server without one.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the job server did not come up"
            time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops what it started on SIGTERM
    try:
        head.wait(timeout=3)
    except subprocess.TimeoutExpired:  # its graceful stop takes 10-30 s here: nothing is kept
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    shutil.rmtree(temp, ignore_errors=True)


def test_demo_submitted_with_ray_job_submit(cluster, tmp_path):
    address, env = cluster
    out = tmp_path / "demo"
    for _ in range(30):  # the node's job agent registers a few seconds after the job server
        submit = subprocess.run(
            [
                RAY, "job", "submit", "--address", address, "--working-dir", ".",
                "--submission-id", "demo-small", "--",
                "python", "-m", "pipelines.demo", "--config", "configs/demo.yaml",
                f"output_dir={out}", *SMALL_DEMO,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
        )  # fmt: skip
        logs = submit.stdout + submit.stderr
        if "No available agent to submit job" not in logs:
            break
        time.sleep(2)
    assert submit.returncode == 0, logs[-4000:]
    status = subprocess.run(
        [RAY, "job", "status", "--address", address, "demo-small"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "Job 'demo-small' succeeded" in status.stdout + status.stderr
    assert "joining the Ray cluster at" in logs  # the driver used the cluster, not its own Ray
    metrics = json.loads((out / "evaluate/metrics.json").read_text())
    assert set(metrics["systems"]) == set(load_config(REPO / "configs/demo.yaml").evaluate.systems)
    assert metrics["order"] == ["gallery/unseen", "gallery/heldout", "seen/heldout"]
    jobs = ("world", "index_corpus", "build_preferences", "finetune", "index_corpus_eval")
    for job in jobs:
        manifest = json.loads((out / job / "_manifest.json").read_text())
        counts = manifest["counts"]
        assert counts["rows_in"] == counts["rows_out"] + counts["rows_error"]
    assert (out / "finetune/model.pt").is_file()
    # The fine-tune locked the image tower: the aligned model searches the base's index.
    assert "the aligned model searches the base's index" in logs
    assert not (out / "index_corpus_aligned").exists()
    assert (out / "evaluate/report.html").is_file()
