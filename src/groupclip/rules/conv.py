"""nn.Conv1d/2d/3d: stride, dilation, groups, padding (ints, "same", "valid") and every padding mode.

Per-sample gradients come from patches of the padded input: with L output positions per sample, the
weight of group k sees rows = output gradients (B, L, out/G) and cols = patches (B, L, in/G·K).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from groupclip import kernels
from groupclip.capture.context import Use
from groupclip.rules.base import (
    Factors,
    WeightBiasRule,
    acc_dtype,
    common,
    ghost_inner,
    param_dtype_like,
    prefer_ghost,
)

_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _padded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, L, C_in·K) windows of the padded input, in the weight's (C_in, k1, k2, ...) order."""
    xp = _padded(module, x)
    n = xp.dim() - 2
    for j in range(n):
        k, d, s = module.kernel_size[j], module.dilation[j], module.stride[j]
        xp = xp.unfold(2 + j, (k - 1) * d + 1, s)
        if d > 1:
            xp = xp[..., ::d]
    b, c = xp.shape[:2]
    spatial = xp.shape[2 : 2 + n]
    perm = [0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n)]
    return xp.permute(perm).reshape(b, math.prod(spatial), c * math.prod(module.kernel_size))


class ConvRule(WeightBiasRule):
    name = "conv"

    def supports(self, module):
        return type(module).forward in _FORWARDS

    def forward(self, module, x, names, x_grad):
        out = module._conv_forward(x, module.weight, module.bias)
        return out, (x if "weight" in names or x_grad else None, module.weight), {}

    def input_grad(self, module, use, needs):
        if not needs:
            return None
        x, w, g = use.saved[0], use.saved[1], use.grad_out
        if module.padding_mode == "zeros" and not isinstance(module.padding, str):
            wg = w if w.dtype == g.dtype else w.to(g.dtype)
            return torch.ops.aten.convolution_backward(
                g, x.to(g.dtype), wg, None, module.stride, module.padding, module.dilation,
                False, [0] * len(module.stride), module.groups, [True, False, False],
            )[0]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = module._conv_forward(xr, w.detach(), None)
            return torch.autograd.grad(y, xr, g)[0]

    def _grouped(self, use: Use):
        """rows (B, L, G, out/G) and cols (B, L, G, in/G·K), cached."""
        if "rc" not in use.cache:
            m = use.unit.module
            gr = m.groups
            cols = patches(m, use.saved[0])
            g = use.grad_out
            rows = g.flatten(2).transpose(1, 2)
            rows, cols = common(rows, cols)
            use.cache["rc"] = (rows.unflatten(2, (gr, rows.shape[2] // gr)),
                               cols.unflatten(2, (gr, cols.shape[2] // gr)))
        return use.cache["rc"]

    def factors(self, use, name):
        if name != "weight" or use.unit.module.groups != 1:
            return None
        rows, cols = self._grouped(use)
        return Factors(rows[:, :, 0], cols[:, :, 0])

    def per_sample(self, use, name):
        if name == "bias":
            return self._bias_ps(use)
        if "G" not in use.cache:
            rows, cols = self._grouped(use)
            w = use.unit.params["weight"]
            use.cache["G"] = torch.einsum("blgo,blgk->bgok", rows, cols).reshape(rows.shape[0], *w.shape)
        return use.cache["G"]

    def _bias_ps(self, use):
        if "gb" not in use.cache:
            g = use.grad_out
            g = g.flatten(2)
            use.cache["gb"] = g.sum(2, dtype=acc_dtype(g))
        return use.cache["gb"]

    def _weight_ghost(self, use):
        rows, cols = self._grouped(use)
        t, r, c = rows.shape[1], rows.shape[3], cols.shape[3]
        if not prefer_ghost(t, r, c, rows.shape[0] * rows.shape[2], cols.element_size()):
            return None
        total = 0
        for k in range(rows.shape[2]):
            f = Factors(rows[:, :, k], cols[:, :, k])
            total = total + ghost_inner(f, f)
        return total

    def _weight_sum(self, use, coef, p):
        rows, cols = self._grouped(use)
        rows = kernels.scale_rows(rows, coef)
        return param_dtype_like(torch.einsum("blgo,blgk->gok", rows, cols).reshape(p.shape), p)
