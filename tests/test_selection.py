"""selection: agreement, votes, entropy and the theta-percentile keep-mask (Eq. 7-8), pure NumPy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from semievol_local.core.selection import agree, entropy_rows, select, threshold


def test_entropy_rows_in_nats():
    p = np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(entropy_rows(p), [0.0, math.log(3), math.log(2)], atol=1e-9)


def test_agree_needs_one_same_non_empty_answer():
    assert agree([["A", "A"], ["A", "B"], [None, None], ["C"]]).tolist() == [True, False, False, True]


def test_threshold_is_the_theta_percentile_of_the_finite_entropies():
    e = np.array([0.4, 0.1, 0.3, 0.2, np.inf, np.nan])
    assert threshold(e, 50) == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 50))
    assert threshold(e, 0) == 0.1 and threshold(e, 100) == 0.4
    assert threshold(np.array([np.nan]), 50) == float("-inf")  # nothing finite: nothing passes


def test_select_keeps_entropies_at_or_below_the_threshold():
    e = np.array([0.5, 0.1, 0.9, 0.3, 0.7])
    keep = select(e, 40)
    assert keep.tolist() == (e <= np.percentile(e, 40)).tolist() == [False, True, False, True, False]
    assert select(e, 100).all() and select(e, 0).sum() == 1  # theta 0: the most certain one only
    assert select(np.array([0.2, np.inf, 0.1]), 50).tolist() == [False, False, True]  # no answer: never kept


def test_per_class_threshold_keeps_every_class():
    """fpb: every positive pseudo-label was less certain than the neutral ones, so one global percentile
    kept none of them; a percentile per pseudo-label class keeps theta% of each."""
    from semievol_local.core.selection import select

    labels = np.array(["B"] * 6 + ["C"] * 4)
    ent = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.5, 0.6, 0.7, 0.8])
    assert not select(ent, 50, groups=None)[labels == "C"].any()
    keep = select(ent, 50, groups=labels)
    assert keep.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 2
    only = np.array([True] * 3 + [False] * 3 + [True] * 4)  # justified only: the rest are all kept
    assert select(ent, 50, only=only, groups=labels).tolist() == [True, True, False] + [True] * 3 + [True] * 2 + [False] * 2
    assert select(ent, 100, groups=labels).all()


def test_majority_vote_and_vote_share():
    from semievol_local.core.prompts import normalize_text
    from semievol_local.core.selection import majority_vote, vote_share

    assert majority_vote(["B", "A", "B", None]) == "B"
    assert majority_vote(["A", "B"]) == "A"  # a tie goes to the answer given first
    assert majority_vote([None, None]) is None
    assert majority_vote(["Paris.", "paris", "Rome"], key=normalize_text) == "Paris."
    assert vote_share(["B", "A", "B", "B"], "B") == 0.75 and vote_share(["A"], None) == 0.0
