"""Load, autoscaling and fault benchmark of the search endpoint, on loopback.

    python benchmarks/serve_load.py [--config configs/serve.yaml] [--clients 8] [--seconds 30]
        [--k 10] [--scale-clients 32] [--kill TextEncoder] [--image-bombs 4]
        [--url http://host:port] [--output results.json]

Deploys the Serve config on an embedded Ray (or the cluster in RAY_ADDRESS) as `serve run` does,
unless --url points at a running endpoint. Then up to four phases, replicas per deployment
sampled every 0.5 s throughout:
1. load: N clients (asyncio tasks, keep-alive connections) send GET /search for --seconds:
   throughput, p50/p95/p99 latency, errors.
2. autoscaling (--scale-clients M > 0): M clients for --seconds, then none: the most replicas
   each deployment reached, and how long until every deployment was back at its minimum.
3. fault (--kill DEPLOYMENT): N clients again; a replica of DEPLOYMENT is killed a third of the
   way in: requests that failed even after one client retry, requests a retry absorbed, and how
   long until a new replica was running and as many ran as before.
4. image bombs (--image-bombs B): N clients search by text for --seconds while B more send
   POST /search with a 7,900 x 7,900 single-colour PNG (about 200 KB, 190 MB decoded) back to
   back: the text searches' p50/p99/max latency and the bombs' answers, printed as JSON.
Queries are the world's held-out queries when the demo's outputs exist, else a built-in list.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FALLBACK_QUERIES = [
    f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("star", "circle", "square")
]


def load_queries(config: dict) -> list[str]:
    from align.storage import io

    args = config["applications"][0]["args"]
    first = next(iter(args["models"].values()))["index_corpus"]
    path = Path(first).parent / "world/queries.parquet"
    if path.exists():
        return io.read_parquet(str(path), columns=["query"])["query"].to_pylist()
    return FALLBACK_QUERIES


class LoadGenerator(threading.Thread):
    """N clients as asyncio tasks on one event loop (aiohttp, keep-alive connections): each sends
    requests back to back and retries a failed one once. One loop costs this 2-core machine less
    CPU than N client threads, which would otherwise compete with the server for it."""

    def __init__(self, base: str, queries: list[str], k: int, clients: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.queries, self.k, self.clients, self.stop = base, queries, k, clients, stop
        self.records: list[tuple[float, float, bool, bool]] = []  # start, seconds, ok, retried
        self.bombs, self.bomb = 0, b""  # clients sending this body instead of text searches
        self.bomb_answers: list[tuple[int, str]] = []  # status, error message

    async def _once(self, session, url: str) -> bool:
        import aiohttp

        try:
            async with session.get(url) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _client(self, session, seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not self.stop.is_set():
            q = self.queries[rng.integers(len(self.queries))]
            url = f"{self.base}/search?" + urllib.parse.urlencode({"q": q, "k": self.k})
            t0 = time.perf_counter()
            ok = await self._once(session, url)
            retried = not ok
            if retried:
                ok = await self._once(session, url)
            self.records.append((t0, time.perf_counter() - t0, ok, retried))

    async def _bomber(self, session, body: bytes) -> None:
        import aiohttp

        while not self.stop.is_set():
            try:
                async with session.post(f"{self.base}/search", data=body) as response:
                    answer = await response.json(content_type=None)
                    self.bomb_answers.append((response.status, answer.get("error", "")))
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                self.bomb_answers.append((0, type(e).__name__))

    async def _main(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=self.clients + self.bombs)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(
                *(self._client(session, seed) for seed in range(self.clients)),
                *(self._bomber(session, self.bomb) for _ in range(self.bombs)),
            )

    def run(self) -> None:
        asyncio.run(self._main())


def image_bomb() -> str:
    """A 7,900 x 7,900 single-colour PNG, base64: about 200 KB that declare 62 megapixels."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (7900, 7900), (10, 200, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def replica_counts(app: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return {}
    return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in status.deployments.items()}


def run_load(base, queries, clients, seconds, k, app, on_tick=None, bombs=0, bomb=b"") -> dict:
    """Run the clients (and `bombs` clients posting the body `bomb` to /search) for `seconds`,
    sampling replica counts; returns figures and the trace."""
    stop = threading.Event()
    load = LoadGenerator(base, queries, k, clients, stop)
    load.bombs, load.bomb = bombs, bomb
    t_start = time.perf_counter()
    load.start()
    trace = []
    while (elapsed := time.perf_counter() - t_start) < seconds:
        if app:
            trace.append((round(elapsed, 1), replica_counts(app)))
        if on_tick:
            on_tick(elapsed)
        time.sleep(0.5)
    stop.set()
    load.join()
    records = load.records
    latency = np.array([r[1] for r in records if r[2]]) * 1000
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(records),
        "throughput_rps": round(len(records) / seconds, 1),
        "p50_ms": round(float(np.percentile(latency, 50)), 1) if len(latency) else None,
        "p95_ms": round(float(np.percentile(latency, 95)), 1) if len(latency) else None,
        "p99_ms": round(float(np.percentile(latency, 99)), 1) if len(latency) else None,
        "max_ms": round(float(latency.max()), 1) if len(latency) else None,
        "errors": sum(not r[2] for r in records),
        "absorbed_by_retry": sum(r[2] and r[3] for r in records),
        "max_replicas": {
            name: max(counts.get(name, 0) for _, counts in trace) for name in trace[-1][1]
        }
        if trace
        else {},
        "trace": trace,
        **({"bomb_answers": load.bomb_answers} if bombs else {}),
    }


def wait_for_minimum(app: str, minimum: dict[str, int], timeout_s: float) -> float | None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        counts = replica_counts(app)
        if all(counts.get(n, 0) <= m for n, m in minimum.items()):
            return round(time.perf_counter() - t0, 1)
        time.sleep(0.5)
    return None


