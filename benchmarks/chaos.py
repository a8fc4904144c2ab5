"""Losing a node: the jobs and the search app on a Ray cluster of several nodes on this machine.

    python -m benchmarks.chaos --scenario index_corpus --workdir DIR [--images 2000]
    python -m benchmarks.chaos --scenario index_corpus,finetune,serve --workdir DIR
    python -m benchmarks.chaos --scenario autoscale --workdir DIR

Each node is a raylet of its own (ray.cluster_utils.Cluster, as Ray tests itself): a head that
runs the drivers and no tasks (0 CPUs, as cluster.yaml's head), and worker nodes. A worker node
is removed without grace (its raylet and every worker process killed: a lost spot instance)
while the scenario runs; a fresh one joins before the next scenario, as an autoscaler would
replace it.

- index_corpus: the corpus spread over the worker nodes' tasks and actor pools; the node holding
  some of the pools' actors removed once the first unit of input is done. Every input row must
  be in scored/ exactly once, with the manifest's counts.
- finetune: two Ray Train workers on two nodes (SPREAD); the node of one removed after the first
  checkpoint. Ray Train restarts the worker group (finetune.max_failures) from the last
  checkpoint, on the nodes that remain; the manifest records the step it resumed from.
- serve: two replicas of every deployment, clients searching; the node holding an index replica
  removed. A request that fails is sent once more (after 0.5 s); `failed_requests` counts those
  that failed again. Serve replaces the replicas.
- autoscale: Ray's fake multi-node autoscaler (worker nodes of 2 CPUs, none at first); a search
  load that asks for more replicas than the head holds makes it add nodes, replicas start and
  answer there, and once the load stops the replicas and then the nodes go.

index_corpus, finetune and serve run on one cluster, in that order, sharing the world and the
index. Prints one JSON line per scenario: scenario, nodes, killed_node, rows_in, rows_out,
rows_error, resumed_from_step, failed_requests, seconds (and nodes_before, nodes_peak,
nodes_after for autoscale), with what each checked. tests/integration/test_chaos.py runs every
scenario at small sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SCENARIOS = ("index_corpus", "finetune", "serve", "autoscale")
WORKER_CPUS = 2


@dataclass
class Sizes:
    images: int = 2000
    finetune_steps: int = 12
    finetune_backend: str = "deepspeed"
    serve_seconds: float = 20.0
    clients: int = 4
    units: int = 4  # input shards, one index_corpus unit each
    # Seconds between the GCS's health checks of a node (3 failed checks: the node is dead);
    # None keeps Ray's defaults, as a user's cluster has them.
    node_check_s: float | None = None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The cluster


class LocalCluster:
    """A head (0 CPUs: drivers, Serve's controller and proxy) and worker nodes on this machine,
    on ports of their own so that it runs beside another Ray (a test session's)."""

    def __init__(self, workers: int, node_check_s: float | None, object_store_mb: int = 300):
        from ray._common.utils import get_ray_address_file
        from ray.cluster_utils import Cluster

        os.environ["RAY_AUTH_MODE"] = "disabled"
        # Cluster records its head as "the local cluster" (what a bare ray.init() joins): the
        # record of whatever was there before is put back once the head is up, so no other
        # process on the machine joins this cluster by accident.
        self.address_file = Path(get_ray_address_file(None))
        self.address_before = self.address_file.read_text() if self.address_file.exists() else None
        self.object_store = object_store_mb << 20
        head = {
            "num_cpus": 0,
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": self.object_store,
        }
        if node_check_s is not None:
            head["_system_config"] = health_checks(node_check_s)
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self._restore_address_file()  # connect() names this cluster's address itself
        self.workers = [self.add_worker() for _ in range(workers)]

    def _restore_address_file(self) -> None:
        if self.address_before is None:
            self.address_file.unlink(missing_ok=True)
        else:
            self.address_file.write_text(self.address_before)

    def add_worker(self):
        return self.cluster.add_node(num_cpus=WORKER_CPUS, object_store_memory=self.object_store)

    def connect(self) -> None:
        import ray

        ray.init(address=self.cluster.address, log_to_driver=False)

    def remove(self, node_id: str) -> None:
        """Kill a worker node's raylet and every process on it, without grace."""
        node = next(n for n in self.workers if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        for node in list(self.workers):
            self.cluster.remove_node(node, allow_graceful=False)
        self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)


def health_checks(period_s: float) -> dict:
    """Ray's settings for a node found dead after 3 failed health checks `period_s` apart."""
    return {"health_check_period_ms": int(period_s * 1000), "health_check_failure_threshold": 3}


def alive_nodes() -> int:
    import ray

    return sum(n["Alive"] for n in ray.nodes())


def alive_actors(class_part: str) -> dict[str, str]:
    """{actor id: node id} of the alive actors whose class name contains `class_part` (from the
    GCS's actor table: Ray's state API needs the dashboard, which this cluster does not start)."""
    import ray

    return {
        actor_id: a["Address"]["NodeID"]
        for actor_id, a in ray._private.state.actors().items()
        if a["State"] == "ALIVE" and class_part in a["ActorClassName"]
    }


def actor_nodes(class_part: str) -> set[str]:
    return set(alive_actors(class_part).values())


class NodeKiller(threading.Thread):
    """Removes the first worker node `victim()` names (None: not yet), polling every 0.2 s
    until it has or `stop()` is called."""

    def __init__(self, cluster: LocalCluster, victim):
        super().__init__(daemon=True)
        self.cluster, self.victim = cluster, victim
        self.stopped = threading.Event()
        self.killed_at: float | None = None
        self.t0 = time.perf_counter()

    def run(self) -> None:
        workers = {n.node_id for n in self.cluster.workers}
        while not self.stopped.wait(0.2):
            node_id = self.victim()
            if node_id in workers:
                self.cluster.remove(node_id)
                self.killed_at = round(time.perf_counter() - self.t0, 2)
                return

    def stop(self) -> bool:
        """Stop watching; whether a node was removed (before the scenario ended)."""
        self.stopped.set()
        self.join()
        return self.killed_at is not None


def replace_lost_node(cluster: LocalCluster, workers: int) -> None:
    while len(cluster.workers) < workers:
        cluster.workers.append(cluster.add_worker())


def run_losing_a_node(cluster: LocalCluster, job, config, once: str, actors: str):
    """Run `job(config)` while a NodeKiller removes the first worker node holding an alive actor
    whose class name contains `actors`, once the file `once` exists; returns (the job's
    manifest, the killer, the nodes alive before, the start time)."""
    from align.storage import io

    def victim():
        if not io.exists(once):
            return None
        return next(iter(sorted(actor_nodes(actors))), None)

    nodes, t0 = alive_nodes(), time.perf_counter()
    killer = NodeKiller(cluster, victim)
    killer.start()
    manifest = job(config)
    killer.stop()
    return manifest, killer, nodes, t0


# ---------------------------------------------------------------------------------------------
# The world the jobs run on


def world_overrides(workdir: Path, sizes: Sizes) -> list[str]:
    """configs/demo.yaml at the chaos run's size: a fixed micro-clip checkpoint (every process
    must load the same weights), one shard of input per unit in two blocks, two actors per pool
    (so that both worker nodes hold some; a pool has no more actors than blocks), two Ray Train
    workers spread over two nodes."""
    import torch

    from align.config import ModelConfig
    from align.models.clip import build_clip

    ckpt = workdir / "micro.pt"
    if not ckpt.exists():
        torch.save(build_clip(ModelConfig(name="micro-clip")).model.state_dict(), ckpt)
    n = sizes.images
    return [
        f"output_dir={workdir}",
        f"world.num_images={n}",
        f"world.shard_size={-(-n // sizes.units)}",
        f"world.pretrain_images={n}",
        "world.heldout_images=60",
        "model.name=micro-clip",
        f"model.pretrained={ckpt}",
        "index_corpus.files_per_unit=1",
        f"index_corpus.block_images={max(1, -(-n // sizes.units) // 2)}",  # two blocks a unit
        "index_corpus.embed.concurrency=2",
        "index_corpus.score.concurrency=2",
        "index_corpus.index.recall_queries=20",
        "build_preferences.top_k=32",
        "build_preferences.grid.u=2",
        "build_preferences.grid.v=2",
        "finetune.scaling.num_workers=2",
        "finetune.scaling.cpus_per_worker=1",
        "finetune.scaling.threads=1",
        "finetune.scaling.placement_strategy=SPREAD",
        f"finetune.backend={sizes.finetune_backend}",
        f"finetune.max_steps={sizes.finetune_steps}",
        f"finetune.checkpoint_every={max(sizes.finetune_steps // 4, 1)}",
        "finetune.pairs_per_batch=16",
        "finetune.captions_per_batch=16",
    ]


def load(workdir: Path, sizes: Sizes, *extra: str):
    from align.config import load_config

    return load_config(REPO / "configs/demo.yaml", [*world_overrides(workdir, sizes), *extra])


def result(scenario: str, nodes: int, killed: bool, t0: float, **fields) -> dict:
    base = dict.fromkeys(
        ("rows_in", "rows_out", "rows_error", "resumed_from_step", "failed_requests")
    )
    return {
        "scenario": scenario,
        "nodes": nodes,
        "killed_node": killed,
        **base,
        **fields,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ---------------------------------------------------------------------------------------------
# Scenarios


def index_corpus_scenario(cluster: LocalCluster, workdir: Path, sizes: Sizes) -> dict:
    """index_corpus with a worker node lost mid-run: every input row in scored/ exactly once."""
    import pyarrow.compute as pc

    from align.runtime.resume import DONE_MARKER
    from align.storage import io
    from pipelines.index_corpus import index_corpus
    from pipelines.make_world import make_world

    config = load(workdir, sizes)
    out = config.job_output("index_corpus")
    if not io.exists(f"{config.job_output('world')}/_manifest.json"):
        make_world(config)
    io.empty_dir(out)  # a fresh run: one that finds its units done loses no node
    # Once a unit is done: a node holding actors of the next unit's pools.
    first_unit = f"{out}/_staging/unit-00000/{DONE_MARKER}"
    manifest, killer, nodes, t0 = run_losing_a_node(
        cluster, index_corpus, config, once=first_unit, actors="MapWorker"
    )
    inputs = io.read_parquet(config.expand(config.index_corpus.input), columns=["image_id"])
    scored = io.read_parquet(f"{out}/scored", columns=["image_id", "status"])
    errors = io.read_parquet(f"{out}/errors", columns=["row_id"])
    ids = scored["image_id"].to_pylist()
    counts = manifest["counts"]
    return result(
        "index_corpus",
        nodes,
        killer.killed_at is not None,
        t0,
        **counts,
        killed_at_s=killer.killed_at,
        rows_lost=len(set(inputs["image_id"].to_pylist()) - set(ids)),
        rows_twice=len(ids) - len(set(ids)),
        error_rows_match=errors.num_rows
        == int(pc.sum(pc.equal(scored["status"], "error")).as_py() or 0),
        counts_match=counts["rows_in"] == inputs.num_rows == scored.num_rows,
    )


def finetune_scenario(cluster: LocalCluster, workdir: Path, sizes: Sizes) -> dict:
    """finetune on two nodes, one lost after the first checkpoint: resumed from it."""
    from align.storage import io
    from align.train.steps import read_metrics_jsonl
    from pipelines.build_preferences import build_preferences
    from pipelines.finetune import finetune

    config = load(workdir, sizes)
    build_preferences(config)
    out = config.job_output("finetune")
    io.empty_dir(out)  # a fresh run, not one resumed from an earlier run's checkpoints

    # Once Ray Train has a checkpoint: a node holding a training worker. The snapshot is written
    # when the controller has registered one; a checkpoint folder whose report it had not taken
    # yet when the node went is not restored from.
    snapshot = f"{out}/ray/run/checkpoint_manager_snapshot.json"
    manifest, killer, nodes, t0 = run_losing_a_node(
        cluster, finetune, config, once=snapshot, actors="RayTrainWorker"
    )
    resumed = manifest["resumed_from"]
    recorded = [r["step"] for r in read_metrics_jsonl(io.read_bytes(f"{out}/metrics.jsonl"))]
    return result(
        "finetune",
        nodes,
        killer.killed_at is not None,
        t0,
        **manifest["counts"],
        resumed_from_step=resumed[-1] if resumed else None,
        steps=manifest["steps"],
        # The metrics of the steps before the checkpoint came back with it: one record a step.
        steps_recorded_once=recorded == list(range(1, manifest["steps"] + 1)),
        killed_at_s=killer.killed_at,
    )


def serve_config(index_dir: str, replicas: int | None, autoscale: dict | None) -> dict:
    """configs/serve.yaml for one model, `replicas` of every deployment (or `autoscale`d), the
    proxy on the head only (every node here shares one address: one port, one proxy)."""
    from serve.app import load_serve_config

    config = load_serve_config(REPO / "configs/serve.yaml")
    config["proxy_location"] = "HeadOnly"
    app = config["applications"][0]
    app["args"]["models"] = {"base": {"index_corpus": index_dir}}
    app["args"]["default_model"] = "base"
    for deployment in app["deployments"]:
        if replicas is not None:
            deployment.pop("autoscaling_config", None)
            deployment["num_replicas"] = replicas
        elif deployment["name"] in autoscale["deployments"]:
            deployment["autoscaling_config"] = autoscale["config"]
            deployment["ray_actor_options"] = {"num_cpus": autoscale["num_cpus"]}
    return config


class SearchLoad:
    """Client threads searching until stopped; a failed request is sent once more after 0.5 s,
    and counted in `failed` when that fails too."""

    QUERIES = ("a red star", "a blue circle on a striped background", "a green square")

    def __init__(self, url: str, clients: int):
        self.url, self.stopped = url, threading.Event()
        self.sent = self.retried = self.failed = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def _get(self, query: str) -> bool:
        import urllib.parse
        import urllib.request

        q = urllib.parse.urlencode({"q": query, "k": 10, "rerank": "true"})
        try:
            with urllib.request.urlopen(f"{self.url}/search?{q}", timeout=30) as r:
                return r.status == 200 and bool(json.loads(r.read())["results"])
        except OSError:  # HTTP errors (503 from a lost replica) and lost connections
            return False

    def _client(self, i: int) -> None:
        n = 0
        while not self.stopped.is_set():
            query = self.QUERIES[(i + n) % len(self.QUERIES)]
            n += 1
            ok = first = self._get(query)
            if not first:
                time.sleep(0.5)
                ok = self._get(query)
            with self.lock:
                self.sent += 1
                self.retried += not first
                self.failed += not ok

    def stop(self) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join()


def replicas_running(app: str, want: int) -> bool:
    """Whether every deployment of `app` has `want` replicas running."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or status.status != "RUNNING":
        return False
    return all(d.replica_states.get("RUNNING", 0) >= want for d in status.deployments.values())


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Poll `condition` until it holds; returns the seconds it took."""
    t0 = time.perf_counter()
    while not condition():
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.5)
    return round(time.perf_counter() - t0, 1)


def serve_scenario(cluster: LocalCluster, workdir: Path, sizes: Sizes) -> dict:
    """Two replicas of every deployment, clients searching, the node of an index replica lost:
    no request fails twice, and Serve brings the replicas back."""
    from ray import serve

    from serve.app import deploy

    config = load(workdir, sizes)
    url = deploy(
        serve_config(config.job_output("index_corpus"), replicas=2, autoscale=None),
        host="127.0.0.1",
        port=free_port(),
    )
    load_ = SearchLoad(url, sizes.clients)
    time.sleep(2.0)  # searches under way on every replica
    nodes, t0 = alive_nodes(), time.perf_counter()
    before = alive_actors("ServeReplica:search:")
    victim = sorted(actor_nodes("ServeReplica:search:VectorIndex"))[0]
    lost = {a for a, node in before.items() if node == victim}
    cluster.remove(victim)

    def replaced() -> bool:  # as many replicas as before, none of the lost ones, all running
        now = alive_actors("ServeReplica:search:")
        return len(now) >= len(before) and not lost & set(now) and replicas_running("search", 2)

    recovered = wait_until(replaced, 180, "replicas replaced")
    time.sleep(max(0.0, sizes.serve_seconds - (time.perf_counter() - t0)))
    load_.stop()
    serve.shutdown()
    return result(
        "serve",
        nodes,
        True,
        t0,
        failed_requests=load_.failed,
        requests=load_.sent,
        retried_requests=load_.retried,
        replicas_lost=len(lost),
        replicas_replaced_s=recovered,
    )


# ---------------------------------------------------------------------------------------------
# Autoscaling past one node


class AutoscalingHead:
    """A head with Ray's fake multi-node autoscaler: worker nodes of WORKER_CPUS CPUs, none at
    first, at most `max_workers`, removed after `idle_s` idle. Started with `ray start --head
    --block` as ray.cluster_utils.AutoscalingCluster does, less its `ray stop --force` (which
    stops every Ray on the machine), and stopped with everything it started."""

    def __init__(self, workdir: Path, max_workers: int, idle_s: float):
        import subprocess
        import tempfile

        import ray

        self.port = free_port()
        gcs = f"{ray._private.services.get_node_ip_address()}:{self.port}"
        config = workdir / "autoscaling.json"
        config.write_text(json.dumps(fake_cluster_config(gcs, max_workers, idle_s)))
        self.temp = temp = tempfile.mkdtemp(prefix="raychaos-", dir="/tmp")  # short socket paths
        ports = (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "metrics-export-port",
        )
        command = [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--num-cpus=1",
            f"--autoscaling-config={config}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *[f"--{p}={free_port()}" for p in ports],
        ]
        env = {
            **os.environ,
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_FAKE_CLUSTER": "1",
            "RAY_AUTH_MODE": "disabled",
        }
        env.pop("RAY_ADDRESS", None)
        self.process = subprocess.Popen(
            command,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.address = gcs

    def connect(self) -> None:
        import ray

        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=self.address, log_to_driver=False)
                return
            except (ConnectionError, RuntimeError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(1)

    def shutdown(self) -> None:
        import shutil
        import signal

        import psutil
        import ray

        ray.shutdown()
        started = psutil.Process(self.process.pid).children(recursive=True)
        os.killpg(self.process.pid, signal.SIGTERM)  # `ray start --block` stops its own
        try:
            self.process.wait(30)
        except Exception:
            os.killpg(self.process.pid, signal.SIGKILL)
        for p in started:  # nodes the autoscaler started, should any outlive their parent
            if p.is_running():
                p.kill()
        shutil.rmtree(self.temp, ignore_errors=True)


def fake_cluster_config(gcs: str, max_workers: int, idle_s: float) -> dict:
    """The fake multi-node provider's cluster config (Ray's fake_multi_node/example.yaml)."""
    worker = {
        "resources": {"CPU": WORKER_CPUS},
        "node_config": {},
        "min_workers": 0,
        "max_workers": max_workers,
    }
    return {
        "cluster_name": "chaos",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu_worker": worker,
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_s / 60,
        "docker": {},
        **{
            k: []
            for k in (
                "initialization_commands",
                "setup_commands",
                "head_setup_commands",
                "worker_setup_commands",
                "head_start_ray_commands",
                "worker_start_ray_commands",
                "cluster_synced_files",
                "rsync_exclude",
                "rsync_filter",
            )
        },
        "file_mounts": {},
        "file_mounts_sync_continuously": False,
    }


# TextEncoder and VectorIndex scale on load past what the head's 1 CPU holds: 4 replicas of
# each at 0.25 CPU need 2 CPUs more than the app's first replicas.
AUTOSCALE = {
    "deployments": ("TextEncoder", "VectorIndex"),
    "num_cpus": 0.25,
    "config": {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 1,
        "metrics_interval_s": 0.5,
        "look_back_period_s": 2,
        "upscale_delay_s": 1,
        "downscale_delay_s": 5,
    },
}


def prepare_index(workdir: Path, sizes: Sizes) -> str:
    """The world and its index, made here if an earlier scenario has not: on the connected Ray,
    or on a Ray of its own, stopped after ("local": never another cluster on this machine)."""
    import ray

    from align.storage import io
    from pipelines.index_corpus import index_corpus
    from pipelines.make_world import make_world

    config = load(workdir, sizes)
    out = config.job_output("index_corpus")
    if io.exists(f"{out}/_manifest.json"):
        return out
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        make_world(config)
        index_corpus(config)
    finally:
        if own_ray:
            ray.shutdown()
    return out


def autoscale_scenario(workdir: Path, sizes: Sizes) -> dict:
    """A search load beyond the head: the autoscaler adds nodes, replicas answer there, and
    after the load the cluster shrinks back."""
    from ray import serve

    from serve.app import deploy

    index_dir = prepare_index(workdir, sizes)
    head = AutoscalingHead(workdir, max_workers=3, idle_s=10)
    try:
        head.connect()
        t0 = time.perf_counter()
        url = deploy(serve_config(index_dir, None, AUTOSCALE), host="127.0.0.1", port=free_port())
        nodes_before = alive_nodes()
        load_ = SearchLoad(url, 4 * sizes.clients)
        peak, on_added = nodes_before, 0
        deadline = time.perf_counter() + max(sizes.serve_seconds, 120)
        while time.perf_counter() < deadline and (peak == nodes_before or not on_added):
            time.sleep(1)
            peak = max(peak, alive_nodes())
            on_added = len(actor_nodes("ServeReplica:search") - {head_node_id()})
        time.sleep(5)  # searches answered with replicas on the added nodes
        load_.stop()
        wait_until(
            lambda: replicas_running("search", 1) and alive_nodes() == nodes_before,
            180,
            "the cluster back to its size before the load",
        )
        nodes_after = alive_nodes()
        serve.shutdown()
    finally:
        head.shutdown()
    return result(
        "autoscale",
        nodes_before,
        False,
        t0,
        failed_requests=load_.failed,
        requests=load_.sent,
        nodes_before=nodes_before,
        nodes_peak=peak,
        nodes_after=nodes_after,
        nodes_with_replicas_added=on_added,
    )


def head_node_id() -> str:
    import ray

    return next(
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("node:__internal_head__")
    )


# ---------------------------------------------------------------------------------------------

ON_ONE_CLUSTER = {
    "index_corpus": index_corpus_scenario,
    "finetune": finetune_scenario,
    "serve": serve_scenario,
}


def run_on_one_cluster(names: list[str], workdir: Path, sizes: Sizes, workers: int = 3) -> None:
    """The scenarios on one cluster of `workers` worker nodes, in the order ON_ONE_CLUSTER lists
    them; a lost node is replaced before the next."""
    cluster = LocalCluster(workers, sizes.node_check_s)
    try:
        cluster.connect()
        for name in [n for n in ON_ONE_CLUSTER if n in names]:
            if name != "index_corpus":
                prepare_index(workdir, sizes)
            print(json.dumps(ON_ONE_CLUSTER[name](cluster, workdir, sizes)), flush=True)
            replace_lost_node(cluster, workers)
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", required=True, help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--images", type=int, default=Sizes.images)
    parser.add_argument("--finetune-steps", type=int, default=Sizes.finetune_steps)
    parser.add_argument("--finetune-backend", choices=("deepspeed", "ddp"), default="deepspeed")
    parser.add_argument("--serve-seconds", type=float, default=Sizes.serve_seconds)
    parser.add_argument("--clients", type=int, default=Sizes.clients)
    parser.add_argument("--units", type=int, default=Sizes.units, help="index_corpus units")
    parser.add_argument(
        "--node-check-s",
        type=float,
        default=None,
        help="seconds between health checks of a node, 3 failed: dead (default: Ray's)",
    )
    args = parser.parse_args(argv)
    names = args.scenario.split(",")
    if unknown := sorted(set(names) - set(SCENARIOS)):
        parser.error(f"unknown scenario(s) {unknown}: choose from {', '.join(SCENARIOS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    sizes = Sizes(**{f.name: getattr(args, f.name) for f in fields(Sizes)})
    if set(names) & set(ON_ONE_CLUSTER):
        run_on_one_cluster(names, args.workdir.resolve(), sizes)
    if "autoscale" in names:
        print(json.dumps(autoscale_scenario(args.workdir.resolve(), sizes)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
