"""report's pure parts: the exact McNemar test between two runs' predictions."""
from __future__ import annotations

import pytest


def _eval(correct: list[bool]) -> dict:
    return {"predictions": [{"index": i, "correct": c} for i, c in enumerate(correct)]}


@pytest.mark.parametrize("first,second,only,p", [
    ([True] * 10, [True] * 10, (0, 0), 1.0),                      # same answers: no evidence either way
    ([True] * 8 + [False] * 2, [False] * 8 + [True] * 2, (8, 2), 0.109375),  # 8 vs 2 discordant: 2*P(X<=2), n=10
    ([True] * 6 + [False] * 4, [False] * 6 + [True] * 4, (6, 4), 772 / 1024),  # near balance: a large p
    ([True] * 5 + [False] * 5, [False] * 5 + [True] * 5, (5, 5), 1.0),     # balance: 2 * P(X <= 5) capped at 1
    ([True] * 12, [False] * 12, (12, 0), 2 / 2**12),              # one-sided: 2 * 0.5^12
])
def test_paired_comparison_is_an_exact_mcnemar_test(first, second, only, p):
    from semievol_local.method.report import paired

    got = paired(_eval(first), _eval(second))
    assert (got["only_first"], got["only_second"]) == only and got["n"] == len(first)
    assert got["p_value"] == pytest.approx(p)


def test_a_test_pooled_over_seeds_takes_the_questions_as_units():
    """Per question, the first method's right answers over the seeds minus the second's; a sign test over the
    questions where that differs. A question one method wins in one seed and loses in another counts for
    neither."""
    from semievol_local.method.report import paired_pooled, sign_test

    a1, b1 = _eval([True, True, False, True]), _eval([False, True, True, True])
    a2, b2 = _eval([True, False, True, True]), _eval([False, True, False, True])
    got = paired_pooled([(a1, b1), (a2, b2)])
    # question 0: +2; question 1: -1; question 2: 0 (won once, lost once); question 3: 0
    assert (got["n"], got["first_better"], got["second_better"]) == (4, 1, 1)
    assert got["p_value"] == sign_test(1, 1) == 1.0
    many = [(_eval([True] * 9 + [False]), _eval([False] * 9 + [True]))] * 3
    assert paired_pooled(many)["p_value"] == pytest.approx(sign_test(9, 1)) == pytest.approx(2 * 11 / 1024)
