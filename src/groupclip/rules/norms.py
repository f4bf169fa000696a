"""LayerNorm, RMSNorm, GroupNorm and affine InstanceNorm: y = x̂ ⊙ w + b with x̂ the normalised input.

Per-sample gradients are G_w = Σ (g ⊙ x̂), G_b = Σ g over every dim but the batch and the affine dims;
both are tiny, so they are instantiated. The input gradient re-runs the (cheap) normalisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from groupclip import kernels
from groupclip.rules.base import EngineError, Rule, acc_dtype, coef_sum, flat_rows


def _reshaped(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """t.reshape(shape), or t itself where it has that shape already (no view to make)."""
    return t if t.shape == shape else t.reshape(shape)


class _NormRule(Rule):
    modules: tuple[type, ...] = ()
    channel_affine = False  # affine params live on dim 1 (GroupNorm/InstanceNorm) or trailing dims

    def supports(self, module):
        return any(type(module).forward is m.forward for m in self.modules)

    def full(self, module, x):
        raise NotImplementedError

    def normalize(self, module, x):
        raise NotImplementedError

    def forward(self, module, x, names, x_grad):
        return self.full(module, x), (x, module.weight), {}

    def _broadcast(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.channel_affine:
            return w.reshape(1, -1, *([1] * (x.dim() - 2)))
        return w

    def _xhat(self, use, with_grad_to=None):
        x = use.saved[0]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if with_grad_to is None:
            return self.normalize(use.unit.module, x)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            xh = self.normalize(use.unit.module, xr)
            (gx,) = torch.autograd.grad(xh, xr, with_grad_to)
        return xh.detach(), gx

    def input_grad(self, module, use, needs):
        g, w = use.grad_out, use.saved[1]
        if not needs:
            return None
        gw = g.to(torch.float32) if g.dtype in (torch.float16, torch.bfloat16) else g
        if w is not None:
            gw = gw * self._broadcast(w.to(gw.dtype), gw)
        xh, gx = self._xhat(use, with_grad_to=gw)
        use.cache["xh"] = xh
        return gx.to(use.saved[0].dtype)

    def _reduce_dims(self, use, g):
        if self.channel_affine:
            return tuple(range(2, g.dim()))
        nshape = use.unit.params.get("weight", use.unit.params.get("bias")).dim()
        return tuple(range(1, g.dim() - nshape))

    def _ps(self, use, name):
        key = "ps_" + name
        if key not in use.cache:
            g = use.grad_out
            dt = acc_dtype(g, use.saved[0])
            g = g.to(dt)
            if name == "weight":
                xh = use.cache.get("xh")
                if xh is None:
                    xh = self._xhat(use)
                g = g * xh.to(dt)
            dims = self._reduce_dims(use, g)
            use.cache[key] = g.sum(dims) if dims else g
        return use.cache[key]

    def norm_parts(self, use, names):
        return [(flat_rows(self._ps(use, n)), False) for n in names]

    def per_sample(self, use, name):
        return self._ps(use, name)

    def compact(self, use):
        for n in use.names:  # the per-sample gradients, (B, C) each, are all the clipped sum needs
            self._ps(use, n)
        use.saved, use.grad_out = (), None
        use.cache.pop("xh", None)

    def clipped_sum(self, use, coef, name):
        return coef_sum(coef, self._ps(use, name), use.unit.params[name])


class LayerNormRule(_NormRule):
    """LayerNorm keeps the forward's mean and 1/std, so its input gradient is PyTorch's fused kernel."""

    name = "layer_norm"
    modules = (nn.LayerNorm,)

    def forward(self, module, x, names, x_grad):
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float32:
            x = x.float()  # autocast runs layer_norm in float32
        w, b = module.weight, module.bias
        if w is not None and w.dtype != x.dtype:
            w, b = w.to(x.dtype), (None if b is None else b.to(x.dtype))
        out, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, w, b, module.eps)
        return out, (x, w, b, mean, rstd), {}

    graphs_input_grad = True

    def input_grad(self, module, use, needs):
        if not needs:
            return None
        dx = self.fused_input_grad(use)
        if dx is not None:  # the per-sample gradients came from the same pass
            return dx
        x, w, b, mean, rstd = use.saved
        g = use.grad_out if use.grad_out.dtype == x.dtype else use.grad_out.to(x.dtype)
        return torch.ops.aten.native_layer_norm_backward(
            g, x, module.normalized_shape, mean, rstd, w, b, [True, False, False])[0]

    def fused_operands(self, use) -> tuple | None:
        """x and the output gradient as (B, T, D), the weight as (D,) or None and eps: the fused backward kernel's
        operands (it computes the row statistics again from x); None where the Triton kernels are off for these
        tensors (`kernels.layer_norm_fits` tells whether that kernel takes them)."""
        x, w = use.saved[0], use.saved[1]
        g = use.grad_out
        if not kernels.active(x, g):
            return None
        btd = self._btd(use)
        return (_reshaped(x, btd), _reshaped(g, btd), None if w is None else w.reshape(-1), use.unit.module.eps)

    def fused_input_grad(self, use, out: torch.Tensor | None = None,
                         operands: tuple | None = None) -> torch.Tensor | None:
        """The input gradient from the fused kernel, which also caches the per-sample gradients of `use.names`; None
        where the kernel does not apply. `out`: a contiguous buffer of x's size and dtype the input gradient is
        written into (`groupclip.tails`); `operands`: `fused_operands(use)`, where the caller has them."""
        ops = self.fused_operands(use) if operands is None else operands
        if ops is None:
            return None
        x3 = ops[0]
        fused = kernels.layer_norm_backward(*ops, out=None if out is None else out.view(x3.shape))
        if fused is None:
            return None
        dx, gw, gb = fused
        shape = (x3.shape[0], *use.unit.module.normalized_shape)
        for n, v in (("weight", gw), ("bias", gb)):
            if n in use.names:
                use.cache["ps_" + n] = _reshaped(v, shape)
        return _reshaped(dx, use.saved[0].shape)

    @staticmethod
    def _btd_operands(use) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, mean, rstd and the output gradient as (B, T, D), (B, T, 1), (B, T, 1), (B, T, D)."""
        x, _, _, mean, rstd = use.saved
        bsz, t, d = btd = LayerNormRule._btd(use)
        return (_reshaped(x, btd), _reshaped(mean, (bsz, t, 1)), _reshaped(rstd, (bsz, t, 1)),
                _reshaped(use.grad_out, btd))

    @staticmethod
    def _btd(use) -> tuple[int, int, int]:
        """(B, T, D) of the saved input: the batch, every dim before the normalised ones, the normalised ones."""
        x, shape = use.saved[0], use.unit.module.normalized_shape
        return x.shape[0], math.prod(x.shape[1 : x.dim() - len(shape)]), math.prod(shape)

    def _ps(self, use, name):
        """Both per-sample gradients in one pass over (x, g): Σ_t g ⊙ x̂ and Σ_t g."""
        key = "ps_" + name
        if key not in use.cache:
            x3, mean3, rstd3, g3 = self._btd_operands(use)
            names = use.names
            gw, gb = kernels.layer_norm_ps(x3, mean3, rstd3, g3,
                                           "weight" in names or name == "weight", "bias" in names or name == "bias")
            shape = (x3.shape[0], *use.unit.module.normalized_shape)
            for n, v in (("weight", gw), ("bias", gb)):
                if v is not None:
                    use.cache["ps_" + n] = _reshaped(v, shape)
        return use.cache[key]

    def full(self, m, x):
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)

    def normalize(self, m, x):
        return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


class RMSNormRule(_NormRule):
    name = "rms_norm"
    modules = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()

    def full(self, m, x):
        return F.rms_norm(x, m.normalized_shape, m.weight, m.eps)

    def normalize(self, m, x):
        return F.rms_norm(x, m.normalized_shape, None, m.eps)


class GroupNormRule(_NormRule):
    name = "group_norm"
    modules = (nn.GroupNorm,)
    channel_affine = True

    def full(self, m, x):
        return F.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)

    def normalize(self, m, x):
        return F.group_norm(x, m.num_groups, None, None, m.eps)


class InstanceNormRule(_NormRule):
    name = "instance_norm"
    modules = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    channel_affine = True

    def check(self, module, qualname):
        if module.track_running_stats:
            raise EngineError(
                f"InstanceNorm '{qualname}' has track_running_stats=True: its running statistics average "
                "over the whole batch and are not clipped or noised. Use track_running_stats=False."
            )

    def full(self, m, x):
        return F.instance_norm(x, None, None, m.weight, m.bias, True, m.momentum or 0.0, m.eps)

    def normalize(self, m, x):
        return F.instance_norm(x, None, None, None, None, True, 0.0, m.eps)
