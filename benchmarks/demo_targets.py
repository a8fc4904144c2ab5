"""The demo's targets, read from demo runs' evaluate/metrics.json (docs/findings.md).

    python benchmarks/demo_targets.py outputs/demo [/tmp/s3 /tmp/s4 ...] [--markdown | --systems | --summary]

Per run (an output_dir, or a metrics.json) and per table (the gallery no training step saw, for
query families never trained on and for held-out queries of trained families; the training
corpus, 'seen'): base true_precision@5 >= 0.8; the aligned model's true_aesthetic@5 gain over base
>= +12% and >= 0.9 of base+rewrite's gain; aligned recall@5 and true_precision@5 no lower than
base - 0.02; aligned hpir_aesthetic above base (tables with HPIR items). `all_met` is over the
headline table, the first. The oracle judge's aligned vs base win - loss is printed beside them
and is no target: it reads the ground truth true_aesthetic@5 measures (no independent evidence).
Prints JSON figures (or markdown: the targets, or with --systems each table's systems as
docs/findings.md shows them, or with --summary a row per run and table: the figures the targets
read, for comparing seeds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def targets(table: dict, k: int = 5) -> dict:
    """The targets of one table of metrics.json (or of a metrics.json without tables)."""
    systems, judge = table["systems"], table.get("judge") or {}
    base, rewrite, aligned = systems["base"], systems["base+rewrite"], systems["aligned"]
    aes = f"true_aesthetic@{k}"
    gain = aligned[aes] / base[aes] - 1
    rewrite_gain = rewrite[aes] / base[aes] - 1
    rows = {
        "base_precision": (base[f"true_precision@{k}"], base[f"true_precision@{k}"] >= 0.8),
        "aligned_gain": (gain, gain >= 0.12),
        "share_of_rewrite_gain": (
            gain / rewrite_gain if rewrite_gain > 0 else float("inf"),
            gain >= 0.9 * rewrite_gain,
        ),
        "recall_change": (
            aligned[f"recall@{k}"] - base[f"recall@{k}"],
            aligned[f"recall@{k}"] >= base[f"recall@{k}"] - 0.02,
        ),
        "precision_change": (
            aligned[f"true_precision@{k}"] - base[f"true_precision@{k}"],
            aligned[f"true_precision@{k}"] >= base[f"true_precision@{k}"] - 0.02,
        ),
    }
    if base.get("hpir_aesthetic") is not None:
        rows["hpir_aesthetic_change"] = (
            aligned["hpir_aesthetic"] - base["hpir_aesthetic"],
            aligned["hpir_aesthetic"] > base["hpir_aesthetic"],
        )
    out = {name: {"value": round(v, 4), "met": bool(ok)} for name, (v, ok) in rows.items()}
    out["rewrite_gain"] = round(rewrite_gain, 4)
    if "aligned_vs_base" in judge:
        vs_base = judge["aligned_vs_base"]
        out["oracle_judge_win_minus_loss"] = round(vs_base["win"] - vs_base["loss"], 4)
    out["all_met"] = all(r["met"] for r in out.values() if isinstance(r, dict))
    return out


def run_targets(metrics: dict) -> dict:
    """{table: targets} for every table of a metrics.json, the headline first, and `all_met`:
    the headline's."""
    tables = metrics.get("tables") or {"all": metrics}
    order = metrics.get("order", list(tables))
    out = {name: targets(tables[name], metrics.get("k", 5)) for name in order}
    return {**out, "all_met": next(iter(out.values()))["all_met"]}


def read_metrics(path: str) -> dict:
    p = Path(path)
    p = p if p.suffix == ".json" else p / "evaluate" / "metrics.json"
    if not p.is_file():
        raise SystemExit(f"demo_targets: no {p} (has evaluate run in that output_dir?)")
    return json.loads(p.read_text())


def markdown(results: dict) -> str:
    """One table a run: a row per target, a column per table of metrics.json."""
    out = []
    for run, tables in results.items():
        names = [n for n in tables if n != "all_met"]
        targets_of = [t for t, v in tables[names[0]].items() if isinstance(v, dict)]
        out.append(f"{run} (headline met: {'yes' if tables['all_met'] else '**no**'})\n")
        out.append("| target | " + " | ".join(names) + " |")
        out.append("| --- |" + " --- |" * len(names))
        for target in targets_of:
            cells = []
            for name in names:
                r = tables[name].get(target)
                ok = "-" if r is None else ("yes" if r["met"] else "**no**")
                cells.append("-" if r is None else f"{r['value']:+.3f} ({ok})")
            out.append(f"| {target} | " + " | ".join(cells) + " |")
        rewrite = " | ".join(f"{tables[n]['rewrite_gain']:+.3f}" for n in names)
        out.append(f"| rewrite_gain (reference) | {rewrite} |")
        oracle = [tables[n].get("oracle_judge_win_minus_loss") for n in names]
        oracle = ["-" if v is None else f"{v:+.2f}" for v in oracle]
        out.append(f"| oracle judge win - loss (not evidence) | {' | '.join(oracle)} |\n")
    return "\n".join(out)


