"""FAISS index benchmark: build time, QPS and recall@10 against exact search.

    python benchmarks/index_search.py [--sizes 100000 1000000] [--dim 128]

Vectors are random unit vectors with cluster structure (a mixture of Gaussians), closer to real
embeddings than i.i.d. noise. Uses the same `choose_index` / `build_index` / `measure_recall` as
index_corpus, with the default IndexConfig (auto type); an IVF-PQ index's nprobe is chosen as the
build chooses it (`choose_nprobe`: the smallest power of two reaching index.target_recall, here
without the exact re-scoring index_corpus's search adds).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def clustered_unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, n // 1000), dim)).astype(np.float32)
    x = centres[rng.integers(len(centres), size=n)] + 0.6 * rng.normal(size=(n, dim)).astype(
        np.float32
    )
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tune_nprobe(index, x: np.ndarray, spec, target: float, queries: int) -> None:
    """Set the nprobe that reaches `target` recall@10 on sampled stored vectors (another sample
    than measure_recall's)."""
    from align.search.index import choose_nprobe, exact_top_k, set_nprobe

    q = x[np.random.default_rng(1).choice(len(x), size=min(queries, len(x)), replace=False)]
    _, truth = exact_top_k([x], q, 10)

    def search(nprobe: int) -> np.ndarray:
        set_nprobe(index, nprobe)
        return index.search(q, 10)[1]

    nprobe, _ = choose_nprobe(search, truth, spec.params["nlist"], target)
    set_nprobe(index, nprobe)
    spec.params["nprobe"] = nprobe


def main() -> None:
    from align.config import IndexConfig
    from align.search.index import build_index, choose_index, measure_recall

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--type", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"])
    args = parser.parse_args()
    print(
        f"machine: {os.cpu_count()} CPUs; dim {args.dim}; {args.queries} queries; recall@10 vs exact"
    )
    for n in args.sizes:
        x = clustered_unit_vectors(n, args.dim)
        cfg = IndexConfig(type=args.type, flat_max_vectors=50_000)
        spec = choose_index(n, args.dim, cfg)
        t0 = time.perf_counter()
        index = build_index(x, spec)
        build_s = time.perf_counter() - t0
        if spec.type == "ivfpq" and not spec.params["nprobe"]:
            tune_nprobe(index, x, spec, cfg.target_recall, args.queries)
        r = measure_recall(index, x, args.queries, k=10)
        print(
            f"n={n:>9,} {spec.type:6s} {spec.params} build {build_s:7.1f} s | "
            f"recall@10 {r['recall_at_k']:.3f} | {r['qps']:9.0f} QPS vs exact {r['exact_qps']:7.0f} QPS "
            f"({r['qps'] / r['exact_qps']:.1f}x)"
        )


if __name__ == "__main__":
    main()
