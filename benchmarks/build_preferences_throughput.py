"""Queries/s of build_preferences end to end, and the share of time per stage.

    python benchmarks/build_preferences_throughput.py [--queries 10000]

Runs on the demo world (made and indexed first if missing) with the `keywords` backend and
10,000 distinct queries (content phrases with extra words so none is a duplicate).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--output-dir", default="outputs/bench-preferences")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from align.config import load_config
    from align.data import world
    from align.storage import io
    from pipelines.build_preferences import build_preferences
    from pipelines.index_corpus import index_corpus
    from pipelines.make_world import make_world

    out = Path(args.output_dir).resolve()
    qfile = out / "queries.txt"
    config = load_config(
        REPO / "configs/demo.yaml",
        # No pretraining images: this figure needs the corpus and its index only.
        [f"output_dir={out}", f"build_preferences.queries={qfile}", "world.pretrain_images=0"],
    )
    if not io.exists(f"{config.job_output('index_corpus')}/_manifest.json"):
        make_world(config)
        index_corpus(config)
    extras = ["", "photo", "picture", "image", "shot", "view", "scene", "snapshot", "render"]
    phrases = (
        f"{world.content_phrase(c, s, b)} {e}{i}".strip()
        for i in itertools.count()
        for c, s, b, e in itertools.product(
            world.COLOURS, world.SHAPES, (None, *world.BACKGROUNDS), extras
        )
    )
    qfile.parent.mkdir(parents=True, exist_ok=True)
    qfile.write_text("\n".join(itertools.islice(phrases, args.queries)) + "\n")

    t0 = time.perf_counter()
    manifest = build_preferences(config)
    elapsed = time.perf_counter() - t0
    n = manifest["counts"]["rows_in"]
    print(
        f"machine: {os.cpu_count()} CPUs; {n} queries, keywords backend, {manifest['pairs']} pairs"
    )
    print(
        f"end to end: {n / elapsed:.1f} queries/s ({elapsed:.1f} s); job timings {manifest['timings_s']}"
    )
    stats = (out / "build_preferences" / "_ray_data_stats.txt").read_text()
    walls, name = {}, None
    for line in stats.splitlines():
        if line.startswith("Operator "):
            name = line.split(" ", 2)[2].split(":")[0]
        m = re.match(r"\* Remote wall time: .* ([\d.]+)(us|ms|s) total", line)
        if m and name:
            value = float(m.group(1)) * {"s": 1, "ms": 1e-3, "us": 1e-6}[m.group(2)]
            walls[name] = walls.get(name, 0.0) + value
    total = sum(walls.values()) or 1.0
    for name, value in walls.items():
        print(f"  {name:60s} {value:8.2f} s  {100 * value / total:5.1f}% of stage time")


if __name__ == "__main__":
    main()
