"""Losing a node, on a Ray cluster of several nodes on this machine (benchmarks/chaos.py at small
sizes, in processes of their own: their clusters run beside the test session's Ray).

index_corpus, finetune and serve share one cluster (a head and three worker nodes) and one small
world; autoscale then starts Ray's fake multi-node autoscaler on the same world's index. Both runs
start with the session, in the background (tests/conftest.py starts them once collection has
selected these tests, and moves these tests last): most of their seven minutes is waiting on
processes starting, which the rest of the suite fills.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
SMALL = ["--images", "200", "--finetune-steps", "8", "--serve-seconds", "8", "--clients", "3"]
RUNS = {"cluster": ("index_corpus,finetune,serve", 1500), "autoscale": ("autoscale", 900)}


class BackgroundChaos:
    """The two chaos runs, one after the other, in a thread; `result(run)` waits for a run and
    returns {scenario: its JSON line}, or fails with the tail of its stderr."""

    def __init__(self):
        self.done = {name: threading.Event() for name in RUNS}
        self.results: dict[str, dict | str] = {}
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.workdir: str | None = None

    def start(self) -> None:
        if self.thread is None:
            self.workdir = tempfile.mkdtemp(prefix="chaos-")
            self.thread = threading.Thread(target=self._run_all, daemon=True)
            self.thread.start()

    def _run_all(self) -> None:
        for name, (scenarios, timeout_s) in RUNS.items():
            try:
                self.results[name] = self._run(scenarios, timeout_s)
            except Exception as e:  # reported by the test that reads it
                self.results[name] = f"{type(e).__name__}: {e}"
            self.done[name].set()

    def _run(self, scenarios: str, timeout_s: int) -> dict | str:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        command = [sys.executable, "-m", "benchmarks.chaos", "--scenario", scenarios]
        self.proc = subprocess.Popen(
            [*command, "--workdir", self.workdir, *SMALL],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its raylets with it, when stopped
        )
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            out, err = self.proc.communicate()
        if self.proc.returncode != 0:
            return f"exit {self.proc.returncode}: {err[-4000:]}"
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return {line["scenario"]: line for line in lines}

    def result(self, run: str) -> dict:
        self.start()  # when these tests were selected without the conftest hook
        self.done[run].wait()
        found = self.results[run]
        assert isinstance(found, dict), found
        return found

    def stop(self) -> None:
        """Stop a run still going (an interrupted session) and everything it started."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.workdir is not None and all(e.is_set() for e in self.done.values()):
            shutil.rmtree(self.workdir, ignore_errors=True)


BACKGROUND = BackgroundChaos()


@pytest.fixture(scope="module")
def chaos():
    return BACKGROUND.result("cluster")


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


def test_serve_autoscales_past_the_head_and_back():
    """Load beyond the head's CPU: the autoscaler adds a node, replicas start and answer there;
    after the load, replicas and nodes go back to where they were."""
    found = BACKGROUND.result("autoscale")["autoscale"]
    assert found["nodes_before"] == 1 == found["nodes_after"]
    assert found["nodes_peak"] > 1 and found["nodes_with_replicas_added"] >= 1
    assert found["requests"] > 0 and found["failed_requests"] == 0
