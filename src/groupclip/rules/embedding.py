"""nn.Embedding: per-sample norms from token equality (no B×T×V one-hot), clipped sum by index_add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from groupclip import kernels
from groupclip.rules.base import EngineError, Factors, Rule, ghost_inner, param_dtype_like


class EmbeddingRule(Rule):
    name = "embedding"

    def supports(self, module):
        return type(module).forward is nn.Embedding.forward

    def check(self, module, qualname):
        if module.max_norm is not None:
            raise EngineError(
                f"Embedding '{qualname}' has max_norm={module.max_norm}: it renormalises the rows a batch "
                "looks up, in place, which reveals the batch's tokens outside the clipped gradient. "
                "Set max_norm=None."
            )
        if module.scale_grad_by_freq:
            raise EngineError(
                f"Embedding '{qualname}' has scale_grad_by_freq=True, which scales each sample's gradient by "
                "token counts over the whole batch (samples mix). Set scale_grad_by_freq=False."
            )

    def forward(self, module, x, names, x_grad):
        out = F.embedding(x, module.weight, module.padding_idx)
        return out, (x,), {}

    def input_grad(self, module, use, needs):
        return None

    def _cols(self, use):
        if "cols" not in use.cache:
            idx, g = use.saved[0], use.grad_out
            b, d = idx.shape[0], g.shape[-1]
            idx = idx.flatten(1) if idx.dim() > 1 else idx[:, None]
            g = g.reshape(b, idx.shape[1], d)
            pad = use.unit.module.padding_idx
            if pad is not None:
                g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
            use.cache["cols"] = (idx, g)
        return use.cache["cols"]

    def factors(self, use, name):
        idx, g = self._cols(use)
        return Factors(idx, g, row_index=True)

    def norms2(self, use, names):
        f = self.factors(use, "weight")
        return {"weight": ghost_inner(f, f)}

    def clipped_sum(self, use, coef, name):
        idx, g = self._cols(use)
        p = use.unit.params[name]
        out = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
        out.index_add_(0, idx.flatten(), kernels.scale_rows(g, coef).flatten(0, 1))
        return param_dtype_like(out, p)

    def per_sample(self, use, name):
        idx, g = self._cols(use)
        p = use.unit.params[name]
        out = torch.zeros((idx.shape[0], *p.shape), dtype=g.dtype, device=g.device)
        return out.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
