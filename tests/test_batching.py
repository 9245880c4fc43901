"""batching: examples to padded NumPy batches (truncation, token caps), pure NumPy."""
from __future__ import annotations

import numpy as np
import pytest

from semievol_local.training import batching


@pytest.mark.parametrize("prompt,answer,max_len,tokens,start", [
    ([1, 2, 3], [4, 5], 8, [1, 2, 3, 4, 5], 3),   # fits: unchanged, targets start after the prompt
    ([1, 2, 3, 4], [5, 6], 4, [3, 4, 5, 6], 2),   # too long: the prompt loses tokens on the left
    ([1, 2], [3, 4, 5, 6], 3, [2, 3, 4], 1),      # answer longer than allowed: cut on the right, 1 prompt token kept
    ([], [7, 8, 9], 8, [7, 8, 9], 1),             # no prompt: the first answer token has no context, not trained
])
def test_prepare_truncates_prompt_from_the_left(prompt, answer, max_len, tokens, start):
    [(got, got_start)] = batching.prepare([(prompt, answer)], max_len, "test")
    assert got.tolist() == tokens and got_start == start


def test_split_batch_makes_the_fewest_pieces_under_the_cap():
    lengths = np.array([10, 20, 30, 33, 100, 200, 65, 40])
    idx = np.arange(8)
    assert batching.padded_length(lengths[idx]) == 224  # 199 rounded up to 32
    assert [p.tolist() for p in batching.split_batch(idx, lengths, 8 * 224)] == [idx.tolist()]  # fits: as it is
    assert [p.tolist() for p in batching.split_batch(idx, lengths, -1)] == [idx.tolist()]
    pieces = batching.split_batch(idx, lengths, 700)
    assert sorted(np.concatenate(pieces).tolist()) == idx.tolist()  # every row once
    assert all(len(p) * batching.padded_length(lengths[p]) <= 700 for p in pieces)
    # fewer pieces would not fit: by length, [0,1,2,3] pads to 32 and [7,6,4,5] to 224 (4 x 224 > 700)
    assert len(pieces) == 3, pieces
    assert [p.tolist() for p in batching.split_batch(idx, lengths, 100)][-1] == [5]  # a row over the cap: alone
    batches = [idx, idx[:4], idx[:4]]
    assert batching.typical_max_tokens(batches, lengths) == int(1.5 * 4 * 32)
