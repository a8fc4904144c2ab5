import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from align.method.pairing import (
    NotEnoughCandidates,
    candidates_needed,
    grid_layout,
    grid_pairs,
    pair_count,
    partial_order_pairs,
)

shapes = st.tuples(st.integers(1, 6), st.integers(1, 6))


@given(shapes)
def test_pair_count_matches_brute_force_dominance(shape):
    u, v = shape
    cells = list(itertools.product(range(u), range(v)))
    brute = {(a, b) for a in cells for b in cells if a != b and a[0] <= b[0] and a[1] <= b[1]}
    chosen, rejected = partial_order_pairs(u, v)
    got = {(divmod(int(c), v), divmod(int(r), v)) for c, r in zip(chosen, rejected, strict=True)}
    assert got == brute
    assert len(chosen) == pair_count(u, v) == len(brute)


@given(shapes)
def test_no_self_pairs_and_no_pair_in_both_directions(shape):
    chosen, rejected = partial_order_pairs(*shape)
    pairs = set(zip(chosen.tolist(), rejected.tolist(), strict=True))
    assert all(c != r for c, r in pairs)
    assert not any((r, c) in pairs for c, r in pairs)


def test_paper_sized_grid():
    assert pair_count(4, 4) == 84 and pair_count(1, 1) == 0 and pair_count(2, 1) == 1


@settings(max_examples=50)
@given(shapes, st.integers(1, 3), st.integers(0, 10), st.integers(0, 2**31 - 1))
def test_grid_rows_by_semantic_columns_by_aesthetic(shape, stride, extra, seed):
    u, v = shape
    n = candidates_needed(u, v, stride) + extra
    rng = np.random.default_rng(seed)
    semantic, aesthetic = rng.random(n), rng.random(n)
    grid = grid_layout(semantic, aesthetic, u, v, stride)
    # The picked candidates are the stride positions of the semantic order.
    order = np.argsort(-semantic, kind="stable")
    assert sorted(grid.reshape(-1).tolist()) == sorted(
        order[: candidates_needed(u, v, stride) : stride].tolist()
    )
    # Every candidate of row r is at least as relevant as every candidate of row r + 1.
    for r in range(u - 1):
        assert semantic[grid[r]].min() >= semantic[grid[r + 1]].max()
    # Within a row, aesthetics do not increase left to right.
    assert (np.diff(aesthetic[grid], axis=1) <= 0).all()


def test_chosen_is_never_worse_on_either_axis():
    rng = np.random.default_rng(3)
    semantic, aesthetic = rng.random(40), rng.random(40)
    chosen, rejected, c_cells, r_cells = grid_pairs(semantic, aesthetic, 3, 4, 2)
    assert len(chosen) == pair_count(3, 4)
    assert (c_cells[:, 0] <= r_cells[:, 0]).all() and (c_cells[:, 1] <= r_cells[:, 1]).all()
    same_row = c_cells[:, 0] == r_cells[:, 0]
    assert (aesthetic[chosen[same_row]] >= aesthetic[rejected[same_row]]).all()
    assert (semantic[chosen[~same_row]] > semantic[rejected[~same_row]]).all()


def test_too_few_candidates_is_a_clear_error():
    with pytest.raises(NotEnoughCandidates, match="10 candidates.*4x4 grid with stride 1 needs 16"):
        grid_layout(np.zeros(10), np.zeros(10), 4, 4, 1)
