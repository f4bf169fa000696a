"""Flattening nested arguments and outputs on the per-step path without leaving garbage for Python's collector.

`torch.utils._pytree.tree_flatten` builds its result with a nested function that refers to itself, so every call
leaves a reference cycle (a function, its cell and their tuples) that only the cyclic garbage collector frees.
On the per-step path (a model call's batch size, a generic layer's arguments, a graphed step's inputs) that is a
few cycles per step, which makes the collector run more often during training. These versions build the same
`TreeSpec` (so `tree_unflatten` takes it) from module-level functions, and fall back to PyTorch's where its
private helpers are missing.
"""

from __future__ import annotations

from typing import Any

import torch.utils._pytree as _pytree

_LEAF = getattr(_pytree, "_LEAF_SPEC", None)
if _LEAF is None and hasattr(_pytree, "LeafSpec"):
    _LEAF = _pytree.LeafSpec()
#: PyTorch's private helpers `flatten` builds on are all there (otherwise PyTorch's own flatten, with its cycle)
_HELPERS = _LEAF is not None and all(hasattr(_pytree, n) for n in ("tree_is_leaf", "_get_node_type",
                                                                    "SUPPORTED_NODES", "TreeSpec"))


def _spec(node: Any, leaves: list) -> Any:
    if _pytree.tree_is_leaf(node):
        leaves.append(node)
        return _LEAF
    kind = _pytree._get_node_type(node)
    children, context = _pytree.SUPPORTED_NODES[kind].flatten_fn(node)
    return _pytree.TreeSpec(kind, context, [_spec(child, leaves) for child in children])


def flatten(tree: Any) -> tuple[list, Any]:
    """(leaves, spec) as `torch.utils._pytree.tree_flatten` gives them, with no reference cycle left behind."""
    if not _HELPERS:
        return _pytree.tree_flatten(tree)
    leaves: list = []
    return leaves, _spec(tree, leaves)


def leaves(tree: Any) -> list:
    """The leaves of `tree` in `flatten`'s order (a generator underneath: no cycle)."""
    if not hasattr(_pytree, "tree_iter"):
        return flatten(tree)[0]
    return list(_pytree.tree_iter(tree))
