"""Autocast copies of the layers' weights, made for one step in one batched copy.

Under autocast a Linear layer's forward computes with a low-precision copy of its weight and bias (and keeps that
copy for its input gradient). Made one layer at a time, each copy is a Python `.to` call and a kernel launch, about
20 µs of host time apiece on an H100's host: ~3 ms a step for ViT-base's 74 layers, which a host-bound loop pays in
full. `StepCasts` makes the copies of every such tensor of the model (of one device and dtype) at the first one a step
asks for, with one `torch._foreach_copy_` into one buffer, and hands out views of it.

What a copy holds: the tensor's values when the step made its copies. They live in the step's state (`StepState`),
which ends with the step's backward pass, so no copy outlives its step; inside a step a copy is handed out only while
the tensor's version counter has not moved since it was made (an in-place update through the parameter between two
forwards of one step, e.g. `optimizer.step()` or `copy_()`, gets a copy of its own, made then). Under a CUDA graph
capture (`engine.graphed_backward`), and for tensors that are not the model's own (e.g. `torch.func.functional_call`
passes others), each copy is made on its own, as before.

The step keeps one tensor object per batch, not one per copy: objects that outlive many allocations are what
Python's garbage collector walks, and ~150 of them kept per step made its full collections several times as frequent
(2.5 ms a step on the CPU proxy).
"""

from __future__ import annotations

import torch

from groupclip.tails import _contiguous_strides, capturing


class CastPlan:
    """The tensors rules cast (fixed per engine), in batches of one device and dtype, with their places in a batch's
    flat buffer."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        batches: dict[tuple, list[torch.Tensor]] = {}
        for t in {id(t): t for t in tensors}.values():
            if t.is_floating_point() and t.dtype != torch.float64:  # (autocast leaves float64 as it is)
                batches.setdefault((t.device, t.dtype), []).append(t)
        self.batches = list(batches.values())
        # id(tensor) -> (tensor, batch, position in it, shape, strides, offset in the flat buffer)
        self.where: dict[int, tuple] = {}
        for bi, ts in enumerate(self.batches):
            offset = 0
            for j, t in enumerate(ts):
                self.where[id(t)] = (t, bi, j, t.shape, _contiguous_strides(t.shape), offset)
                offset += t.numel()
        self.numels = [sum(t.numel() for t in ts) for ts in self.batches]


class StepCasts:
    """The autocast copies of one step."""

    __slots__ = ("_plan", "_made")

    def __init__(self, plan: CastPlan) -> None:
        self._plan = plan
        # (batch, dtype) -> (flat buffer of the copies, the sources' versions when they were made, its device index)
        self._made: dict[tuple[int, torch.dtype], tuple[torch.Tensor, list[int], int]] = {}

    def get(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`t.to(dtype)`: a view of the step's batched copy where t is one of the plan's tensors and unchanged since
        the copy was made, else a copy of its own."""
        where = self._plan.where.get(id(t))
        if where is None or where[0] is not t or capturing():
            return t.to(dtype)
        return self._view(t, where, self._batch(where[1], dtype), dtype)

    def pair(self, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype):
        """(`get(w, dtype)`, `get(b, dtype)` or None where b is None) in one call: a layer's weight and bias, the
        common case of one batch, with one lookup of the batch's copy (a Linear layer's forward asks for both)."""
        where = self._plan.where
        ww = where.get(id(w))
        wb = None if b is None else where.get(id(b))
        if (ww is None or ww[0] is not w or (b is not None and (wb is None or wb[0] is not b or wb[1] != ww[1]))
                or capturing()):
            return self.get(w, dtype), (None if b is None else self.get(b, dtype))
        made = self._batch(ww[1], dtype)
        return self._view(w, ww, made, dtype), (None if b is None else self._view(b, wb, made, dtype))

    def _batch(self, bi: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[int], int]:
        made = self._made.get((bi, dtype))
        if made is None:
            made = self._made[(bi, dtype)] = self._make(bi, dtype)
        return made

    @staticmethod
    def _view(t: torch.Tensor, where: tuple, made: tuple, dtype: torch.dtype) -> torch.Tensor:
        flat, versions, device = made
        _, _, j, shape, strides, offset = where
        if versions[j] != t._version or t.get_device() != device:
            # changed in place since (the batch's other copies may still be read: saved for backward), or moved to
            # another device than the batch's first tensor
            return t.to(dtype)
        return torch.as_strided(flat, shape, strides, offset)

    def _make(self, bi: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[int], int]:
        ts = self._plan.batches[bi]
        flat = torch.empty(self._plan.numels[bi], dtype=dtype, device=ts[0].device)
        torch._foreach_copy_(torch._utils._unflatten_dense_tensors(flat, ts), ts)
        return flat, [t._version for t in ts], flat.get_device()


def cast_sources(modules) -> list[torch.Tensor]:
    """The weight and bias tensors of `modules` (what a `CastPlan` batches)."""
    out = []
    for m in modules:
        for name in ("weight", "bias"):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                out.append(t)
    return out

