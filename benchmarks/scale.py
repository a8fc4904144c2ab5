"""Scale benchmark: memory per retrieval process against corpus size, through the project's code.

    python benchmarks/scale.py --images 1000000 --dim 512 --shard-images 250000 [--nlist 1024]

The index is sized by the project's own rules (align.search.index.choose_index: nlist from the corpus,
the PQ code the memory budget holds, nprobe chosen at build time to reach index.target_recall);
--nlist and --nprobe fix them instead.

1. Writes synthetic scored shards (the SCORED contract; unit vectors with clustered structure,
   float16 as index_corpus writes them), one file per `--shard-images`, in Ray tasks.
2. Builds the index with index_corpus' own code (align.search.build.write_index: sample, train
   IVF-PQ once, one task per shard, nprobe chosen and recall@10 measured against exact search
   streamed over the shards).
3. build_preferences' retrieval: the real CandidateRetriever stage, in a Ray actor, over
   `--queries` query vectors (perturbed corpus vectors), searching through the search actors
   (one per node: here one, holding every shard; `--search-actors` splits the shards).
4. The serving path: single-query searches (`--serve-queries`) from 4 client threads to one
   process holding `Corpus(index)` as a VectorIndex replica does (every shard, one search).
5. With --merge-ondisk: the shards merged into one on-disk index (index.merge_ondisk's code),
   its recall@10 against exact search, and the same single-query load on one process holding it.
Prints one JSON line: images, build_s, recall_at_10, qps (retrieval), serve_qps, serve_p50_ms,
serve_p99_ms, peak_rss_replica_mb (the serving process), peak_rss_largest_mb (the largest
process of all), peak_rss_sum_mb (the retrieval processes: the search actors and the retriever),
ram_bytes_per_image (that sum less each process's bare footprint, over the images;
`ram_bytes_per_image_raw` without subtracting it) and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def write_synthetic_shard(path: str, first: int, n: int, centres: np.ndarray, seed: int) -> int:
    """Ray task: one scored shard of n clustered unit vectors (ids first .. first + n - 1)."""
    import pyarrow as pa

    from actors.score import scored_to_arrow
    from align.data.contracts import SCORED, SCORER_COLUMN_PREFIX, conform
    from align.storage import io

    rng = np.random.default_rng(seed)
    d = centres.shape[1]
    # As benchmarks/index_search.py: a mixture of Gaussians, noise 0.6 of a centre per dimension.
    noise = 0.6 * rng.normal(size=(n, d)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    batch = {
        "image_id": np.char.mod("%012d", np.arange(first, first + n)).astype(object),
        "embedding": x.astype(np.float16),
        "status": np.full(n, "ok", dtype=object),
        "error": np.full(n, "", dtype=object),
    }
    aesthetic = pa.array(rng.normal(size=n).astype(np.float32))
    table = scored_to_arrow(batch).append_column("aesthetic", aesthetic)
    io.write_parquet(conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX), path)
    return n


def write_corpus(root: str, images: int, dim: int, shard_images: int, seed: int) -> list[str]:
    import ray

    rng = np.random.default_rng(seed)
    # Clusters of ~1000 images.
    centres = rng.normal(size=(max(16, images // 1000), dim)).astype(np.float32)
    task = ray.remote(num_cpus=1)(write_synthetic_shard)
    starts = list(range(0, images, shard_images))
    paths = [f"{root}/scored/part-{i:05d}.parquet" for i in range(len(starts))]
    centres_ref = ray.put(centres)
    ray.get(
        [
            task.remote(p, s, min(shard_images, images - s), centres_ref, seed + 1 + i)
            for i, (p, s) in enumerate(zip(paths, starts, strict=True))
        ]
    )
    return paths


def bare_process_mb(root: str, dim: int, top_k: int) -> float:
    """Peak RSS of a search actor over a 1,000-image index after it has answered searches as the
    real ones do (through Corpus, with reference similarities): what every such process costs
    before its shard's size counts (Python, Ray's worker, numpy, pyarrow, FAISS, and the code and
    caches the first search loads: about 45 MB more than an actor that has searched nothing)."""
    from align.config import IndexConfig, ModelConfig
    from align.search.build import write_index
    from align.search.corpus import Corpus, start_shard_actors

    files = [f"{root}/tiny/scored/part-00000.parquet"]
    write_synthetic_shard(files[0], 0, 1000, np.eye(dim, dtype=np.float32)[:16], 0)
    write_index(
        files,
        f"{root}/tiny/index",
        IndexConfig(type="flat"),
        ModelConfig(name="tiny-clip"),
        remote=False,
    )
    actors = start_shard_actors(f"{root}/tiny/index", 0.1, IndexConfig().refine_factor)
    corpus = Corpus(f"{root}/tiny/index", shard_actors=actors.names)
    q = np.random.default_rng(0).normal(size=(256, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    for _ in range(4):
        corpus.candidates(q, top_k, reference=q)
    return corpus.memory()[0]["peak_rss_mb"]


def retrieval_load(index_corpus_dir: str, actors, queries: np.ndarray, top_k: int, batch: int):
    """build_preferences' retrieval stage over the queries; returns (seconds, its peak RSS)."""
    import ray

    from actors.retrieve import CandidateRetriever
    from align.search.corpus import process_memory

    class MeasuredRetriever(CandidateRetriever):
        def memory(self):
            return process_memory()

    retriever = ray.remote(num_cpus=1)(MeasuredRetriever).remote(
        index_corpus_dir, top_k, 4, 4, 2, "original", shard_actors=actors.names
    )
    ray.get(retriever.memory.remote())
    t0 = time.perf_counter()
    calls = []
    for start in range(0, len(queries), batch):
        q = queries[start : start + batch]
        ids = np.char.mod("q%07d", np.arange(start, start + len(q))).astype(object)
        calls.append(
            retriever.__call__.remote(
                {"query_id": ids, "query_embedding": q, "rewritten_embedding": q}
            )
        )
        if len(calls) >= 2:  # two batches in flight: the actor works while the next is sent
            ray.get(calls.pop(0))
    ray.get(calls)
    seconds = time.perf_counter() - t0
    memory = ray.get(retriever.memory.remote())["peak_rss_mb"]
    ray.kill(retriever)
    return seconds, memory


