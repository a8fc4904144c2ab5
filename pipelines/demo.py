"""demo: the method end to end on the synthetic world, on CPU.

    python -m pipelines.demo --config configs/demo.yaml [key=value ...]     (or: make demo)

Runs the jobs in order, in one embedded Ray session, each writing under `output_dir` as it would
alone: make the world, train the learned aesthetic scorer on its ratings, pretrain the base model
on its captions (CLIP InfoNCE), index and score the corpus with that model (pixel measures and the
learned scorer), build preference pairs, fine-tune with retrieval DPO (+ InfoNCE), index the
corpus again with the aligned model where its image tower changed (`configs/serve.yaml` serves it
beside the base model; the demo's fine-tune locks the image tower, so it searches the base's), score
the evaluation gallery (images no training step read), and evaluate every system of
`evaluate.systems` (base, base+rewrite, rerank, steer, aligned, aligned+rerank) on it, for query
families the alignment never saw and for held-out queries of trained families, and on the training
corpus beside it ("seen"); it prints the tables, the headline first, and writes
`evaluate/report.html`.
"""

from __future__ import annotations

import sys

import numpy as np

from align.config import Config, ModelConfig, ScorerConfig
from align.data import world
from align.log import get_logger
from align.runtime.cli import run_job
from align.search.stored import read_index_manifest, shares_image_tower
from align.storage import io, paths
from pipelines.build_preferences import build_preferences
from pipelines.evaluate import evaluate
from pipelines.finetune import finetune
from pipelines.index_corpus import index_corpus
from pipelines.make_world import make_world
from pipelines.pretrain import pretrain
from pipelines.train_scorer import train_scorer

log = get_logger("demo")


def summarise_world(config: Config) -> str:
    gt = io.read_parquet(f"{config.job_output('world')}/{paths.GROUND_TRUTH}")
    true = gt["true_aesthetic"].to_numpy()
    corr_low = np.corrcoef(true, gt["low_level"].to_numpy())[0, 1]
    corr_high = np.corrcoef(true, gt["high_level"].to_numpy())[0, 1]
    words = sum(1 for w in gt["quality_words"].to_pylist() if w)
    unseen = world.unseen_families(config.world)
    return (
        f"world: {gt.num_rows} images, true aesthetic mean {true.mean():.3f}, "
        f"corr(true, low-level) {corr_low:.2f}, corr(true, high-level) {corr_high:.2f}, "
        f"{words} captions with quality words; {len(unseen)} of {len(world.FAMILIES)} content "
        f"families the alignment never sees, {world.part_size(config.world, 'eval')} gallery images"
    )


def summarise_training(job: str, manifest: dict) -> str:
    final, speed = manifest["final"] or {}, manifest["throughput"]
    terms = ", ".join(
        f"{k} {final[k]:.3f}"
        for k in ("contrastive_loss", "dpo_loss", "dpo_accuracy", "reward_margin")
        if final.get(k) is not None
    )
    rate = ", ".join(
        f"{v:.0f} {k.removesuffix('_per_s')}/s"
        for k, v in speed.items()
        if k.endswith("_per_s") and v
    )
    return (
        f"{job}: {manifest['steps']} steps ({manifest['backend']}), {manifest['skipped_steps']} "
        f"skipped; last step: {terms}; {rate}; model {manifest['export']}"
    )


def learned_scorer(config: Config) -> dict[str, ScorerConfig]:
    """Train the learned aesthetic scorer; index_corpus's scorers with it beside the pixel
    measures (demo.yaml gives its weight)."""
    manifest = train_scorer(config)
    m = manifest["metrics"]
    print(
        f"train_scorer: rated_cnn on {m['train_ratings']} ratings, validation Pearson "
        f"{m['validation_pearson']:.3f} (Spearman {m['validation_spearman']:.3f}), {m['seconds']:.0f} s"
    )
    scorers = dict(config.index_corpus.scorers)
    scorers["rated_cnn"] = scorers.get("rated_cnn", ScorerConfig()).model_copy(
        update={"checkpoint": manifest["export"]}
    )
    return scorers