def systems_markdown(run: str, metrics: dict, k: int = 5) -> str:
    """Per table of one run: recall@k, true_aesthetic@k (gain over base), true_precision@k,
    hpir_aesthetic and the oracle judge against base, a row per system."""
    tables = metrics.get("tables") or {"all": metrics}
    out = []
    for name in metrics.get("order", list(tables)):
        table = tables[name]
        base = table["systems"]["base"][f"true_aesthetic@{k}"]
        judge = table.get("judge") or {}
        out.append(f"{run}: {table.get('title', name)} ({table['queries']} queries)\n")
        out.append(
            f"| system | recall@{k} | true_aesthetic@{k} | true_precision@{k} | hpir_aesthetic "
            "| oracle judge vs base (win / similar / loss) |"
        )
        out.append("| --- | --- | --- | --- | --- | --- |")
        first = [s for s in ("base", "base+rewrite") if s in table["systems"]]
        for system in first + sorted(set(table["systems"]) - set(first)):  # JSON sorts keys
            m = table["systems"][system]
            aes = m[f"true_aesthetic@{k}"]
            gain = "" if system == "base" else f" ({aes / base - 1:+.1%})"
            hpir = m.get("hpir_aesthetic")
            vs = judge.get(f"{system}_vs_base")
            verdict = f"{vs['win']:.2f} / {vs['similar']:.2f} / {vs['loss']:.2f}" if vs else ""
            out.append(
                f"| {system} | {m[f'recall@{k}']:.3f} | {aes:.3f}{gain} | "
                f"{m[f'true_precision@{k}']:.3f} | {'-' if hpir is None else f'{hpir:.3f}'} | "
                f"{verdict} |"
            )
        out.append("")
    return "\n".join(out)


SUMMARY_COLUMNS = (
    "| run | table | base true_aesthetic@5 | base+rewrite | aligned (share of the rewrite's gain) "
    "| aligned true_precision@5 - base | recall@5 - base | hpir_aesthetic - base | targets met |"
)


def summary_row(metrics: dict, table: str, t: dict) -> dict:
    """The figures of one table's targets `t` that --summary shows."""
    base = metrics.get("tables", {"all": metrics})[table]["systems"]["base"]
    hpir = t.get("hpir_aesthetic_change")
    return {
        "base": base["true_aesthetic@5"],
        "rewrite": t["rewrite_gain"],
        "gain": t["aligned_gain"]["value"],
        "share": t["share_of_rewrite_gain"]["value"],
        "precision": t["precision_change"]["value"],
        "recall": t["recall_change"]["value"],
        "hpir": None if hpir is None else hpir["value"],
        "met": "yes" if t["all_met"] else "**no**",
    }


def mean_row(rows: list[dict]) -> dict:
    """The mean of each figure over runs, and how many runs met every target."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k not in ("hpir", "met")}
    hpirs = [r["hpir"] for r in rows if r["hpir"] is not None]
    mean["hpir"] = float(np.mean(hpirs)) if hpirs else None
    mean["met"] = f"{sum(r['met'] == 'yes' for r in rows)} of {len(rows)}"
    return mean


def summary_markdown(results: dict) -> str:
    """A row per run and table (results: {run: (metrics, run_targets(metrics))}), the tables
    grouped by their place in each run's order (the headline first), and the mean over runs
    under each."""
    by_place: dict[int, list[tuple[str, str, dict]]] = {}
    for run, (metrics, tables) in results.items():
        for place, name in enumerate(n for n in tables if n != "all_met"):
            row = summary_row(metrics, name, tables[name])
            by_place.setdefault(place, []).append((run, name, row))
    out = [SUMMARY_COLUMNS, "| --- |" + " --- |" * (SUMMARY_COLUMNS.count("|") - 2)]
    for rows in by_place.values():
        if len(rows) > 1:
            rows = [*rows, ("mean", rows[0][1], mean_row([r for _, _, r in rows]))]
        for run, name, r in rows:
            hpir = "-" if r["hpir"] is None else f"{r['hpir']:+.3f}"
            out.append(
                f"| {run} | {name} | {r['base']:.3f} | {r['rewrite']:+.1%} | "
                f"{r['gain']:+.1%} ({r['share']:.2f}) | {r['precision']:+.3f} | "
                f"{r['recall']:+.3f} | {hpir} | {r['met']} |"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="output dirs or metrics.json files")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--markdown", action="store_true", help="tables instead of JSON")
    shown.add_argument("--systems", action="store_true", help="each table's systems instead")
    shown.add_argument("--summary", action="store_true", help="a row per run and table instead")
    args = parser.parse_args()
    if args.systems:
        print("\n".join(systems_markdown(run, read_metrics(run)) for run in args.runs))
        return
    if args.summary:
        metrics = {run: read_metrics(run) for run in args.runs}
        print(summary_markdown({run: (m, run_targets(m)) for run, m in metrics.items()}))
        return
    results = {run: run_targets(read_metrics(run)) for run in args.runs}
    print(markdown(results) if args.markdown else json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
