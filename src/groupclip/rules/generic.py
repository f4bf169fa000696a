"""Generic fallback: exact per-sample gradients of any module's parameters with torch.func.

Used for modules without a dedicated rule (LSTM/GRU/RNN, MultiheadAttention, custom norms, raw parameters
such as a ViT cls token or layer-scale vectors). The module runs normally in the forward with its own
parameters detached; in the backward its output gradient arrives through a tap, and the per-sample
gradient of its parameters is a vmapped vector-Jacobian product over a per-sample re-run of the module.
Dropout inside such a module is re-drawn in that re-run, so use it with dropout off for exact gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_unflatten

from groupclip import trees
from groupclip.capture.context import Use
from groupclip.rules.base import EngineError, Rule, coef_sum, sq_norms


def _batch_dim(full: torch.Size, one: torch.Size, batch: int) -> int | None:
    if len(full) != len(one):
        return None
    for d in range(len(full)):
        if full[d] == batch and one[d] == 1 and full[:d] == one[:d] and full[d + 1 :] == one[d + 1 :]:
            return d
    return None


def grads_device(grads) -> torch.device:
    return next(g.device for g in grads if g is not None)


class GenericRule(Rule):
    name = "generic"
    in_function = False

    def __init__(self) -> None:
        self._expand_frozen: set[int] = set()  # units whose re-run needs every weight batched

    def supports(self, module):
        return True

    def per_sample_all(self, use: Use, bypass) -> dict[str, torch.Tensor]:
        if "ps" in use.cache:
            return use.cache["ps"]
        unit, b = use.unit, use.batch_size
        names = use.names
        leaves = list(use.extra["leaves"])
        for slot, t in zip(use.extra["tensor_slots"], use.saved, strict=True):
            leaves[slot] = t.detach()
        spec = use.extra["spec"]
        out_slots = use.extra["out_slots"]
        grads = use.grad_out
        batched = [isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b for v in leaves]
        # the clipped parameters enter vmap expanded along the batch (a view): some kernels (e.g. the float64
        # RNN path) write in place and refuse unbatched weights next to batched inputs. The others stay
        # unbatched so that, e.g., a convolution inside the module still runs as one batched kernel.
        frozen = {n: p.detach() for n, p in unit.module.named_parameters() if n not in names}
        expand_frozen = id(unit) in self._expand_frozen
        primals = {n: unit.params[n].detach().expand(b, *unit.params[n].shape) for n in names}
        module, qualname = unit.module, unit.qualname

        # outputs of rule-handled children that read one of this module's (batched) inputs, recorded in forward
        # (capture.context.ChildOutputs): the re-run uses them instead of running those children again
        replays = [r for r in use.extra.get("replay", ()) if batched[r.slot] and r.out._version == r.version
                   and r.out.shape[0] == b]
        n_vals = sum(batched)

        def sample_loss(params, fixed, i, *vals):
            it = iter(vals[:n_vals])
            args = [next(it).unsqueeze(0) if bt else v for v, bt in zip(leaves, batched, strict=True)]
            a, k = tree_unflatten(args, spec)
            recorded = {(id(r.unit), r.call): (r.slot, v.unsqueeze(0)) for r, v in zip(replays, vals[n_vals:],
                                                                                        strict=True)}
            calls: dict[int, int] = {}

            def replay(child, c_args, c_kwargs):
                call = calls.get(id(child), 0)
                calls[id(child)] = call + 1
                hit = recorded.get((id(child), call))
                if hit is None or c_kwargs or len(c_args) != 1 or c_args[0] is not args[hit[0]]:
                    return None
                return hit[1]

            with bypass(replay if recorded else None):
                out_leaves = trees.leaves(functional_call(module, {**fixed, **params}, a, k))
            total = 0.0
            for slot, g in zip(out_slots, grads, strict=True):
                if g is None:
                    continue
                o = out_leaves[slot]
                d = _batch_dim(g.shape, o.shape, b)
                if d is None:
                    if b == 1 and o.shape == g.shape:
                        d = 0 if o.dim() else None
                    if d is None:
                        raise EngineError(
                            f"module '{qualname}' returns an output of shape {tuple(g.shape)} with no batch "
                            f"dimension of size {b}: its parameters' per-sample gradients cannot be separated. "
                            "Return per-sample outputs from this module (the loss should be formed outside it)."
                        )
                total = total + (o * g.index_select(d, i.unsqueeze(0)).to(o.dtype)).sum()
            return total

        vals = [v for v, bt in zip(leaves, batched, strict=True) if bt] + [r.out for r in replays]
        if b == 0 or all(g is None for g in grads):
            ps = {n: torch.zeros((b, *unit.params[n].shape), dtype=unit.params[n].dtype,
                                 device=unit.params[n].device) for n in names}
        else:
            autocast = use.extra.get("autocast")
            amp = torch.autocast(autocast[0], dtype=autocast[1]) if autocast else contextlib.nullcontext()
            idx = torch.arange(b, device=grads_device(grads))

            def run(expand: bool):
                fixed = {n: t.expand(b, *t.shape) for n, t in frozen.items()} if expand else frozen
                dims = (0, 0 if expand else None, 0, *[0] * len(vals))
                with bypass(), amp:
                    return vmap(grad(sample_loss), in_dims=dims, randomness="different")(primals, fixed, idx, *vals)

            try:
                ps = run(expand_frozen)
            except RuntimeError:
                if expand_frozen or not frozen:
                    raise
                # some kernels (the float64 RNN path) refuse unbatched weights next to batched inputs
                self._expand_frozen.add(id(unit))
                ps = run(True)
        use.cache["ps"] = ps
        use.extra.pop("replay", None)
        return ps

    def norms2(self, use, names):
        ps = use.cache["ps"]
        return {n: sq_norms(ps[n]) for n in names}

    def per_sample(self, use, name):
        return use.cache["ps"][name]

    def compact(self, use):
        if "ps" in use.cache:  # computed when the output gradient arrived: inputs and gradient are done with
            use.saved, use.grad_out = (), None

    def clipped_sum(self, use, coef, name):
        return coef_sum(coef, use.cache["ps"][name], use.unit.params[name])
