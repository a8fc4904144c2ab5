"""The judge's side of an evaluation, without the model call: each comparison becomes two calls
(A's row first, then B's), the answers become order-consistent verdicts and win/similar/loss
rates, and the synthetic world's oracle answers from the ground truth."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from align.data.contracts import HPIR_DIMENSIONS
from align.evaluation import metrics
from align.evaluation.gallery import GroundTruth


def paired_requests(name: str, query: str, facts: dict, row_a: np.ndarray, row_b: np.ndarray):
    """The two judge calls of one comparison: A's row first, then B's row first."""
    return [
        {
            "request_id": f"{name}|ab",
            "query": query,
            "facts": facts,
            "first": row_a,
            "second": row_b,
        },
        {
            "request_id": f"{name}|ba",
            "query": query,
            "facts": facts,
            "first": row_b,
            "second": row_a,
        },
    ]


def verdicts(answers: dict[str, str], names: list[str]) -> list[str]:
    """Order-consistent verdicts; a call with no answer counts as similar."""
    return [
        metrics.consistent_verdict(
            answers.get(f"{n}|ab", metrics.SIMILAR), answers.get(f"{n}|ba", metrics.SIMILAR)
        )
        for n in names
    ]


@dataclass
class JudgeCalls:
    """Every judge call of an evaluation, and which calls make up each verdict."""

    requests: list[dict] = field(default_factory=list)
    by_comparison: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    hpir_items: list[tuple[int, str]] = field(default_factory=list)  # (HPIR row, call name)


def comparison_calls(
    comparisons: list[tuple[str, str]],
    texts: list[str],
    facts: dict[str, np.ndarray] | None,
    tops: dict[str, np.ndarray],
) -> JudgeCalls:
    """Two calls per query and (A, B) comparison; a row with fewer than k results is skipped."""
    calls = JudgeCalls()
    for a, b in comparisons:
        calls.by_comparison[(a, b)] = []
        for q, text in enumerate(texts):
            if (tops[a][q] < 0).any() or (tops[b][q] < 0).any():
                continue
            name = f"{a}~{b}~{q}"
            calls.by_comparison[(a, b)].append(name)
            f = {c: facts[c][q] for c in facts} if facts else {}
            calls.requests += paired_requests(name, text, f, tops[a][q], tops[b][q])
    return calls


def add_hpir_calls(
    calls: JudgeCalls,
    queries: list[str],
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    k: int,
    facts: dict[str, np.ndarray] | None,
) -> None:
    """Two calls per HPIR item whose rows are complete and k long (rows: hpir.hpir_rows)."""
    row_a, row_b, complete = rows
    for m in np.flatnonzero(complete & (row_a.shape[1] == k)):
        name = f"hpir~{m}"
        calls.hpir_items.append((int(m), name))
        f = {c: facts[c][m] for c in facts} if facts else {}
        calls.requests += paired_requests(name, queries[m], f, row_a[m], row_b[m])


def oracle_answers(requests: list[dict], gt: GroundTruth, margin: float) -> dict[str, str]:
    """The synthetic world's judge: request_id -> first|second|similar from the ground truth
    (relevance first, then true aesthetic: the <ranker> order, docs/method.md, Evaluation)."""
    facts = {c: [r["facts"][c] for r in requests] for c in ("colour", "shape", "background")}
    quality = []
    for key in ("first", "second"):
        top = np.stack([r[key] for r in requests])
        quality.append(metrics.oracle_row_quality(gt.relevance(facts, top), gt.true_aesthetic[top]))
    answers = metrics.oracle_answer(quality[0], quality[1], margin)
    return dict(zip([r["request_id"] for r in requests], answers, strict=True))


def comparison_rates(calls: JudgeCalls, answers: dict[str, str]) -> dict[str, dict]:
    """`A_vs_B` -> win/similar/loss rates of A over B."""
    return {
        f"{a}_vs_{b}": metrics.verdict_rates(verdicts(answers, names))
        for (a, b), names in calls.by_comparison.items()
    }


def hpir_agreement(calls: JudgeCalls, answers: dict[str, str], hpir: pa.Table) -> dict:
    """The judge's own confidence-weighted agreement with the people, per HPIR dimension."""
    if not calls.hpir_items:
        return {}
    items = np.array([m for m, _ in calls.hpir_items])
    picked = verdicts(answers, [n for _, n in calls.hpir_items])
    prefers_a = np.array([{"win": 1.0, "loss": 0.0}.get(v, 0.5) for v in picked])
    out = {}
    for dim in HPIR_DIMENSIONS:
        preferred = np.asarray(hpir[f"{dim}_preferred"].to_pylist(), dtype=object)[items]
        confidence = hpir[f"{dim}_confidence"].to_numpy(zero_copy_only=False)[items]
        out[dim] = metrics.hpir_agreement(prefers_a, preferred, confidence)
    return out
