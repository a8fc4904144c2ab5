"""What a model's similarity follows among the right content, read against the synthetic world.

    python benchmarks/similarity_report.py [--output-dir outputs/demo]

For each held-out query of a demo run, the base model (pretrain/model.pt over index_corpus/) and,
where the run has one, the aligned model (finetune/model.pt over index_corpus_aligned/, or over
index_corpus/ when the fine-tune kept the image tower and the demo built no index of its own) are
asked how they order the corpus. Printed as JSON, per model:
- precision@5 and true_aesthetic@5 of its top 5 (the figures evaluate reports, as a check);
- the Pearson correlation, over the images relevant to the query, of the query-image similarity
  with each quality attribute, the true aesthetic, and whether the image's caption carried
  quality words (averaged over queries);
- the similarity's spread over the relevant images, and the oracle: the true aesthetic of the
  five most beautiful relevant images.

An aligned model that ranks beautiful images of the right content first has a high correlation
with the true aesthetic; the caption-words correlation (of the corpus's own captions) measures
how much of the spread is those captions remembered image by image rather than anything visible:
it is the pretraining data of the demo's base, and never trained on when the base pretrains on
world.pretrain_images instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def similarities(index_dir: Path, model_path: Path, model_name: str, queries: list[str]):
    """(image ids, similarity matrix queries x images) of one model over its own index."""
    import pyarrow.feather as feather
    import torch

    from align.config import ModelConfig
    from align.models.clip import build_clip

    shards = sorted((index_dir / "index").glob("shard-*.embeddings.npy"))
    embeddings = np.concatenate([np.load(p).astype(np.float32) for p in shards])
    ids = []
    for p in shards:
        rows = p.with_name(p.name.replace(".embeddings.npy", ".rows.arrow"))
        ids += feather.read_table(rows, columns=["image_id"])["image_id"].to_pylist()
    clip = build_clip(ModelConfig(name=model_name, pretrained=str(model_path)))
    with torch.no_grad():
        text = clip.model.encode_text(clip.tokenizer(queries)).float()
        text = torch.nn.functional.normalize(text, dim=-1).numpy()
    return np.asarray(ids, dtype=object), text @ embeddings.T


def row_correlations(sim: np.ndarray, values: np.ndarray, rel: np.ndarray) -> float:
    """Mean over queries of corr(similarity, value) over the query's relevant images."""
    out = []
    for s, r in zip(sim, rel, strict=True):
        x, y = s[r], values[r]
        if r.sum() > 2 and x.std() > 0 and y.std() > 0:
            out.append(np.corrcoef(x, y)[0, 1])
    return round(float(np.mean(out)), 3)


def report(root: Path, model_name: str) -> dict:
    import pyarrow.compute as pc

    from align.data import tables
    from align.data.queries import query_facts
    from align.data.world import ATTRIBUTES
    from align.evaluation.gallery import GroundTruth
    from align.models.clip import register_model_configs
    from align.storage import io

    register_model_configs()
    world = root / "world"
    queries = io.read_parquet(str(world / "queries.parquet"), columns=["query", "split"])
    texts = queries.filter(pc.equal(queries["split"], "heldout"))["query"].to_pylist()
    facts = query_facts(str(world / "queries.parquet"), texts)
    world_gt = io.read_parquet(
        str(world / "ground_truth.parquet"), columns=["image_id", *ATTRIBUTES, "quality_words"]
    )

    aligned_index = "index_corpus_aligned"
    if not (root / aligned_index / "index").is_dir():  # the image tower locked: the base's index
        aligned_index = "index_corpus"
    models = {"base": ("index_corpus", "pretrain"), "aligned": (aligned_index, "finetune")}
    result = {}
    for name, (index, job) in models.items():
        if not (root / index / "index").is_dir() or not (root / job / "model.pt").is_file():
            continue
        ids, sim = similarities(root / index, root / job / "model.pt", model_name, texts)
        truth = GroundTruth.read(str(world / "ground_truth.parquet"), ids)
        rel = truth.relevance(facts, np.broadcast_to(np.arange(len(ids)), sim.shape))
        true = truth.true_aesthetic.astype(float)
        top = np.argsort(-sim, axis=1)[:, :5]
        rows = tables.align_rows(ids, world_gt)
        words = world_gt["quality_words"].fill_null("").to_numpy(zero_copy_only=False)[rows]
        columns = {a: world_gt[a].to_numpy(zero_copy_only=False)[rows] for a in ATTRIBUTES}
        columns |= {"true_aesthetic": true, "caption_has_quality_words": (words != "") * 1.0}
        result[name] = {
            "precision@5": round(float(np.take_along_axis(rel, top, axis=1).mean()), 3),
            "true_aesthetic@5": round(float(true[top].mean()), 3),
            "corr_with_similarity_among_relevant": {
                k: row_correlations(sim, v, rel) for k, v in columns.items()
            },
            "similarity_std_among_relevant": round(
                float(np.mean([s[r].std() for s, r in zip(sim, rel, strict=True)])), 4
            ),
            "oracle_true_aesthetic@5": round(
                float(np.mean([np.sort(true[r])[-5:].mean() for r in rel])), 3
            ),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "demo"))
    parser.add_argument("--model", default="micro-rn-clip", help="the run's model.name")
    args = parser.parse_args()
    print(json.dumps(report(Path(args.output_dir), args.model), indent=2))


if __name__ == "__main__":
    main()