def serving_load(index_dir: str, queries: np.ndarray, k: int) -> dict:
    """The serving app's path: a VectorIndex replica holds `Corpus(index_dir)` in its process
    (every shard, one quantizer search a query) and answers each query with its rows' ids and
    captions. Single queries from 4 client threads to one Ray actor doing the same, after 100
    warm-up queries; returns queries/s, p50 and p99 latency (client side, the actor call
    included) and the replica's peak RSS."""
    import ray

    from align.search.corpus import Corpus, process_memory

    class Replica:
        def __init__(self, index_dir: str):
            self.corpus = Corpus(index_dir)

        def search(self, q: np.ndarray, k: int) -> np.ndarray:
            found = self.corpus.candidates(q, k)
            self.corpus.row_info(found.rows[0][found.rows[0] >= 0])
            return found.rows

        def memory(self) -> dict:
            return process_memory()

    server = ray.remote(num_cpus=1, max_concurrency=1)(Replica).remote(index_dir)
    ray.get([server.search.remote(q[None], k) for q in queries[-100:]])
    seconds = []

    def one(q: np.ndarray) -> None:
        t0 = time.perf_counter()
        ray.get(server.search.remote(q[None], k))
        seconds.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, queries[:-100]))
    wall = time.perf_counter() - t0
    memory = ray.get(server.memory.remote())
    ray.kill(server)
    ms = 1000 * np.array(seconds)
    return {
        "serve_qps": round(len(ms) / wall, 1),
        "serve_p50_ms": round(float(np.percentile(ms, 50)), 2),
        "serve_p99_ms": round(float(np.percentile(ms, 99)), 2),
        "peak_rss_replica_mb": round(memory["peak_rss_mb"], 1),
    }


