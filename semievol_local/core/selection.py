"""Collaboration and adaptive selection, as pure NumPy: agreement, averaged distributions, entropy, thresholds.

Inputs are the learners' answers (letters or texts) and their distributions or mean NLLs; outputs are
pseudo-labels, entropies and keep-masks. Nothing here reads files, prompts or touches a model; in
particular nothing here ever sees the unlabeled split's answers.
"""
from __future__ import annotations

import numpy as np


def entropy_rows(p: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each distribution along the last axis, exact (zero probabilities add nothing)."""
    from scipy.special import entr

    return entr(np.asarray(p, dtype=np.float64)).sum(axis=-1)


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (nats) of one distribution: a score's."""
    return float(entropy_rows(p))


def agree(answers: list[list[str | None]]) -> np.ndarray:
    """(N,) True where every learner gave the same, non-empty answer."""
    return np.array([len(set(a)) == 1 and a[0] is not None for a in answers], dtype=bool)


def vote_share(answers: list[str | None], label: str | None) -> float:
    """The share of the n answers that voted for `label` (0 for no label)."""
    if label is None or not answers:
        return 0.0
    return sum(a == label for a in answers) / len(answers)


def majority_vote(answers: list[str | None], key=lambda a: a) -> str | None:
    """The most voted answer (answers equal under `key` vote together; ties: the one given first); None when
    no answer was given."""
    given = [a for a in answers if a is not None]
    if not given:
        return None
    keys = [key(a) for a in given]
    best = max(dict.fromkeys(keys), key=lambda k: (keys.count(k), -keys.index(k)))
    return given[keys.index(best)]


def threshold(entropies: np.ndarray, theta: float) -> float:
    """tau = the theta-percentile of the entropies (Eq. 7); theta in [0, 100]."""
    e = np.asarray(entropies, dtype=np.float64)
    e = e[np.isfinite(e)]
    if len(e) == 0:
        return float("-inf")
    return float(np.percentile(e, theta))


def select(entropies: np.ndarray, theta: float, *, only: np.ndarray | None = None,
           groups: np.ndarray | None = None) -> np.ndarray:
    """Keep-mask (Eq. 8): entropy at or below the theta-percentile.

    With `only` (a boolean mask), the threshold is computed over, and applied to, those items alone;
    the rest are all kept (the official code filters only the self-justified pseudo-labels).
    With `groups` (one key per item, e.g. the pseudo-label's class), each group gets its own
    theta-percentile, so a class whose labels are all less certain than another's is not dropped whole.
    """
    e = np.asarray(entropies, dtype=np.float64)
    if theta >= 100:
        return np.ones(len(e), dtype=bool)
    considered = np.ones(len(e), dtype=bool) if only is None else np.asarray(only, dtype=bool)
    keep = ~considered
    keys = np.zeros(len(e), dtype=int) if groups is None else np.unique(np.asarray(groups, dtype=str),
                                                                          return_inverse=True)[1]
    for g in np.unique(keys[considered]):
        m = considered & (keys == g)
        keep[m] = e[m] <= threshold(e[m], theta)
    return keep
