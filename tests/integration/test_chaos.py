"""Losing a node, on a Ray cluster of several nodes on this machine (benchmarks/chaos.py at small
sizes, in a process of its own: its clusters run beside the test session's Ray).

index_corpus, finetune and serve share one cluster (a head and three worker nodes) and one small
world; autoscale then starts Ray's fake multi-node autoscaler on the same world's index. The
cluster checks its nodes every second (Ray's default: every 3 s), so a removed node is found dead
in about 3 s rather than 15: the same detection, sooner.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
SMALL = [
    *("--images", "200", "--units", "2", "--node-check-s", "1"),
    *("--finetune-steps", "8", "--serve-seconds", "8", "--clients", "3"),
]


def run_chaos(workdir: Path, scenarios: str, timeout_s: int) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    command = [sys.executable, "-m", "benchmarks.chaos", "--scenario", scenarios]
    proc = subprocess.run(
        [*command, "--workdir", str(workdir), *SMALL],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line["scenario"]: line for line in lines}


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("chaos")
    return run_chaos(workdir, "index_corpus,finetune,serve,autoscale", timeout_s=1500)


def test_index_corpus_loses_a_worker_node_and_no_row(chaos):
    """A node holding the pools' actors removed once the first unit is done: Ray Data restarts
    them on the other nodes; every input row is in scored/ once, and the counts close."""
    found = chaos["index_corpus"]
    assert found["nodes"] == 4 and found["killed_node"]
    assert found["rows_in"] == 200 == found["rows_out"] + found["rows_error"]
    assert found["rows_lost"] == 0 and found["rows_twice"] == 0
    assert found["counts_match"] and found["error_rows_match"]


def test_finetune_resumes_from_its_checkpoint_after_losing_a_worker_node(chaos):
    """The node of a Ray Train worker (DeepSpeed ZeRO-2, the demo's backend) removed after the
    first checkpoint (every 2 steps): the worker group restarts from a checkpoint, its metrics
    records come back with it, and it trains to the end."""
    found = chaos["finetune"]
    assert found["killed_node"]
    assert found["resumed_from_step"] is not None and found["resumed_from_step"] >= 2
    assert found["resumed_from_step"] % 2 == 0 and found["steps"] == 8
    assert found["steps_recorded_once"]


def test_serve_loses_a_worker_node_and_no_request_after_one_retry(chaos):
    """The node of an index replica removed under load: a request that failed succeeds when sent
    again, and Serve starts the lost replicas on the nodes left."""
    found = chaos["serve"]
    assert found["killed_node"] and found["replicas_lost"] >= 1 and found["requests"] > 0
    assert found["failed_requests"] == 0
    assert found["replicas_replaced_s"] is not None


def test_serve_autoscales_past_the_head_and_back(chaos):
    """Load beyond the head's CPU: the autoscaler adds a node, replicas start and answer there;
    after the load, replicas and nodes go back to where they were."""
    found = chaos["autoscale"]
    assert found["nodes_before"] == 1 == found["nodes_after"]
    assert found["nodes_peak"] > 1 and found["nodes_with_replicas_added"] >= 1
    assert found["requests"] > 0 and found["failed_requests"] == 0
