"""The demo's targets, read from demo runs' evaluate/metrics.json (docs/findings.md).

    python benchmarks/demo_targets.py outputs/demo [/tmp/s3 /tmp/s4 ...] [--markdown]

Per run (an output_dir, or a metrics.json): base true_precision@5 >= 0.8; the aligned model's
true_aesthetic@5 gain over base >= +12% and >= 0.8 of base+rewrite's gain; aligned recall@5 and
true_precision@5 no lower than base - 0.02; aligned hpir_aesthetic above base; the oracle judge's
aligned vs base win - loss >= 0.10. Prints JSON figures (or a markdown table), one entry a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def targets(metrics: dict, k: int = 5) -> dict:
    systems, judge = metrics["systems"], metrics["judge"]
    base, rewrite, aligned = systems["base"], systems["base+rewrite"], systems["aligned"]
    aes = f"true_aesthetic@{k}"
    gain = aligned[aes] / base[aes] - 1
    rewrite_gain = rewrite[aes] / base[aes] - 1
    vs_base = judge["aligned_vs_base"]
    rows = {
        "base_precision": (base[f"true_precision@{k}"], base[f"true_precision@{k}"] >= 0.8),
        "aligned_gain": (gain, gain >= 0.12),
        "share_of_rewrite_gain": (
            gain / rewrite_gain if rewrite_gain > 0 else float("inf"),
            gain >= 0.8 * rewrite_gain,
        ),
        "recall_change": (
            aligned[f"recall@{k}"] - base[f"recall@{k}"],
            aligned[f"recall@{k}"] >= base[f"recall@{k}"] - 0.02,
        ),
        "precision_change": (
            aligned[f"true_precision@{k}"] - base[f"true_precision@{k}"],
            aligned[f"true_precision@{k}"] >= base[f"true_precision@{k}"] - 0.02,
        ),
        "hpir_aesthetic_change": (
            aligned["hpir_aesthetic"] - base["hpir_aesthetic"],
            aligned["hpir_aesthetic"] > base["hpir_aesthetic"],
        ),
        "judge_win_minus_loss": (
            vs_base["win"] - vs_base["loss"],
            vs_base["win"] - vs_base["loss"] >= 0.10,
        ),
    }
    out = {name: {"value": round(v, 4), "met": bool(ok)} for name, (v, ok) in rows.items()}
    out["rewrite_gain"] = round(rewrite_gain, 4)
    out["all_met"] = all(r["met"] for r in out.values() if isinstance(r, dict))
    return out


def read_metrics(path: str) -> dict:
    p = Path(path)
    p = p if p.suffix == ".json" else p / "evaluate" / "metrics.json"
    if not p.is_file():
        raise SystemExit(f"demo_targets: no {p} (has evaluate run in that output_dir?)")
    return json.loads(p.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="output dirs or metrics.json files")
    parser.add_argument("--markdown", action="store_true", help="a table instead of JSON")
    args = parser.parse_args()
    results = {run: targets(read_metrics(run)) for run in args.runs}
    if not args.markdown:
        print(json.dumps(results, indent=2))
        return
    names = [n for n, r in next(iter(results.values())).items() if isinstance(r, dict)]
    print("| target | " + " | ".join(args.runs) + " |")
    print("| --- |" + " --- |" * len(args.runs))
    for name in names:
        cells = [
            f"{r[name]['value']:+.3f} ({'yes' if r[name]['met'] else '**no**'})"
            for r in results.values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