def merged_serving(index_dir: str, manifest: dict, queries: np.ndarray, k: int) -> dict:
    """index.merge_ondisk: the shards merged into one on-disk index (index_corpus' code), then
    single-query searches from 4 threads in one Ray actor holding it, as a single-node serving
    replica would; returns merge seconds, queries/s and that process's peak RSS."""
    import faiss
    import ray

    from align.config import IndexConfig
    from align.search.build import corpus_recall, merge_ondisk
    from align.search.corpus import Corpus

    if "merged" not in manifest:
        # The trained, empty index: the first shard with its lists cleared.
        empty = faiss.read_index(f"{index_dir}/{manifest['shards'][0]['file']}")
        empty.reset()
        manifest["merged"] = merge_ondisk(
            index_dir, manifest["shards"], faiss.serialize_index(empty).tobytes()
        )
        Path(index_dir, "_index.json").write_text(json.dumps(manifest))
    server = ray.remote(num_cpus=1, max_concurrency=4)(Corpus).remote(index_dir)
    ray.get(server.memory.remote())
    t0 = time.perf_counter()
    calls = []
    for q in queries:
        calls.append(server.candidates.remote(q[None], k))
        if len(calls) >= 4:  # four in flight, as four clients
            ray.get(calls.pop(0))
    ray.get(calls)
    qps = len(queries) / (time.perf_counter() - t0)
    (memory,) = ray.get(server.memory.remote())
    ray.kill(server)
    recall = corpus_recall(index_dir, queries[:200], 10, IndexConfig().refine_factor)
    return {
        "merge_s": manifest["merged"]["merge_s"],
        "serve_qps": round(qps, 1),
        "peak_rss_mb": round(memory["peak_rss_mb"], 1),
        "recall_at_10": round(recall["recall_at_k"], 4),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shard-images", type=int, default=250_000)
    parser.add_argument(
        "--nlist", type=int, default=None, help="IVF lists (whole corpus; default: the sizing's)"
    )
    parser.add_argument(
        "--nprobe", type=int, default=None, help="default: chosen at build time (target recall)"
    )
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--serve-queries", type=int, default=1000)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument(
        "--shard-cpus",
        type=float,
        default=None,
        help="CPUs of each search actor (default: half the machine's, shared out)",
    )
    parser.add_argument(
        "--search-actors",
        type=int,
        default=None,
        help="search actors holding a share of the shards each (index.search_actors; default: "
        "one per node)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="kept, and its index reused by a second run (default: a temporary folder, removed)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge-ondisk",
        action="store_true",
        help="also merge the shards into one on-disk index and serve single queries from it",
    )
    return parser.parse_args()


