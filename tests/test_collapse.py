"""The collapse rule and the binomial test (`core.collapse`): pure counting, checked against hand values and
brute force."""
from __future__ import annotations

import math

import pytest

from semievol_local.core import collapse


def test_distribution_counts_every_class_and_none_as_no_class():
    d = collapse.distribution(["A", "B", "A", None], classes=("A", "B", "C"))
    assert d == {"A": 0.5, "B": 0.25, "C": 0.0}
    assert collapse.distribution([]) == {}
    assert collapse.largest({"A": 0.4, "B": 0.4, "C": 0.2}) == ("A", 0.4)  # a tie goes to the first


@pytest.mark.parametrize("predicted,labeled,collapsed", [
    (["A"] * 95 + ["B"] * 5, ["A"] * 40 + ["B"] * 35 + ["C"] * 25, True),    # one answer, a balanced prior
    (["A"] * 90 + ["B"] * 10, ["A"] * 70 + ["B"] * 30, True),                # both bounds inclusive
    (["A"] * 89 + ["B"] * 11, ["A"] * 40 + ["B"] * 60, False),               # under 90%: a skewed model
    (["A"] * 100, ["A"] * 71 + ["B"] * 29, False),                            # the labeled split is that skewed itself
    (["B"] * 60 + ["A"] * 40, ["B"] * 60 + ["A"] * 40, False),               # follows the labels (fpb-like)
    ([None] * 95 + ["A"] * 5, ["A", "B"] * 10, False),                        # no answers: not one class
])
def test_the_rule(predicted, labeled, collapsed):
    got = collapse.check(predicted, labeled)
    assert got["collapsed"] is collapsed
    assert got["rule"] == {"share": collapse.SHARE, "labeled_max": collapse.LABELED_MAX}
    assert set(got["predicted"]) >= set(got["labeled"]) and got["n"] == len(predicted)


def test_binomial_tail_is_exact():
    n, p = 12, 0.3
    for k in range(0, n + 2):
        brute = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert collapse.binomial_tail(k, n, p) == pytest.approx(brute, rel=1e-12, abs=1e-15)
    assert collapse.binomial_tail(3, 5, 0.0) == 0.0 and collapse.binomial_tail(3, 5, 1.0) == 1.0
    # n in the thousands (fpb's test split and beyond) without overflow
    assert 0.0 < collapse.binomial_tail(1000, 1500, 0.6) < 1e-6 < 0.5 < collapse.binomial_tail(890, 1500, 0.6) < 0.9


def test_beats_majority_says_when_a_model_is_no_better_than_the_prior():
    # fpb: SFT 0.932 of 453 against the majority 0.603: far better
    assert collapse.beats_majority(round(0.932 * 453), 453, 0.603) < 1e-30
    # a warm-up that answers the majority class everywhere scores the majority's rate: p near 1/2 or above
    assert collapse.beats_majority(round(0.603 * 453), 453, 0.603) > 0.4
