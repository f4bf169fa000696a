"""Split a model into units: a module plus the trainable parameters one rule clips for it.

Refusals happen here, at engine construction, naming the module and what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from groupclip.rules import GENERIC, WHOLE_MODULES, EngineError, Rule, rule_for


@dataclass(eq=False)
class Unit:
    module: nn.Module
    qualname: str
    rule: Rule
    params: dict[str, nn.Parameter]  # local name -> parameter
    global_names: dict[str, str] = field(default_factory=dict)  # local name -> model-level name

    def label(self) -> str:
        return f"'{self.qualname or '<model>'}' ({type(self.module).__name__})"


def _refuse(qualname: str, module: nn.Module) -> None:
    kind = type(module).__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise EngineError(
            f"module '{qualname}' is {kind}: batch normalisation mixes samples, so no per-sample gradient "
            "exists and DP clipping cannot bound one sample's influence. Replace it with nn.GroupNorm "
            "(or nn.LayerNorm / nn.InstanceNorm with track_running_stats=False)."
        )
    if parametrize.is_parametrized(module):
        raise EngineError(
            f"module '{qualname}' ({kind}) has a parametrization (e.g. weight_norm / spectral_norm): its "
            "trainable tensors are reached through the parametrization, which groupclip cannot clip per "
            "sample. Remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) first."
        )


def build_units(model: nn.Module) -> list[Unit]:
    """One unit per module that owns parameters directly; whole-subtree units for RNNs and attention."""
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters():
        first_name.setdefault(id(p), name)
    units: list[Unit] = []
    covered: list[str] = []
    for qualname, module in model.named_modules():
        if any(qualname.startswith(c + ".") for c in covered):
            continue
        _refuse(qualname, module)
        whole = isinstance(module, WHOLE_MODULES)
        params = dict(module.named_parameters(recurse=whole))
        if whole:
            covered.append(qualname)
        if not params:
            continue
        rule = GENERIC if whole else rule_for(module)
        rule.check(module, qualname)
        prefix = qualname + "." if qualname else ""
        gnames = {n: first_name.get(id(p), prefix + n) for n, p in params.items()}
        units.append(Unit(module, qualname, rule, params, gnames))
    return units


def report_generic(units: list[Unit], logger) -> None:
    """Tell the user which modules go through the generic per-sample re-run, and warn where it is costly: a
    module whose own parameters are used directly in a forward that also runs large submodules (e.g. a ViT
    root holding cls_token / pos_embed) is re-run whole, per sample, for those parameters."""
    from groupclip.rules import GENERIC

    for u in units:
        if u.rule is not GENERIC:
            continue
        inner = sum(1 for m in u.module.modules() if m is not u.module and any(True for _ in m.parameters(False)))
        if inner > 8:
            logger.warning(
                "groupclip: %s owns parameters %s used directly in its forward; their per-sample gradients come "
                "from re-running the whole module (%d submodules with parameters) per sample, about one more "
                "forward and backward of it per step. Moving them into a small submodule makes this cheap.",
                u.label(), sorted(u.params), inner)
        else:
            logger.info("groupclip: %s uses the generic per-sample rule for %s", u.label(), sorted(u.params))


def check_reachable(model: nn.Module, units: list[Unit]) -> None:
    """Every trainable parameter of the model must belong to some unit (defensive: never skip one)."""
    seen = {id(p) for u in units for p in u.params.values()}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            raise EngineError(f"parameter '{name}' is trainable but no module owns it; cannot clip it.")


def batchify(x: torch.Tensor, batch: int | None, unit: Unit) -> torch.Tensor:
    """Give a layer input a leading batch dimension when it has none (e.g. `wpe(arange(T))`).

    A leading dim of 1 is expanded to the batch size; any other leading size is treated as missing. The
    expanded input makes the layer's output, and so its output gradient, per sample. (A non-batched
    input whose leading dim happens to equal the batch size cannot be told apart; give such inputs an
    explicit batch dimension.)
    """
    if batch is None or x.dim() == 0 or x.shape[0] == batch:
        return x
    if x.dim() >= 2 and x.shape[1] == batch and x.shape[0] != 1:
        raise EngineError(
            f"layer {unit.label()} got an input of shape {tuple(x.shape)} whose batch ({batch}) is on dim 1 "
            "(sequence-first layout). groupclip takes sample i along dim 0: use batch_first=True."
        )
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x.unsqueeze(0).expand(batch, *x.shape)
