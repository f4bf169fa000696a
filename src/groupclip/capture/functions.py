"""The two autograd Functions through which every trainable parameter is reached.

`LayerFn` computes a rule-handled layer itself (the weight gradient PyTorch would throw away is never
computed) and hands (saved input, output gradient) to the hub. `Tap` passes a generic unit's outputs
through unchanged (cloned, so later in-place edits stay legal) and catches their gradient. Both take the
unit's trainable parameters as inputs only so that outputs require grad; they return no gradient for them,
the hub writes p.grad itself.
"""

from __future__ import annotations

import torch

from groupclip.capture.context import Use


class LayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hub, unit, names, state, x, *params):
        out, saved, extra = unit.rule.forward(unit.module, x, names, ctx.needs_input_grad[4])
        ctx.save_for_backward(*saved)
        ctx.hub, ctx.unit, ctx.state, ctx.extra = hub, unit, state, {"names": names, **extra}
        ctx.batch = x.shape[0] if x.dim() else 1
        ctx.n_params = len(params)
        return out

    @staticmethod
    def backward(ctx, g):
        use = Use(ctx.unit, ctx.saved_tensors, g, ctx.batch, ctx.extra)
        gx = ctx.unit.rule.input_grad(ctx.unit.module, use, ctx.needs_input_grad[4])
        ctx.hub.on_use(ctx.state, use)
        return (None, None, None, None, gx, *([None] * ctx.n_params))


class Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hub, unit, state, extra, n_out, n_saved, *tensors):
        ctx.set_materialize_grads(False)
        outs = tensors[:n_out]
        ctx.save_for_backward(*tensors[n_out : n_out + n_saved])
        ctx.hub, ctx.unit, ctx.state, ctx.extra = hub, unit, state, extra
        ctx.n_rest = len(tensors) - n_out
        return tuple(o.clone() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        use = Use(ctx.unit, ctx.saved_tensors, grads, ctx.extra["batch"], ctx.extra)
        ctx.hub.on_use(ctx.state, use)
        return (None,) * 6 + tuple(grads) + (None,) * ctx.n_rest
