"""What the preference pairs teach, read against the synthetic world's ground truth.

    python benchmarks/pairs_report.py [--output-dir outputs/demo]

Reads build_preferences' candidates and pairs of a demo run and prints JSON figures:
- candidates: the share relevant to the ORIGINAL query, and how well the combined aesthetic
  score that orders the grid's columns agrees with the true aesthetic (Spearman, over relevant
  candidates);
- pairs by relevance: chosen relevant and rejected not (relevance contrasts), both relevant
  (aesthetic contrasts among the right content), both irrelevant, and chosen irrelevant over a
  relevant rejected (pairs that teach the wrong content);
- whether each kind agrees with the truth: a relevant image over an irrelevant one, or between
  two of equal relevance the higher true aesthetic;
- same-row pairs (the grid's aesthetic axis) and same-column pairs (its semantic axis).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default=str(REPO / "outputs" / "demo"))
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from align.data.world import relevant

    root = Path(args.output_dir)
    gt = pq.read_table(root / "world" / "ground_truth.parquet").to_pandas().set_index("image_id")
    queries = pq.read_table(root / "world" / "queries.parquet").to_pandas().set_index("query_id")
    cands = pq.read_table(root / "build_preferences" / "candidates").to_pandas()
    pairs = pq.read_table(root / "build_preferences" / "pairs").to_pandas()

    def facts(frame, column: str) -> np.ndarray:
        # pandas reads a missing string as NaN; the world's "any background" is None.
        values = frame[column]
        return values.astype(object).where(values.notna(), None).to_numpy(object)

    def is_relevant(query_ids, image_ids) -> np.ndarray:
        q = queries.loc[query_ids]
        g = gt.loc[image_ids]
        return relevant(
            facts(q, "colour"), facts(q, "shape"), facts(q, "background"),
            facts(g, "colour"), facts(g, "shape"), facts(g, "background"),
        )  # fmt: skip

    cand_rel = is_relevant(cands["query_id"], cands["image_id"])
    cand_true = gt.loc[cands["image_id"], "true_aesthetic"].to_numpy()
    scored = cand_rel & np.isfinite(cands["aesthetic"].to_numpy())

    chosen_rel = is_relevant(pairs["query_id"], pairs["chosen_id"])
    rejected_rel = is_relevant(pairs["query_id"], pairs["rejected_id"])
    chosen_true = gt.loc[pairs["chosen_id"], "true_aesthetic"].to_numpy()
    rejected_true = gt.loc[pairs["rejected_id"], "true_aesthetic"].to_numpy()
    cells_c = np.stack(pairs["chosen_cell"].to_numpy())
    cells_r = np.stack(pairs["rejected_cell"].to_numpy())
    n = len(pairs)

    def kind(mask: np.ndarray, right: np.ndarray) -> dict:
        return {
            "share": round(float(mask.mean()), 3),
            "agree_with_truth": round(float(right[mask].mean()), 3) if mask.any() else None,
        }

    aesthetic_right = chosen_true > rejected_true
    same_row = cells_c[:, 0] == cells_r[:, 0]
    same_col = cells_c[:, 1] == cells_r[:, 1]
    truth = np.where(chosen_rel != rejected_rel, chosen_rel, aesthetic_right)
    report = {
        "queries": int(cands["query_id"].nunique()),
        "candidates": {
            "per_query": round(len(cands) / max(1, cands["query_id"].nunique()), 1),
            "share_relevant": round(float(cand_rel.mean()), 3),
            "mean_true_aesthetic_relevant": round(float(cand_true[cand_rel].mean()), 3),
            "aesthetic_score_vs_true_spearman": round(
                spearman(cands["aesthetic"].to_numpy()[scored], cand_true[scored]), 3
            ),
        },
        "pairs": {
            "count": n,
            "relevant_over_irrelevant": kind(chosen_rel & ~rejected_rel, aesthetic_right),
            "both_relevant": kind(chosen_rel & rejected_rel, aesthetic_right),
            "both_irrelevant": kind(~chosen_rel & ~rejected_rel, aesthetic_right),
            "irrelevant_over_relevant": kind(~chosen_rel & rejected_rel, aesthetic_right),
            "same_row": kind(same_row, truth),
            "same_column": kind(same_col, truth),
            "agree_with_truth": round(float(truth.mean()), 3),
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
