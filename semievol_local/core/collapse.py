"""Whether a model answers by its questions or by the label prior, from class distributions alone: NumPy-free
counting, and exact binomial tails (scipy). Nothing here reads files or a model.

The collapse rule (`collapsed`): the warm-up model's answers on the unlabeled questions fall on one option at
least `SHARE` of the time while the labeled split's largest class is at most `LABELED_MAX`. A model that
learned the task follows the labeled distribution roughly; one that learned only the prior says the same
option everywhere, and pseudo-labeling would then teach the final fine-tune that option on every question.
Set from measurements on fpb, the demo task and tasks built to collapse: docs/method.md.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

SHARE = 0.90        # at least this share of the warm model's answers on one option ...
LABELED_MAX = 0.70  # ... while the labeled split's largest class holds at most this share


def distribution(labels: Iterable[str | None], classes: Sequence[str] = ()) -> dict[str, float]:
    """Share of each class among `labels` (None, a question with no answer, counts as none of them), with every
    class of `classes` present (0.0 where absent), sorted by class."""
    labels = list(labels)
    counts = Counter(x for x in labels if x is not None)
    n = len(labels)
    keys = sorted(set(classes) | set(counts))
    return {k: (counts.get(k, 0) / n if n else 0.0) for k in keys}


def largest(dist: dict[str, float]) -> tuple[str | None, float]:
    """(class, share) of the largest class; ties go to the first in order."""
    if not dist:
        return None, 0.0
    top = max(dist, key=lambda k: (dist[k], -sorted(dist).index(k)))
    return top, dist[top]


def check(predicted: Sequence[str | None], labeled: Sequence[str], *, share: float = SHARE,
          labeled_max: float = LABELED_MAX) -> dict:
    """The collapse check: the predicted and labeled distributions, their largest classes, and `collapsed`."""
    lab = distribution(labeled)
    pred = distribution(predicted, classes=tuple(lab))
    top, top_share = largest(pred)
    lab_top, lab_share = largest(lab)
    return {"predicted": pred, "labeled": lab, "n": len(predicted), "top": top, "top_share": top_share,
            "labeled_top": lab_top, "labeled_top_share": lab_share,
            "collapsed": bool(len(predicted) and top_share >= share and lab_share <= labeled_max),
            "rule": {"share": share, "labeled_max": labeled_max}}


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exactly (scipy's survival function)."""
    from scipy.stats import binom

    return float(binom.sf(k - 1, n, p)) if k > 0 else 1.0


def beats_majority(correct: int, n: int, majority_share: float) -> float:
    """One-sided exact p that a model with `correct` of `n` right is better than always answering the majority
    class, which is right with probability `majority_share` (the labeled split's largest class share as
    measured on the same questions): P(X >= correct) under that rate. A large p: not shown to be better."""
    return binomial_tail(correct, n, majority_share)
