"""Caption recall@5 of a demo run's base and aligned models, by content family, with the paired
change's standard error.

    python benchmarks/recall_by_family.py outputs/demo [key=value ...]   (the run's overrides,
                                                                          e.g. world.seed=2)

evaluate's recall@5 ranks each held-out caption's own image among the held-out images
(`world.heldout_images`, every content family). This splits it into captions of families the
alignment trained on and of the unseen families (`world.unseen_family_share`), and gives the
aligned - base change over the same captions with its standard error (how many captions' hits
flip each way), so a change can be read against the noise of a 1,000-caption set. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def caption_hits(model_path: str, config, images, k: int = 5) -> np.ndarray:
    """Per held-out caption: whether its own image ranks in the model's top k of the images."""
    import torch

    from align.config import ModelConfig
    from align.data.images import decode_image, pixels_to_tensor
    from align.evaluation.metrics import target_ranks
    from align.models.clip import build_clip

    clip = build_clip(ModelConfig(name=config.model.name, pretrained=model_path))
    pixels = np.stack(
        [decode_image(b, clip.image_size, config.max_image_pixels) for b in images["image"]]
    )
    with torch.inference_mode():
        x = pixels_to_tensor(pixels, clip.mean, clip.std, "cpu")
        image_emb = torch.nn.functional.normalize(clip.model.encode_image(x), dim=-1)
        tokens = clip.tokenizer([str(c) for c in images["caption"]])
        text_emb = torch.nn.functional.normalize(clip.model.encode_text(tokens), dim=-1)
    similarity = (text_emb @ image_emb.T).numpy()
    return target_ranks(similarity, np.arange(len(similarity))) < k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("overrides", nargs="*", help="the run's config overrides (key=value)")
    args = parser.parse_args()

    import pyarrow as pa

    from align.config import load_config
    from align.data import world
    from align.storage import io, paths

    config = load_config(
        REPO / "configs/demo.yaml", [f"output_dir={args.output_dir}", *args.overrides]
    )
    out = Path(args.output_dir)
    images = io.read_parquet(config.expand(paths.WORLD_HELDOUT_IMAGES)).to_pydict()
    n = world.part_size(config.world, "heldout")
    shards = -(-n // config.world.shard_size)
    truth = pa.concat_tables(
        [world.render_shard(config.world, s, "heldout")[1] for s in range(shards)]
    )
    if truth["image_id"].to_pylist() != images["image_id"]:
        raise SystemExit("recall_by_family: the held-out images are not this config's world")
    unseen = world.unseen_family_mask(config.world, truth).to_numpy(zero_copy_only=False)
    base = caption_hits(str(out / "pretrain/model.pt"), config, images)
    aligned = caption_hits(str(out / "finetune/model.pt"), config, images)
    change = aligned.astype(int) - base.astype(int)
    figures = {
        "captions": {"trained": int((~unseen).sum()), "unseen": int(unseen.sum())},
        **{
            name: {
                "all": round(float(hits.mean()), 4),
                "trained": round(float(hits[~unseen].mean()), 4),
                "unseen": round(float(hits[unseen].mean()), 4),
            }
            for name, hits in (("base", base), ("aligned", aligned))
        },
        "change": round(float(change.mean()), 4),
        "change_standard_error": round(float(change.std(ddof=1) / np.sqrt(len(change))), 4),
        "captions_lost": int((change < 0).sum()),
        "captions_gained": int((change > 0).sum()),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
