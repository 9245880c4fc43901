"""Training examples -> padded batches, in NumPy: truncation, length-bucketed shuffling, answer-only targets.

An example is `(prompt_ids, answer_ids)`; only answer tokens are trained. Every function here is a pure
function of its inputs and a seed, so a resumed run rebuilds exactly the batches it would have seen.
It knows nothing about models, engines or files.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np

from ..core.errors import UserError

log = logging.getLogger(__name__)

Example = tuple[list[int], list[int]]  # (prompt_ids, answer_ids)
Seq = tuple[np.ndarray, int]  # (tokens int32, index of the first target token)

PAD_SEQ, PAD_ANSWER = 32, 8  # batch shapes round up to these: few distinct shapes, few recompiles
SORT_CHUNK = 16  # batches per shuffled chunk that is sorted by length (small padding, still random order)


def prepare(examples: list[Example], max_seq_len: int, what: str) -> list[Seq]:
    """(tokens, first target index) per usable example. Long prompts are cut from the left, long answers
    from the right, so every kept example has at least one trained answer token with context before it."""
    if max_seq_len < 2:
        raise UserError(f"max_seq_len is {max_seq_len}; it must be at least 2 tokens.")
    out, skipped = [], 0
    for prompt, answer in examples:
        answer = list(answer)[: max_seq_len - 1]
        prompt = list(prompt)[-(max_seq_len - len(answer)):] if prompt else []
        tokens = np.array(prompt + answer, dtype=np.int32)
        start = max(len(prompt), 1)  # tokens[start:] are targets; token 0 has nothing to be predicted from
        if len(tokens) - start < 1:
            skipped += 1
            continue
        out.append((tokens, start))
    if skipped:
        log.warning("%d %s example(s) have no answer tokens to train on and were skipped", skipped, what)
    if examples and not out:
        raise UserError(f"None of the {len(examples)} {what} examples has answer tokens to train on.")
    return out


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Shuffle, sort by length inside chunks of SORT_CHUNK batches, cut batches, shuffle the batches.
    Every epoch yields ceil(n / batch_size) batches; only a chunk's last batch can be short."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches = []
    for c in range(0, len(order), batch_size * SORT_CHUNK):
        chunk = order[c: c + batch_size * SORT_CHUNK]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def padded_length(lengths) -> int:
    """The input length `collate` pads a batch of sequences of these lengths to (the longest less one, rounded up)."""
    return -(-(int(np.max(lengths)) - 1) // PAD_SEQ) * PAD_SEQ


def typical_max_tokens(batches: list[np.ndarray], lengths: np.ndarray, factor: float = 1.5) -> int:
    """`factor` x the median batch's padded tokens (rows x padded length): the default largest micro-batch."""
    return int(factor * np.median([len(b) * padded_length(lengths[b]) for b in batches]))


def split_batch(idx: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """The batch `idx` as the fewest pieces (rows by length, each piece padded to its own longest) of at most
    `max_tokens` padded tokens each, or as it is when it fits or `max_tokens` <= 0. A single row longer than
    `max_tokens` stays a piece of its own. The pieces' gradients add up to the batch's (up to rounding), so a
    rare long batch costs the memory of a typical one."""
    idx = np.asarray(idx)
    if max_tokens <= 0 or len(idx) * padded_length(lengths[idx]) <= max_tokens:
        return [idx]
    rows = idx[np.argsort(lengths[idx], kind="stable")]
    for n in range(2, len(rows) + 1):
        pieces = np.array_split(rows, n)
        if all(len(q) * padded_length(lengths[q]) <= max_tokens for q in pieces):
            return pieces
    return [rows[i: i + 1] for i in range(len(rows))]


def collate(seqs: list[Seq], idx) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """inputs (B, L) int32, pos/targets (B, A) int32, mask (B, A) float32, L and A rounded up to buckets.
    pos[b, j] is the input position whose logits predict targets[b, j]: logits are only needed there."""
    rows = [seqs[i] for i in idx]
    L = padded_length([len(t) for t, _ in rows])
    A = -(-max(len(t) - s for t, s in rows) // PAD_ANSWER) * PAD_ANSWER
    inputs = np.zeros((len(rows), L), np.int32)  # right padding: causal attention never looks at it
    pos = np.zeros((len(rows), A), np.int32)
    targets = np.zeros((len(rows), A), np.int32)
    mask = np.zeros((len(rows), A), np.float32)
    for r, (t, start) in enumerate(rows):
        inputs[r, : len(t) - 1] = t[:-1]
        k = len(t) - start
        pos[r, :k] = np.arange(start - 1, len(t) - 1)
        targets[r, :k] = t[start:]
        mask[r, :k] = 1.0
    return inputs, pos, targets, mask


def validation_positions(n: int, fraction: float, seed: int) -> list[int]:
    """Which of `n` rows a `fraction` holds out (seeded, sorted); none when either side would be empty."""
    n_val = int(round(fraction * n))
    if n_val < 1 or n - n_val < 1:
        return []
    return sorted(np.random.default_rng([seed, 7]).permutation(n)[:n_val].tolist())


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the rows (seeded); nothing when that would leave either side empty."""
    val = set(validation_positions(len(examples), fraction, seed))
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def fingerprint(seqs: list[Seq]) -> str:
    """sha256 of the prepared token ids: a resumed run must train on the same data."""
    h = hashlib.sha256()
    for t, s in seqs:
        h.update(np.int64(s).tobytes() + t.tobytes() + b"|")
    return h.hexdigest()
