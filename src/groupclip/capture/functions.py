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
    def forward(ctx, hub, plan, state, x, *params):
        unit, x_grad = plan.unit, ctx.needs_input_grad[3]
        rule = unit.rule
        if rule.casts_weights:  # (only such rules take the step's casts: a registered rule may predate them)
            out, saved, extra = rule.forward(unit.module, x, plan.names, x_grad, state.casts)
        else:
            out, saved, extra = rule.forward(unit.module, x, plan.names, x_grad)
        ctx.save_for_backward(*saved)
        # (one attribute: each costs a layer call host time)
        ctx.info = (hub, plan, state, extra, x_grad, x.shape[0] if x.dim() else 1, len(params))
        return out

    @staticmethod
    def backward(ctx, g):
        hub, plan, state, extra, x_grad, batch, n_params = ctx.info
        use = Use(plan, ctx.saved_tensors, g, batch, extra)
        rule = plan.unit.rule
        gx = hub.graphed_input_grad(state, use) if rule.graphs_input_grad and x_grad else None
        if gx is None:
            gx = rule.input_grad(plan.unit.module, use, x_grad)
        hub.on_use(state, use)
        return (None, None, None, gx) + (None,) * n_params


def _direct_apply(fn: type[torch.autograd.Function]):
    """`fn.apply` without its Python layer, or None where this PyTorch has no such entry point. That layer binds
    default arguments for Functions that define `setup_context` (ours do not) and unwraps dead functorch
    wrappers (only alive under functorch transforms, where `apply_layer` takes the full path); it costs each
    layer call ~2 µs of host time on a fast CPU, several times that on a slow one."""
    raw = getattr(torch._C, "_FunctionBase", None)
    raw = None if raw is None else raw.__dict__.get("apply")
    if raw is None or not hasattr(torch._C, "_are_functorch_transforms_active"):
        return None
    return raw.__get__(None, fn)


_LAYER_APPLY = _direct_apply(LayerFn)


def apply_layer(*args):
    """LayerFn.apply(*args)."""
    if _LAYER_APPLY is None or torch._C._are_functorch_transforms_active():
        return LayerFn.apply(*args)
    return _LAYER_APPLY(*args)


class Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hub, plan, state, extra, n_out, n_saved, *tensors):
        ctx.set_materialize_grads(False)
        outs = tensors[:n_out]
        ctx.save_for_backward(*tensors[n_out : n_out + n_saved])
        ctx.hub, ctx.plan, ctx.state, ctx.extra = hub, plan, state, extra
        ctx.n_rest = len(tensors) - n_out
        return tuple(o.clone() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        use = Use(ctx.plan, ctx.saved_tensors, grads, ctx.extra["batch"], ctx.extra)
        ctx.hub.on_use(ctx.state, use)
        return (None,) * 6 + tuple(grads) + (None,) * ctx.n_rest