def build_or_reuse(args, root: str, cfg) -> tuple[dict, float, float]:
    """The synthetic corpus and its index (or a --workdir's from an earlier run with the same
    arguments): (index manifest, seconds writing the corpus, seconds building the index)."""
    from align.config import ModelConfig
    from align.search.build import write_index

    built = Path(root, "built.json")
    if built.exists():
        times = json.loads(built.read_text())
        manifest = json.loads(Path(root, "index", "_index.json").read_text())
        return manifest, times["write_s"], times["build_s"]
    t0 = time.perf_counter()
    files = write_corpus(root, args.images, args.dim, args.shard_images, args.seed)
    write_s = time.perf_counter() - t0
    print(f"wrote {len(files)} scored shards in {write_s:.0f} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    manifest = write_index(files, f"{root}/index", cfg, ModelConfig(name="tiny-clip"))
    build_s = time.perf_counter() - t0
    built.write_text(json.dumps({"write_s": write_s, "build_s": build_s, "args": vars(args)}))
    return manifest, write_s, build_s


def near_queries(root: str, args) -> np.ndarray:
    """Queries near corpus images: a stored vector plus noise (a fifth of a unit vector's
    length), renormalised."""
    from align.search.corpus import Corpus

    rng = np.random.default_rng(args.seed + 99)
    sample = Corpus(f"{root}/index").vectors(rng.integers(0, args.images, args.queries))
    noise = rng.normal(size=sample.shape).astype(np.float32) * (0.2 / np.sqrt(args.dim))
    q = sample.astype(np.float32) + noise
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def main() -> None:
    args = parse_args()

    import ray

    from align.config import IndexConfig
    from align.search.corpus import start_shard_actors

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR"))
    root = args.workdir or tmp.name
    shards = -(-args.images // args.shard_images)
    cfg = IndexConfig(type="ivfpq", num_shards=shards, ivf_nlist=args.nlist, ivf_nprobe=args.nprobe)
    manifest, write_s, build_s = build_or_reuse(args, root, cfg)
    print(
        f"index built in {build_s:.0f} s, recall@10 {manifest['recall_at_10']:.3f}",
        file=sys.stderr,
        flush=True,
    )
    q = near_queries(root, args)
    bare = bare_process_mb(root, args.dim, args.top_k)
    # The search actors (one per node: one here) fit beside the retriever: half the CPUs.
    cpus = args.shard_cpus or 0.5 * os.cpu_count() / (args.search_actors or 1)
    actors = start_shard_actors(f"{root}/index", cpus, cfg.refine_factor, args.search_actors)
    retrieve_s, retriever_mb = retrieval_load(root, actors, q, args.top_k, batch=256)
    print(f"retrieval: {args.queries / retrieve_s:.1f} queries/s", file=sys.stderr, flush=True)
    serving = serving_load(f"{root}/index", q[: args.serve_queries + 100], 10)
    print(f"serving: {serving}", file=sys.stderr, flush=True)
    shard_stats = ray.get([h.stats.remote() for h in actors.handles])
    merged = None
    if args.merge_ondisk:
        merged = merged_serving(f"{root}/index", manifest, q[: args.serve_queries], 10)
    measured = {
        "write_s": write_s,
        "build_s": build_s,
        "retrieve_s": retrieve_s,
        "serving": serving,
        "retriever_mb": retriever_mb,
        "bare_mb": bare,
    }
    print(json.dumps(summary(args, root, manifest, measured, shard_stats, merged)))
    if tmp is not None:
        tmp.cleanup()


def summary(args, root: str, manifest: dict, measured: dict, shard_stats: list, merged) -> dict:
    """The one JSON line the benchmark prints (the module docstring lists its keys)."""
    shard_mb = [m["peak_rss_mb"] for m in shard_stats]
    largest = shard_stats[int(np.argmax(shard_mb))]
    processes = [measured["retriever_mb"], *shard_mb]
    total, bare = sum(processes), measured["bare_mb"]
    return {
        "images": args.images,
        "dim": args.dim,
        "shard_images": args.shard_images,
        "shards": len(manifest["shards"]),
        "index": manifest["spec"],
        "write_s": round(measured["write_s"], 1),
        "build_s": round(measured["build_s"], 1),
        "recall_at_10": round(manifest["recall_at_10"], 4),
        "recall_queries": manifest["recall"]["queries"],
        "queries": args.queries,
        "top_k": args.top_k,
        "qps": round(args.queries / measured["retrieve_s"], 1),
        **measured["serving"],
        "peak_rss_largest_mb": round(
            max(*processes, measured["serving"]["peak_rss_replica_mb"]), 1
        ),
        "peak_rss_retriever_mb": round(measured["retriever_mb"], 1),
        "search_actors": len(shard_stats),
        "peak_rss_search_actor_mb": round(max(shard_mb), 1),
        # That actor's resident memory at the end, by kind (shmem: Ray's object store).
        "shard_actor_now_mb": {k: round(v, 1) for k, v in largest.items()},
        "peak_rss_sum_mb": round(total, 1),
        "bare_process_mb": round(bare, 1),
        "ram_bytes_per_image": round((total - bare * len(processes)) * 2**20 / args.images),
        "ram_bytes_per_image_raw": round(total * 2**20 / args.images),
        "disk_bytes_per_image": round(
            sum(f.stat().st_size for f in Path(root, "index").iterdir()) / args.images
        ),
        "merged_ondisk": merged,
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    main()
