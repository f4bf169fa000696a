"""groupclip.trees gives torch.utils._pytree's flattening without leaving reference cycles."""

import collections
import gc

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from groupclip import trees

Pair = collections.namedtuple("Pair", "left right")


def _tree():
    t = torch.randn(2, 3)
    return ((t, [1, None, {"b": t * 2, "a": (3.0, "s")}]), {"k": Pair(t, [t])}, ())


def test_flatten_matches_pytorch_and_round_trips():
    tree = _tree()
    leaves, spec = trees.flatten(tree)
    ref_leaves, ref_spec = tree_flatten(tree)
    assert spec == ref_spec
    assert len(leaves) == len(ref_leaves) and all(a is b for a, b in zip(leaves, ref_leaves, strict=True))
    assert all(a is b for a, b in zip(trees.leaves(tree), ref_leaves, strict=True))
    again = tree_unflatten(leaves, spec)
    assert type(again[1]["k"]) is Pair and again[1]["k"].right[0] is tree[1]["k"].right[0]
    assert again[0][1][2]["a"] == (3.0, "s")


def test_flatten_leaves_no_garbage_for_the_collector():
    tree = _tree()
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            trees.flatten(tree)
            trees.leaves(tree)
        ours = gc.collect()
        for _ in range(5):
            tree_flatten(tree)
        theirs = gc.collect()
    finally:
        gc.enable()
    assert ours == 0
    assert theirs > 0  # the reason the module exists: if PyTorch stops leaving cycles, it can go
