"""demo: the method end to end on the synthetic world, on CPU.

    python -m pipelines.demo --config configs/demo.yaml [key=value ...]     (or: make demo)

Runs the jobs in order, in one embedded Ray session, each writing under `output_dir` as it would
alone. The loop grows with the jobs: today it makes the world, indexes and scores the corpus and
builds preference pairs; pretraining, finetune and evaluate join it as they land.
"""

from __future__ import annotations

import sys

import numpy as np

from align import io
from align.config import Config
from align.log import get_logger
from pipelines.build_preferences import build_preferences
from pipelines.common import run_job
from pipelines.index_corpus import index_corpus
from pipelines.make_world import make_world, world_dir

log = get_logger("demo")


def summarise_world(config: Config) -> str:
    gt = io.read_parquet(f"{world_dir(config)}/ground_truth.parquet")
    true = gt["true_aesthetic"].to_numpy()
    corr_low = np.corrcoef(true, gt["low_level"].to_numpy())[0, 1]
    corr_high = np.corrcoef(true, gt["high_level"].to_numpy())[0, 1]
    words = sum(1 for w in gt["quality_words"].to_pylist() if w)
    return (
        f"world: {gt.num_rows} images, true aesthetic mean {true.mean():.3f}, "
        f"corr(true, low-level) {corr_low:.2f}, corr(true, high-level) {corr_high:.2f}, "
        f"{words} captions with quality words"
    )


def demo(config: Config) -> None:
    log.info("step 1/3: make_world")
    make_world(config)
    print(summarise_world(config))
    log.info("step 2/3: index_corpus")
    manifest = index_corpus(config)
    counts, index = manifest["counts"], manifest["index"]
    print(
        f"index_corpus: {counts['rows_out']} scored, {counts['rows_error']} errors, "
        f"{manifest['images_per_second']} images/s; {index['spec']['type']} index, "
        f"recall@10 {index['recall_at_10']:.3f}"
    )
    log.info("step 3/3: build_preferences")
    manifest = build_preferences(config)
    print(
        f"build_preferences: {manifest['counts']['rows_out']} queries -> {manifest['pairs']} pairs "
        f"({manifest['rewrite']['backend']}/{manifest['rewrite']['variant']} rewriting, "
        f"{manifest['rewrite']['fallbacks']} fallbacks), {manifest['counts']['rows_error']} errors"
    )


def main(argv: list[str] | None = None) -> int:
    return run_job("demo", demo, argv)


if __name__ == "__main__":
    sys.exit(main())
