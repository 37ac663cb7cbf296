"""AC, BC, FC and the lower-triangle mean of a compatibility matrix (fct.sequence_metrics),
against matrices worked by hand (CL2R's definitions, docs/metrics.md)."""

from __future__ import annotations

import pytest

from fct.errors import FCTError
from fct.sequence_metrics import (
    average_compatibility,
    backward_compatibility,
    criterion,
    forward_compatibility,
    lower_mean,
    summarize,
)

#: Three generations. Pairs i > j: (1,0) 12 > 10 yes; (2,0) 9 > 10 no; (2,1) 25 > 20 yes.
M3 = [
    [10.0, None, None],
    [12.0, 20.0, None],
    [9.0, 25.0, 30.0],
]


def test_three_generations_by_hand():
    assert criterion(M3) == [[None, None, None], [True, None, None], [False, True, None]]
    assert average_compatibility(M3) == pytest.approx(2 / 3)
    # BC: last row against the diagonal: ((9 - 10) + (25 - 20)) / 2 = 2
    assert backward_compatibility(M3) == pytest.approx(2.0)
    # FC: each update's cross minus its new/new: ((12 - 20) + (25 - 30)) / 2 = -6.5
    assert forward_compatibility(M3) == pytest.approx(-6.5)
    # mean of the six cells on and below the diagonal: 106 / 6
    assert lower_mean(M3) == pytest.approx(106 / 6)


def test_four_generations_and_ties():
    m = [
        [40.0, None, None, None],
        [40.0, 50.0, None, None],  # a tie: not compatible (strictly greater is asked)
        [45.0, 55.0, 60.0, None],
        [41.0, 49.0, 61.0, 70.0],
    ]
    crit = criterion(m)
    pairs = {(i, j): crit[i][j] for i in range(4) for j in range(i)}
    assert pairs == {
        (1, 0): False,
        (2, 0): True,
        (2, 1): True,
        (3, 0): True,
        (3, 1): False,
        (3, 2): True,
    }
    assert average_compatibility(m) == pytest.approx(4 / 6)
    assert backward_compatibility(m) == pytest.approx(((41 - 40) + (49 - 50) + (61 - 60)) / 3)
    assert forward_compatibility(m) == pytest.approx(((40 - 50) + (55 - 60) + (61 - 70)) / 3)
    assert lower_mean(m) == pytest.approx(sum([40, 40, 50, 45, 55, 60, 41, 49, 61, 70]) / 10)
    s = summarize(m)
    assert s["compatible"] == crit and s["AC"] == average_compatibility(m)


def test_a_perfectly_compatible_chain():
    m = [[10.0, None, None], [11.0, 20.0, None], [12.0, 21.0, 30.0]]
    assert average_compatibility(m) == 1.0


@pytest.mark.parametrize(
    "bad",
    [
        [[1.0]],  # one generation
        [[1.0, None], [2.0]],  # ragged
        [[1.0, 2.0], [2.0, 3.0]],  # a number above the diagonal
        [[1.0, None], [None, 3.0]],  # a hole below it
    ],
)
def test_malformed_matrices_are_refused(bad):
    with pytest.raises(FCTError):
        summarize(bad)


def test_step_flips_compare_each_update_on_the_first_gallery():
    """Update k's flips: M[k][0] (after) against M[k-1][0] (before), query by query; a query
    skipped by either is left out (fct.sequence.step_flips)."""
    import numpy as np

    from fct.sequence import Evaluated, step_flips

    def cell(hits, scored=None):
        hits = np.array(hits, dtype=bool)
        scored = np.ones_like(hits) if scored is None else np.array(scored, dtype=bool)
        return {"hits": hits, "scored": scored}

    cells = {
        (0, 0): cell([1, 1, 0, 0, 1]),
        (1, 0): cell([1, 0, 1, 0, 1]),  # query 1 breaks, query 2 is fixed
        (2, 0): cell([0, 0, 1, 1, 1], scored=[1, 1, 1, 1, 0]),  # 0 breaks, 3 fixed; 4 skipped
        (1, 1): cell([1, 1, 1, 1, 1]),  # other cells play no part
    }
    first, second = step_flips(Evaluated(cells), 3)
    assert first == {"nfr": pytest.approx(100 / 5), "pfr": pytest.approx(100 / 5)}
    assert second == {"nfr": pytest.approx(100 / 4), "pfr": pytest.approx(100 / 4)}
