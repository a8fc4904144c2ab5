"""End-to-end images/s of the index_corpus job against a bare single-process loop doing the same
decode, embed and score on the same images, in one run.

    python benchmarks/index_corpus_throughput.py [--images 20000] [--model tiny-clip]
        [--repeats 3] [key=value ...]

Prints both rates and their ratio. The job's rate counts its embed-and-score stage (read, decode,
embed, score, staged write: what the loop does) and, separately, the whole job with the combine
and index steps. With --repeats N the loop and the job alternate N times on the same images (the
job into a fresh output folder each time) and the medians are printed beside each pair: on a
shared machine one pair's ratio moves with the load of the moment, the medians much less.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def bare_loop(images_dir: str, model_name: str, batch_size: int) -> tuple[int, float]:
    """Single process: read Parquet, decode, embed, score. Returns (images, seconds)."""
    import pyarrow.parquet as pq
    import torch

    from align.config import Config, ModelConfig
    from align.data.images import decode_image, pixels_to_tensor
    from align.models.aesthetics import lowlevel_score
    from align.models.clip import build_clip

    clip = build_clip(ModelConfig(name=model_name))
    t0 = time.perf_counter()
    n = 0
    for path in sorted(Path(images_dir).glob("*.parquet")):
        table = pq.read_table(path, columns=["image_id", "image"])
        data = table["image"].to_pylist()
        for start in range(0, len(data), batch_size):
            pixels = np.stack(
                [
                    decode_image(b, clip.image_size, Config().max_image_pixels)
                    for b in data[start : start + batch_size]
                ]
            )
            with torch.inference_mode():
                x = pixels_to_tensor(pixels, clip.mean, clip.std, "cpu")
                emb = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1).half()
            lowlevel_score(pixels)
            n += len(pixels)
            del emb
    return n, time.perf_counter() - t0


def run_job(config, output: str) -> tuple[int, float, float]:
    """index_corpus into `output`. Returns (images, embed-and-score stage s, whole job s)."""
    from pipelines.index_corpus import index_corpus

    config = config.model_copy(deep=True)
    config.index_corpus.output = output
    t0 = time.perf_counter()
    manifest = index_corpus(config)
    t_job = time.perf_counter() - t0
    return manifest["counts"]["rows_in"], manifest["timings_s"]["embed_and_score"], t_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--repeats", type=int, default=1, help="loop/job pairs, alternated")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides for the job (key=value)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from align.config import load_config
    from pipelines.make_world import make_world

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-index-")
    shards = max(1, args.images // 1000)
    config = load_config(
        REPO / "configs/demo.yaml",
        [
            f"output_dir={workdir}",
            f"world.num_images={args.images}",
            "world.shard_size=1000",
            "world.pretrain_images=0",  # the corpus is what this figure reads
            "world.eval_images=0",
            f"model.name={args.model}",
            f"index_corpus.files_per_unit={shards}",  # one unit: no actor restarts between units
            *args.overrides,
        ],
    )
    make_world(config)
    images_dir = f"{workdir}/world/images"

    rates = []  # (loop, stages, whole job) images/s, one row per pair
    for repeat in range(args.repeats):
        n_loop, t_loop = bare_loop(images_dir, args.model, config.index_corpus.embed.batch_size)
        # A fresh output each time: a job finds a finished output and skips its units.
        output = tempfile.mkdtemp(dir=workdir, prefix="index_corpus_")
        n_job, t_stage, t_job = run_job(config, output)
        rates.append((n_loop / t_loop, n_job / t_stage, n_job / t_job))
        print_rates(f"pair {repeat + 1}", *rates[-1], t_loop, t_stage, t_job)
    if args.repeats > 1:
        loop, stage, job = np.median(np.asarray(rates), axis=0)
        print_rates(f"median of {args.repeats}", loop, stage, job)
    print(f"machine: {os.cpu_count()} CPUs, model {args.model}, {n_job} images")


def print_rates(label, loop, stage, job, *seconds) -> None:
    """Three rates (images/s) and their ratios to the loop; with `seconds`, the times too."""
    t_loop, t_stage, t_job = (f" ({t:.1f} s)" for t in seconds) if seconds else ("",) * 3
    print(f"{label}:")
    print(f"  bare single-process loop : {loop:8.1f} images/s{t_loop}")
    print(f"  index_corpus stages      : {stage:8.1f} images/s{t_stage}  ratio {stage / loop:.2f}")
    print(f"  index_corpus whole job   : {job:8.1f} images/s{t_job}  ratio {job / loop:.2f}")


if __name__ == "__main__":
    main()