def replica_actors(app: str, deployment: str) -> dict[str, str]:
    """Live replica actors of a deployment: name -> namespace."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        a["name"]: a["namespace"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(prefix)
    }


def deployment_states(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    return dict(status.deployments[deployment].replica_states) if status else {}


def kill_one_replica(app: str, deployment: str) -> dict:
    """Kill a replica of the deployment (as a node failure would); returns what recovery is
    measured against: the replicas there were, and when."""
    import ray

    replicas = replica_actors(app, deployment)
    if not replicas:
        raise RuntimeError(f"no running replica of {deployment} in {app}")
    name, namespace = next(iter(replicas.items()))
    before = deployment_states(app, deployment).get("RUNNING", 0)
    ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
    return {"name": name, "replicas": set(replicas), "before": before, "at": time.perf_counter()}


def recovered(app: str, deployment: str, killed: dict) -> bool:
    """A replica started after the kill is running, and as many run as before, none starting."""
    states = deployment_states(app, deployment)
    new = set(replica_actors(app, deployment)) - killed["replicas"]
    return bool(new) and states.get("RUNNING", 0) >= killed["before"] and not states.get("STARTING")


def image_bomb_phase(base: str, queries: list[str], args, app: str) -> dict:
    """Text searches while --image-bombs clients post 7,900^2 PNG queries; prints the text
    searches' latency and the bombs' answers as one JSON line, and returns the figures."""
    body = json.dumps({"image": image_bomb()}).encode()
    r = run_load(
        base, queries, args.clients, args.seconds, args.k, app, bombs=args.image_bombs, bomb=body
    )
    answers = r.pop("bomb_answers")
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    summary = {
        "text_clients": args.clients,
        "image_bomb_clients": args.image_bombs,
        "seconds": args.seconds,
        "text_requests": r["requests"],
        "text_errors": r["errors"],
        "text_p50_ms": r["p50_ms"],
        "text_p99_ms": r["p99_ms"],
        "text_max_ms": r["max_ms"],
        "bomb_requests": len(answers),
        "bomb_statuses": statuses,
        "bomb_error": answers[0][1] if answers else None,
    }
    print("image bombs:", json.dumps(summary))
    return {**r, **summary}


def print_load(title: str, r: dict) -> None:
    print(
        f"{title}: {r['clients']} clients x {r['seconds']} s: {r['requests']} requests, "
        f"{r['throughput_rps']} req/s, p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, "
        f"p99 {r['p99_ms']} ms, errors {r['errors']}, absorbed by a retry "
        f"{r['absorbed_by_retry']}; max replicas {r['max_replicas']}"
    )


def main() -> None:
    import ray

    from serve.app import deploy, load_serve_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/serve.yaml"))
    parser.add_argument("--url", default=None, help="a running endpoint (skips deploying)")
    parser.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--scale-clients", type=int, default=32, help="0: no autoscaling phase")
    parser.add_argument("--kill", default=None, help="deployment to kill a replica of (phase 3)")
    parser.add_argument(
        "--image-bombs", type=int, default=0, help="clients sending 7,900^2 PNGs (phase 4)"
    )
    parser.add_argument("--scale-down-timeout", type=float, default=90.0)
    parser.add_argument("--output", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    config = load_serve_config(args.config)
    app = config["applications"][0]["name"]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
    t0 = time.perf_counter()
    if not args.url:
        port = args.port or config.get("http_options", {}).get("port", 8000)
        with socket.socket() as s:  # else the load would go to whatever holds the port
            if s.connect_ex(("127.0.0.1", port)) == 0:
                sys.exit(f"port {port} is in use: stop that server, or pass --port or --url")
    base = args.url or deploy(config, port=args.port)
    print(f"machine: {os.cpu_count()} CPUs; endpoint {base}; deployed in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    queries = load_queries(config)
    minimum = {
        d["name"]: d.get("autoscaling_config", {}).get("min_replicas", d.get("num_replicas", 1))
        for d in config["applications"][0].get("deployments", [])
    }
    # Warm-up: first requests load lazily built state in each replica.
    run_load(base, queries, args.clients, 10, args.k, None)
    results = {"load": run_load(base, queries, args.clients, args.seconds, args.k, app)}
    print_load("load", results["load"])
    if args.scale_clients:
        scale = run_load(base, queries, args.scale_clients, args.seconds, args.k, app)
        scale["scale_down_s"] = wait_for_minimum(app, minimum, args.scale_down_timeout)
        results["autoscaling"] = scale
        print_load("autoscaling", scale)
        print(
            f"autoscaling: back to the minimum {minimum} {scale['scale_down_s']} s after the load"
        )
    else:
        wait_for_minimum(app, minimum, args.scale_down_timeout)

    if args.kill:
        killed: dict = {}

        def on_tick(elapsed: float) -> None:
            if not killed and elapsed >= args.seconds / 3:
                killed.update(kill_one_replica(app, args.kill))
            elif killed and "recovered_s" not in killed and recovered(app, args.kill, killed):
                killed["recovered_s"] = round(time.perf_counter() - killed["at"], 1)

        fault = run_load(base, queries, args.clients, args.seconds, args.k, app, on_tick)
        fault["killed"] = {k: killed.get(k) for k in ("name", "before", "recovered_s")}
        results["fault"] = fault
        print_load(f"fault (a {args.kill} replica killed)", fault)
        print(
            f"fault: killed {killed.get('name')}; running replicas back to {killed.get('before')} "
            f"after {killed.get('recovered_s')} s"
        )
    if args.image_bombs:
        results["image_bombs"] = image_bomb_phase(base, queries, args, app)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
