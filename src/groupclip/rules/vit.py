"""transformers' ViTEmbeddings: the cls token and the position embeddings, whose per-sample gradients are slices of
the module's output gradient.

The module computes out = dropout(cat(cls_token expanded over the batch, patch embeddings) + position_embeddings).
With the dropout inactive (p = 0, ViT's default, or eval mode), no mask token and no interpolated positions, sample
i's gradient of position_embeddings is its output gradient g_i (N+1, D) and that of cls_token is g_i's first row: no
per-sample re-run of the module is needed (the generic rule's vmap re-run costs about a forward and backward of the
module per step, and it holds the patch convolution's output until backward). Any other call (a mask, interpolated
positions, active dropout, a changed forward) takes the generic rule's path, decided per call in forward. Matched by
class name, so transformers stays optional.
"""

from __future__ import annotations

import torch
from torch import nn

from groupclip.capture.context import Use
from groupclip.rules.generic import GenericRule

_DIRECT = ("cls_token", "position_embeddings", "mask_token")


class HFViTEmbeddingsRule(GenericRule):
    name = "hf_vit_embeddings"

    def supports(self, module: nn.Module) -> bool:
        return (type(module).__name__ == "ViTEmbeddings"
                and isinstance(getattr(module, "cls_token", None), nn.Parameter)
                and isinstance(getattr(module, "position_embeddings", None), nn.Parameter)
                and isinstance(getattr(module, "dropout", None), nn.Dropout)
                and isinstance(getattr(module, "patch_embeddings", None), nn.Module)
                and {n for n, _ in module.named_parameters(recurse=False)} <= set(_DIRECT))

    def forward_facts(self, module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
        """{"slices": True} where this call's per-sample gradients are slices of its output gradient."""
        if getattr(type(module).forward, "__qualname__", "") != "ViTEmbeddings.forward":
            return None  # a subclass with its own forward
        names = ("pixel_values", "bool_masked_pos", "interpolate_pos_encoding")
        if len(args) > len(names) or any(k not in names for k in kwargs):
            return None
        given = dict(zip(names, args, strict=False)) | kwargs
        drop = module.dropout
        if (given.get("bool_masked_pos") is not None or given.get("interpolate_pos_encoding")
                or (drop.training and drop.p > 0)):
            return None
        return {"slices": True}

    def per_sample_all(self, use: Use, bypass) -> dict[str, torch.Tensor]:
        if "ps" in use.cache or not use.extra.get("slices"):
            return super().per_sample_all(use, bypass)
        params, b = use.unit.params, use.batch_size
        g = use.grad_out[0] if len(use.grad_out) == 1 else None
        pos = params["position_embeddings"]
        if g is not None and tuple(g.shape) != (b, *pos.shape[1:]):
            return super().per_sample_all(use, bypass)  # not the shapes this rule knows
        ps = {}
        for n in use.names:
            p = params[n]
            if g is None or n == "mask_token":  # no gradient reached the output; the mask token is unused
                ps[n] = torch.zeros((b, *p.shape), dtype=p.dtype, device=p.device)
            else:
                rows = g if n == "position_embeddings" else g[:, :1]
                ps[n] = rows.unsqueeze(1).to(p.dtype)
        use.cache["ps"] = ps
        use.extra.pop("replay", None)
        return ps
