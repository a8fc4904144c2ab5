"""Preference pairs from a re-ranked candidate list: the u x v grid
(docs/method.md, Preference data).

1. Order the candidates by semantic score (reference similarity to the ORIGINAL query) and take
   u * v of them with a stride: positions 0, s, 2s, ...
2. Lay them out as a u x v grid: row r holds the r-th group of v (rows by semantic score, row 0
   most relevant); within a row, columns are ordered by aesthetic score (column 0 best).
3. Every two cells where one is at least as good on both axes (row <= row', col <= col') and they
   are not the same cell make a pair (chosen, rejected). The paper ("Ranked DPO") leaves the rule
   unstated; this dominance rule is our decision. It yields
   u(u+1)/2 * v(v+1)/2 - u*v pairs, none in both directions.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class NotEnoughCandidates(ValueError):
    """Fewer candidates than the grid needs."""


def candidates_needed(u: int, v: int, stride: int) -> int:
    """Candidates a u x v grid with this stride reads: positions 0, s, ..., (uv - 1) s."""
    return (u * v - 1) * stride + 1


def pair_count(u: int, v: int) -> int:
    """Number of pairs `partial_order_pairs` yields for a u x v grid."""
    return (u * (u + 1) // 2) * (v * (v + 1) // 2) - u * v


@lru_cache(maxsize=64)
def partial_order_pairs(u: int, v: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell pairs of a u x v grid under the dominance rule.

    Returns:
        (chosen, rejected): int arrays of flat cell indices (row * v + col), one entry per pair.
    """
    rows, cols = np.divmod(np.arange(u * v), v)
    dominates = (rows[:, None] <= rows[None, :]) & (cols[:, None] <= cols[None, :])
    np.fill_diagonal(dominates, False)
    chosen, rejected = np.nonzero(dominates)
    chosen.setflags(write=False)
    rejected.setflags(write=False)
    return chosen, rejected


def grid_layout(
    semantic: np.ndarray, aesthetic: np.ndarray, u: int, v: int, stride: int
) -> np.ndarray:
    """Candidate positions laid out as the u x v grid.

    Args:
        semantic, aesthetic: scores of one query's candidates (any order).
        u, v, stride: grid shape and stride.
    Returns:
        int array (u, v) of candidate positions; [r, c] is the cell's candidate.
    Raises:
        NotEnoughCandidates: when there are fewer than candidates_needed(u, v, stride).
    """
    need = candidates_needed(u, v, stride)
    if len(semantic) < need:
        raise NotEnoughCandidates(
            f"{len(semantic)} candidates, the {u}x{v} grid with stride {stride} needs {need}"
        )
    by_semantic = np.argsort(-np.asarray(semantic), kind="stable")
    picked = by_semantic[:need:stride].reshape(u, v)
    within_row = np.argsort(-np.asarray(aesthetic)[picked], axis=1, kind="stable")
    return np.take_along_axis(picked, within_row, axis=1)


def grid_pairs(semantic: np.ndarray, aesthetic: np.ndarray, u: int, v: int, stride: int):
    """Pairs of candidate positions for one query.

    Returns:
        (chosen positions, rejected positions, chosen cells, rejected cells); cells are (n, 2)
        arrays of (row, col).
    """
    grid = grid_layout(semantic, aesthetic, u, v, stride).reshape(-1)
    chosen, rejected = partial_order_pairs(u, v)
    cells = np.stack(np.divmod(np.arange(u * v), v), axis=1)
    return grid[chosen], grid[rejected], cells[chosen], cells[rejected]