def with_index_corpus(config: Config, model: ModelConfig | None = None, **changes) -> Config:
    """`config` with index_corpus keys changed (another input, output or steps), and the
    model, where given."""
    update = {"index_corpus": config.index_corpus.model_copy(update=changes)}
    return config.model_copy(update={**update, **({"model": model} if model else {})})


def index_aligned(config: Config, export: str) -> None:
    """The aligned model's index, for serving. A fine-tune that kept the image tower as it was
    (finetune.lock_image) embeds every image as the base did: the aligned model searches the
    base's index (configs/serve.yaml), and the corpus is not embedded again."""
    aligned = config.model.model_copy(update={"pretrained": export})
    base_index = read_index_manifest(f"{config.job_output('index_corpus')}/index")
    if shares_image_tower(aligned, base_index):  # the check serving makes (configs/serve.yaml)
        print(
            "index_corpus (aligned model): not run, the fine-tune kept the base's image tower; "
            "the aligned model searches the base's index"
        )
        return
    manifest = index_corpus(
        with_index_corpus(config, output=paths.INDEX_CORPUS_ALIGNED, model=aligned)
    )
    print(f"index_corpus (aligned model): {manifest['counts']['rows_out']} scored")


def demo(config: Config) -> None:
    log.info("step 1/9: make_world")
    make_world(config)
    print(summarise_world(config))
    log.info("step 2/9: train_scorer (the learned aesthetic scorer, from the world's ratings)")
    scorers = learned_scorer(config)
    log.info("step 3/9: pretrain the base model (CLIP InfoNCE on pretrain.captions)")
    manifest = pretrain(config)
    print(summarise_training("pretrain", manifest))
    # Every later job uses the pretrained base model; it is also the DPO reference.
    config = config.model_copy(
        update={
            "model": config.model.model_copy(update={"pretrained": manifest["export"]}),
            "index_corpus": config.index_corpus.model_copy(update={"scorers": scorers}),
        }
    )
    log.info("step 4/9: index_corpus")
    manifest = index_corpus(config)
    counts, index = manifest["counts"], manifest["index"]
    print(
        f"index_corpus: {counts['rows_out']} scored, {counts['rows_error']} errors, "
        f"{manifest['images_per_second']} images/s; {index['spec']['type']} index, "
        f"recall@10 {index['recall_at_10']:.3f}"
    )
    log.info("step 5/9: build_preferences")
    manifest = build_preferences(config)
    print(
        f"build_preferences: {manifest['counts']['rows_out']} queries -> {manifest['pairs']} pairs "
        f"({manifest['rewrite']['backend']}/{manifest['rewrite']['variant']} rewriting, "
        f"{manifest['rewrite']['fallbacks']} fallbacks), {manifest['counts']['rows_error']} errors"
    )
    log.info("step 6/9: finetune (retrieval DPO + lambda * contrastive)")
    manifest = finetune(config)
    print(summarise_training("finetune", manifest))
    log.info("step 7/9: index_corpus with the aligned model (for serving)")
    index_aligned(config, manifest["export"])
    # The evaluation gallery is scored as a user's new corpus would be: by the same scorers,
    # nothing trained on it. Evaluate embeds it with each system's model itself.
    log.info("step 8/9: index_corpus of the evaluation gallery (its aesthetic scores)")
    gallery = with_index_corpus(
        config, input=paths.WORLD_EVAL_IMAGES, output=paths.INDEX_CORPUS_EVAL, steps=["embed"]
    )
    manifest = index_corpus(gallery)
    print(f"index_corpus (evaluation gallery): {manifest['counts']['rows_out']} scored")
    log.info("step 9/9: evaluate the systems on held-out and unseen queries")
    result = evaluate(config)
    print(f"report: {result['output']}/report.html")


def main(argv: list[str] | None = None) -> int:
    return run_job("demo", demo, argv)


if __name__ == "__main__":
    sys.exit(main())
