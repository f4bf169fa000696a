"""nn.Linear (any number of leading dims) and transformers' Conv1D (y = x W + b, W stored in×out)."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from groupclip import kernels
from groupclip.capture.context import Use
from groupclip.rules.base import (
    _MEMOS_OFF,
    _STEP_MEMOS,
    Factors,
    WeightBiasRule,
    acc_dtype,
    chunked_norms,
    common,
    ghost_inner,
    mm_into,
    prefer_chunks,
    prefer_ghost,
    scaled_input,
)


class _LastInput:
    """The input the last Linear layer of this step read, by identity and version: its autocast copy and its
    `kernels.SharedInput` (the layers that read it), which the next layers reading the very same tensor (q, k and v
    read one hidden state) share: one cast, and one Gram of it in backward.

    Keeps a weak reference to the input, never the input itself (it would keep a failed step's graph alive), and the
    copy only where one was made (under autograd off: no history). Cleared with the step's memos."""

    __slots__ = ("ref", "version", "dtype", "copy", "shared")

    def __init__(self) -> None:
        self.clear()
        _STEP_MEMOS.append(self)

    def clear(self) -> None:
        self.ref = self.version = self.dtype = self.copy = self.shared = None

    def empty(self) -> bool:
        return self.ref is None and self.copy is None and self.shared is None

    def read(self, x: torch.Tensor, dt: torch.dtype | None, weight: bool):
        """(x cast to dt as autocast would (dt None: as it is), its SharedInput or None where `weight` is False)."""
        if _MEMOS_OFF[0]:
            return _autocast_copy(x, dt), (kernels.SharedInput() if weight else None)
        ref = self.ref
        if ref is None or ref() is not x or self.version != x._version or self.dtype != dt:
            copy = _autocast_copy(x, dt)
            self.ref, self.version, self.dtype = weakref.ref(x), x._version, dt
            self.copy = copy if copy is not x else None
            self.shared = None
        shared = self.shared
        if weight and shared is None:
            shared = self.shared = kernels.SharedInput()
        return (x if self.copy is None else self.copy), shared


def _autocast_copy(x: torch.Tensor, dt: torch.dtype | None) -> torch.Tensor:
    if dt is None or not x.is_floating_point() or x.dtype == dt or x.dtype == torch.float64:  # (as autocast)
        return x
    return x.to(dt)


LAST_INPUT = _LastInput()


def _as_btd(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dim() == 3 and t.shape[0] == batch:  # already (B, T, d): no view to make
        return t
    return t.reshape(batch, math.prod(t.shape[1:-1]), t.shape[-1])


class LinearRule(WeightBiasRule):
    name = "linear"
    transposed = False  # Conv1D stores the weight as (in, out)

    def supports(self, module: nn.Module) -> bool:
        return type(module).forward is nn.Linear.forward

    casts_weights = True

    def forward(self, module, x, names, x_grad, casts=None):
        w, b = module.weight, module.bias
        dev = "cuda" if x.is_cuda else x.device.type
        weight = "weight" in names
        if torch.is_autocast_enabled(dev):
            # keep the low-precision copy autocast would make anyway, not the wider input; layers reading the same
            # input (q, k, v) share one copy, which also lets them share its Gram matrix
            dt = torch.get_autocast_dtype(dev)
            x, shared = LAST_INPUT.read(x, dt, weight)
            # cast the weight once here and keep that copy for the input gradient (autocast would cast it too);
            # the step's copies of every layer's weights are made in one batch (`StepCasts`)
            cast_w = w.dtype != dt and w.dtype != torch.float64
            cast_b = b is not None and b.dtype != dt and b.dtype != torch.float64
            if casts is not None and cast_w and cast_b and b.dtype == w.dtype:
                w, b = casts.pair(w, b, dt)
            else:
                if cast_w:
                    w = w.to(dt) if casts is None else casts.get(w, dt)
                if cast_b:
                    b = b.to(dt) if casts is None else casts.get(b, dt)
        else:
            x, shared = LAST_INPUT.read(x, None, weight)
        if self.transposed:
            w = w.t()
        out = F.linear(x, w, b)
        if not weight:
            return out, (None, w), {}
        # q, k and v read one input: their fused ghost kernels can share its Gram tiles in backward, and under one
        # coefficient (all-layer clipping) its scaled copy for the clipped sums
        shared.readers += 1
        return out, (x, w), {"input": shared}

    def input_grad(self, module, use, needs):
        if not needs:
            return None
        w = use.saved[1]
        g = use.grad_out
        return g.matmul(w if w.dtype == g.dtype else w.to(g.dtype))

    def factors(self, use: Use, name: str) -> Factors | None:
        if name != "weight":
            return None
        f = use.cache.get("f")
        if f is None:
            a = _as_btd(use.saved[0], use.batch_size)
            g = _as_btd(use.grad_out, use.batch_size)
            f = use.cache["f"] = Factors(a, g) if self.transposed else Factors(g, a)
        return f

    def per_sample(self, use, name):
        if name == "bias":
            return self._bias_ps(use)
        if "G" not in use.cache:
            f = self.factors(use, name)
            r, c = common(f.rows, f.cols)
            use.cache["G"] = torch.bmm(r.transpose(1, 2), c)
        return use.cache["G"]

    def _bias_ps(self, use):
        if "gb" not in use.cache:
            g = _as_btd(use.grad_out, use.batch_size)
            use.cache["gb"] = g.sum(1, dtype=acc_dtype(g))
        return use.cache["gb"]

    def _weight_ghost_part(self, use):
        f = self.factors(use, "weight")
        b, t, r = f.rows.shape
        c, elem = f.cols.shape[2], f.cols.element_size()
        if not prefer_ghost(t, r, c, b, elem):
            return None
        if prefer_chunks(t, r, c, b, elem):
            return chunked_norms(f.rows, f.cols)[:, None], True
        if kernels.use_ghost_kernel(f.rows, f.cols):  # one fused launch, no Gram matrices in memory
            x, g = self._input_and_grad(f)
            return kernels.ghost_partials(x, g, use.extra.get("input")), True
        return ghost_inner(f, f).unsqueeze(1), True

    def _input_and_grad(self, f: Factors) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input and its output gradient (B, T, ·) from its weight factors, in one dtype."""
        r, c = common(f.rows, f.cols)
        return (r, c) if self.transposed else (c, r)

    def _weight_sum(self, use, coef, p):
        x, g = self._input_and_grad(self.factors(use, "weight"))
        # float32 on the GPU: the scaled copy is written feature-major, so the TF32 product below reads one operand
        # along the summed B·T dimension (cuBLAS runs it 1.1-1.5x as fast; `kernels.k_major_scaling`)
        k_major = kernels.k_major_scaling(x)
        if x.shape[2] <= g.shape[2]:  # scale the narrower factor; on a tie the input, which q, k, v share
            shared = use.extra.get("input")
            x = scaled_input(x, coef, shared is not None and shared.readers > 1, k_major)
        else:
            g = kernels.scale_rows(g, coef, k_major)
        r, c = (x, g) if self.transposed else (g, x)
        return mm_into(r.flatten(0, 1).t(), c.flatten(0, 1), p)


class HFConv1DRule(LinearRule):
    """transformers.pytorch_utils.Conv1D, matched by class name so transformers stays optional."""

    name = "hf_conv1d"
    transposed = True

    def supports(self, module):
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")
