"""Data-parallel training's collectives (MLX's `mx.distributed`, the ring backend over TCP): this process's
group, its share of a micro-batch, gradients summed over every process, rank 0's values everywhere, and
the check that every process trains the same thing. One process alone: each is a no-op."""
from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from ..core.errors import UserError


def group():
    """The MLX distributed group of this process: rank 0 of 1 unless started as one rank of several
    (`--train-hosts`, `mlx.launch`; MLX's `ring` backend, over TCP)."""
    return mx.distributed.init()


def shard(idx: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, bool]:
    """This process's rows of a micro-batch (every world-th row from its rank), and whether it has none
    (then it computes the first row with its mask zeroed: a zero gradient, but the same collective calls)."""
    mine = idx[rank::world]
    return (mine, False) if len(mine) else (idx[:1], True)


def all_sum(tree, g):
    """The sum of a tree of arrays over every process, in one collective call (one flat buffer)."""
    flat = tree_flatten(tree)
    if g.size() == 1 or not flat:
        return tree
    buf = mx.distributed.all_sum(mx.concatenate([v.reshape(-1).astype(mx.float32) for _, v in flat]), group=g)
    pieces, at = {}, 0
    for k, v in flat:
        pieces[k] = buf[at: at + v.size].reshape(v.shape).astype(v.dtype)
        at += v.size
    return tree_map_with_path(lambda path, _: pieces[path], tree)


def from_rank0(tree, g):
    """Rank 0's values of a tree of arrays, on every process (a broadcast written as a sum)."""
    if g.size() == 1:
        return tree
    return all_sum(tree if g.rank() == 0 else tree_map(mx.zeros_like, tree), g)


def same_everywhere(what: str, value: str, g) -> None:
    """Refuse to train when another process holds different `value` (a digest): every host must train on
    the same examples, settings and starting point, or the averaged gradient means nothing."""
    if g.size() == 1:
        return
    mine = mx.array([int(value[i: i + 6], 16) for i in range(0, 36, 6)], dtype=mx.int32)
    total = mx.distributed.all_sum(mine, group=g)
    if not mx.array_equal(total, mine * g.size()).item():
        raise UserError(f"rank {g.rank()} of {g.size()}: {what} differ between the processes; every host needs "
                        "the same model, data and options (the same files at the same paths)")
