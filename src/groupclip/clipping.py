"""Groups, thresholds and clip functions φ, and the group finaliser that turns uses into clipped p.grad.

For group k with threshold C_k, sample i contributes φ_k(‖g_i^k‖)·g_i^k; the clipped sum divided by the
expected batch size is accumulated into p.grad. The total sensitivity is sqrt(Σ_k C_k²).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from groupclip.capture.context import Use
from groupclip.kernels import clip_coef, clip_factor
from groupclip.rules import EngineError
from groupclip.rules.base import acc_dtype, ghost_inner, one_coefficient
from groupclip.tail_trial import MAX_RETRIALS, CaptureChurn, TailTrial, TailWatch
from groupclip.tails import MODES as TAIL_MODES
from groupclip.tails import TailGraphs, norm_graph_entry

CLIPPING = ("automatic", "autov", "abadi", "psac")
GROUP_STYLES = ("all-layer", "layer-wise", "param-wise")
__all__ = ["CLIPPING", "GROUP_STYLES", "Clipper", "Groups", "build_groups", "clip_factor"]


@dataclass
class Groups:
    """Parameter groups in a fixed order, with their thresholds."""

    names: list[list[str]]
    params: list[list[nn.Parameter]]
    thresholds: list[float]

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(c * c for c in self.thresholds))

    def index(self) -> dict[int, int]:
        return {id(p): k for k, ps in enumerate(self.params) for p in ps}


def build_groups(
    model: nn.Module,
    spec: str | Sequence[Sequence[str]],
    max_grad_norm: float,
    thresholds: Sequence[float] | None = None,
) -> Groups:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise EngineError("the model has no trainable parameters (every requires_grad is False).")
    if isinstance(spec, str):
        if spec == "all-layer":
            names = [[n for n, _ in named]]
        elif spec == "param-wise":
            names = [[n] for n, _ in named]
        elif spec == "layer-wise":
            owner: dict[str, list[str]] = {}
            for n, _ in named:
                owner.setdefault(n.rpartition(".")[0], []).append(n)
            names = list(owner.values())
        else:
            raise ValueError(f"unknown groups {spec!r}; use one of {', '.join(GROUP_STYLES)} or a list of lists")
    else:
        names = [list(g) for g in spec]
        trainable = dict(named)
        listed = [n for g in names for n in g]
        unknown = [n for n in listed if n not in trainable]
        if unknown:
            raise ValueError(f"groups name parameters that are not trainable parameters of the model: {unknown}")
        dup = sorted({n for n in listed if listed.count(n) > 1})
        if dup:
            raise ValueError(f"groups list these parameters more than once: {dup}")
        missing = [n for n in trainable if n not in listed]
        if missing:
            raise ValueError(
                f"groups leave these trainable parameters out: {missing}. Every trainable parameter must be "
                "in exactly one group (or freeze it with requires_grad_(False))."
            )
        if any(not g for g in names):
            raise ValueError("groups contains an empty group")
    lookup = dict(named)
    if thresholds is None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        th = [max_grad_norm / math.sqrt(len(names))] * len(names)
    else:
        th = [float(c) for c in thresholds]
        if len(th) != len(names):
            raise ValueError(f"thresholds has {len(th)} entries but there are {len(names)} groups")
        if any(not c > 0 for c in th):
            raise ValueError("every threshold must be > 0")
    return Groups(names, [[lookup[n] for n in g] for g in names], th)


def _add_grad(p: nn.Parameter, g: torch.Tensor) -> None:
    if p.grad is None:
        p.grad = g.contiguous()
    else:
        p.grad.add_(g)


class Clipper:
    """Computes per-sample group norms from a group's uses, clips, and accumulates into p.grad."""

    def __init__(self, groups: Groups, kind: str, batch_size: int, loss_reduction: str,
                 gamma: float = 0.01, psac_r: float = 0.01, tail_graphs: str = "off") -> None:
        if kind not in CLIPPING:
            raise ValueError(f"unknown clipping {kind!r}; choose one of {', '.join(CLIPPING)}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.groups, self.kind, self.batch_size = groups, kind, batch_size
        self.loss_reduction, self.gamma, self.psac_r = loss_reduction, gamma, psac_r
        self._members = [{id(p) for p in ps} for ps in groups.params]
        self._group_of = groups.index()
        # per call plan (fixed for the engine's life, like the groups) and names: those names split by group, as
        # (group, names, set of names)
        self._splits: dict[tuple, tuple[tuple[int, tuple[str, ...], frozenset[str]], ...]] = {}
        # (call plan, group) -> the plan's names in that group, and their parameters
        self._names_in: dict[tuple, tuple[tuple[str, ...], tuple[nn.Parameter, ...]]] = {}
        # (group, call plans of a pass's uses in order) -> the group's parameters and their uses (`_layout`)
        self._layouts: dict[tuple, tuple] = {}
        # (B,) float32 or None: samples where it is 0 are padding (a graphed step's batch filled up to its
        # captured size) and get coefficient 0; set only while a graphed step captures or runs
        self.sample_mask: torch.Tensor | None = None
        # per-layer CUDA graphs of single-use tails (`groupclip.tails`), or None; "auto": switched on and kept or
        # dropped by a measurement over the first steps (`groupclip.tail_trial`)
        if tail_graphs not in TAIL_MODES:
            raise ValueError(f"tail_graphs must be one of {', '.join(TAIL_MODES)}, got {tail_graphs!r}")
        self.tails: TailGraphs | None = None if tail_graphs == "off" else TailGraphs(active=tail_graphs == "on")
        self.tail_trial: TailTrial | None = TailTrial(self.tails) if tail_graphs == "auto" else None
        self.tail_report: dict | None = None  # the trial's measurement, once decided
        self.tail_watch: TailWatch | None = None  # after a "GPU-bound" decision: asks for a new trial if it changes
        self._retrial_reports: list[dict] = []  # why each new trial was started (the watch's reports)
        self.tail_churn: CaptureChurn | None = None  # after a decision to keep them: drops graphs captured anew
        # id(use) -> (token, saved input, output gradient, outputs) of the waiting uses whose norm a graph gave in
        # this backward pass (`_graphed_norm`), until their group's sums (`TailGraphs.group_key`)
        self._norm_graphs: dict[int, tuple] = {}

    def __call__(self, k: int, uses: list[Use]) -> None:
        if len(uses) == 1 and "n2g" not in uses[0].cache:
            self._single(k, uses[0])
            return
        batch = uses[0].batch_size
        if any(u.batch_size != batch for u in uses):
            raise EngineError(
                f"group {self.groups.names[k]} was used with batches of sizes {sorted({u.batch_size for u in uses})} "
                "in one backward pass; per-sample clipping needs one batch per backward."
            )
        layout = self._layout(k, uses)
        if not layout:
            return
        parts: list[tuple[torch.Tensor, bool]] = []
        vecs: list[torch.Tensor] = []  # (B,) squared norms: reduced early, or of tensors with several uses
        reduced: set[int] = set()
        for _, _, j, n, refs in layout:
            if refs is not None:
                vecs.append(self._shared_norm2([(uses[r], rn) for r, rn in refs]))
                continue
            u = uses[j]
            n2g = u.cache.get("n2g")
            early = None if n2g is None else n2g.get(k)
            if early is not None and n in early[1]:
                if j not in reduced:
                    reduced.add(j)
                    vecs.append(early[0])
                continue
            parts.extend(u.unit.rule.norm_parts(u, (n,)))
        if vecs:
            if len(vecs) == 1:
                parts.append((vecs[0][:, None], True))
            else:
                dt = acc_dtype(*vecs)
                parts.append((torch.stack([v if v.dtype == dt else v.to(dt) for v in vecs], 1), True))
        coef, done = None, {}
        tails = self.tails
        if tails is not None and self.sample_mask is None:
            if self.tail_trial is not None:
                for u in uses:
                    self.tail_trial.saw(u)
            if tails.active:
                graphed = self._graphed_sums(k, layout, uses, parts)
                if graphed is not None:
                    coef, done = graphed
        if self._norm_graphs:
            for u in uses:
                self._norm_graphs.pop(id(u), None)
        if coef is None:
            coef = self._coef(k, parts, batch)
        with one_coefficient():
            for i, p, j, n, refs in layout:
                total = done.get(i)
                if total is None:
                    for r, rn in ((j, n),) if refs is None else refs:
                        u = uses[r]
                        g = u.unit.rule.clipped_sum(u, coef, rn)
                        total = g if total is None else total + g
                _add_grad(p, total)

    def _layout(self, k: int, uses: list[Use]) -> tuple:
        """Group k's parameters in a backward pass whose uses have these call plans, in order of first appearance:
        (id, parameter, use index, name, None) for a parameter used once, (id, parameter, None, None, ((use index,
        name), ...)) for one used several times. Worked out once per sequence of call plans (a training loop repeats
        one), like the plans themselves."""
        key = (k, tuple([u.plan for u in uses]))
        layout = self._layouts.get(key)
        if layout is not None:
            return layout
        members = self._members[k]
        by_param: dict[int, tuple[nn.Parameter, list[tuple[int, str]]]] = {}
        for j, u in enumerate(uses):
            plan = u.plan
            for n, p, i in zip(plan.names, plan.params, plan.param_ids, strict=True):
                if i not in members:
                    continue  # the use also carries parameters of other groups
                entry = by_param.get(i)
                if entry is None:
                    by_param[i] = (p, [(j, n)])
                else:
                    entry[1].append((j, n))
        layout = tuple((i, p, refs[0][0], refs[0][1], None) if len(refs) == 1 else (i, p, None, None, tuple(refs))
                       for i, (p, refs) in by_param.items())
        if len(self._layouts) >= 64:  # (a loop that keeps changing its sequence of layers: keep the recent ones)
            self._layouts.pop(next(iter(self._layouts)))
        self._layouts[key] = layout
        return layout

    def _graphed_sums(self, k: int, layout: tuple, uses: list[Use], parts: list[tuple[torch.Tensor, bool]]
                      ) -> tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
        """The coefficient and the clipped sums of the group's single-use parameters from one CUDA graph
        (`groupclip.tails`), as (coefficient, {id(param): sum}); None where none applies (all run eagerly)."""
        singles = [(i, p, uses[j], n) for i, p, j, n, refs in layout if refs is None]
        key, taken = self.tails.group_key([(u, n) for _, _, u, n in singles], parts, self._tail_settings(k),
                                          self._norm_graphs)
        if key is None:
            return None
        chosen = [singles[t] for t in taken]
        batch = uses[0].batch_size

        def tail() -> list[torch.Tensor]:
            coef = self._coef(k, parts, batch)
            with one_coefficient():
                return [coef, *[u.unit.rule.clipped_sum(u, coef, n) for _, _, u, n in chosen]]

        owners = (None, *[p for _, p, _, _ in chosen])  # the coefficient is not kept
        outs = self.tails.run(("group", k), key, tail, [u for _, _, u, _ in chosen], own_gram=False, owners=owners)
        if outs is None:
            return None
        return outs[0], {i: s for (i, _, _, _), s in zip(chosen, outs[1:], strict=True)}

    def _tail_settings(self, k: int) -> tuple:
        """Every clipping setting a graphed tail of group k bakes in."""
        return (self.kind, self.groups.thresholds[k], self.batch_size, self.loss_reduction, self.gamma, self.psac_r)

    def _coef(self, k: int, parts: list[tuple[torch.Tensor, bool]], batch: int) -> torch.Tensor:
        # per-sample gradients of a mean-reduced loss arrive divided by the batch size: scale back
        scale = float(batch) if self.loss_reduction == "mean" else 1.0
        mask = self.sample_mask
        if mask is not None and mask.shape[0] != batch:
            raise EngineError(f"group {self.groups.names[k]} saw a batch of {batch} samples inside a graphed step "
                              f"of {mask.shape[0]}; every forward of the step must use the whole batch")
        return clip_coef(parts, self.kind, self.groups.thresholds[k], scale, scale / self.batch_size,
                         self.gamma, self.psac_r, mask)

    def _single(self, k: int, u: Use) -> None:
        """The common case (every layer-wise group): one use, each of its parameters used once."""
        slot = (u.plan, k)
        known = self._names_in.get(slot)
        if known is None:
            names = next((ns for g, ns, _ in self._split(u, u.names) if g == k), ())
            known = self._names_in[slot] = (names, tuple(u.unit.params[n] for n in names))
        names, params = known
        if not names:
            return
        tails = self.tails
        if tails is not None and self.sample_mask is None:
            if self.tail_trial is not None:
                self.tail_trial.saw(u)
            if tails.active:
                key = tails.key(u, names, self._tail_settings(k))
                if key is not None:
                    # the sums are lent: p.grad become views of the graph's result buffer
                    sums = tails.run(slot, key, lambda: self._tail(k, u, names), (u,), owners=params)
                    if sums is not None:
                        for p, s in zip(params, sums, strict=True):
                            _add_grad(p, s)
                        return
        for p, s in zip(params, self._tail(k, u, names), strict=True):
            _add_grad(p, s)

    def graphed_input_grad(self, use: Use) -> torch.Tensor | None:
        """A use's input gradient from a CUDA graph of its rule's fused backward (`TailGraphs.input_grad`), where
        the tail graphs are on; None: its rule computes it eagerly."""
        tails = self.tails
        if tails is None or not tails.active or self.sample_mask is not None:
            return None
        return tails.input_grad(use)

    def begin_of_backward(self) -> None:
        """Called by the hub when a backward pass reaches its first use (the tail-graph trial times the pass)."""
        self._norm_graphs.clear()  # (left by a pass that did not finish)
        if self.tail_trial is not None:
            self.tail_trial.begin_of_backward()
        elif self.tail_watch is not None:
            self.tail_watch.begin_of_backward()

    def end_of_backward(self) -> None:
        """Called by the hub after each backward pass: advances the tail-graph trial, drops the graphs if it
        decides against them; after a "GPU-bound" decision, starts a new trial when the watch asks."""
        trial = self.tail_trial
        if trial is None:
            churn = self.tail_churn
            if churn is not None and churn.end_of_backward():
                self.tail_churn = self.tails = None  # the graphs and their memory pool go with it
                self.tail_report = {**self.tail_report, **churn.report}
            watch = self.tail_watch
            if watch is not None and watch.end_of_backward():
                self.tail_watch = None
                self.tails = TailGraphs(active=False)
                self.tail_trial = TailTrial(self.tails, from_step=watch.retrial_from)
                self._retrial_reports.append(watch.report)
            return
        keep = trial.end_of_backward()
        if keep is None:
            return
        self.tail_trial = None
        retrials = self._retrial_reports
        self.tail_report = {**trial.report, "retrials": list(retrials)} if retrials else trial.report
        if keep:
            self.tail_churn = CaptureChurn(self.tails)
        else:
            self.tails = None  # the graphs and their memory pool go with it
            if (trial.report["reason"].startswith("GPU-bound") and trial.device is not None
                    and len(retrials) < MAX_RETRIALS):
                self.tail_watch = TailWatch(trial.report, trial.device)

    def _tail(self, k: int, u: Use, names: tuple[str, ...]) -> list[torch.Tensor]:
        """Norm, coefficient and the clipped sums of `names` (one use; each of its parameters used once)."""
        rule = u.unit.rule
        coef = self._coef(k, rule.norm_parts(u, names), u.batch_size)
        return [rule.clipped_sum(u, coef, n) for n in names]

    def reduce_waiting(self, use: Use, names: tuple[str, ...]) -> None:
        """Reduce a waiting use's single-use parameters to one squared norm per group now, and drop what the
        clipped sum will not need (instantiated per-sample gradients; for rules with small cached per-sample
        gradients, the saved input and output gradient too) until the group completes."""
        rule = use.unit.rule
        splits = self._split(use, names)
        if self.tail_trial is not None:
            self.tail_trial.tick()
        graphed = self._graphed_norm(use, splits) if self.tails is not None else None
        early = use.cache.setdefault("n2g", {})
        if graphed is not None:
            early[splits[0][0]] = (graphed, splits[0][2])
        for k, ns, members in splits:
            if k not in early:
                early[k] = (clip_coef(rule.norm_parts(use, ns), "norm2"), members)
        use.cache.pop("G", None)
        rule.compact(use)

    def _graphed_norm(self, use: Use, splits: tuple) -> torch.Tensor | None:
        """A waiting use's squared norm (all its names in one group) from a CUDA graph (`groupclip.tails`), or None.
        The graph's buffers are used in place: the group's sums read them later in the same backward pass, before
        the next replay. Where the norm also computes the per-sample bias gradients ("gb", which the sums read), they
        come out of the graph too."""
        tails = self.tails
        if not (tails.active and self.sample_mask is None and len(splits) == 1 and "n2g" not in use.cache):
            return None
        ns = splits[0][1]
        key = tails.key(use, ns, ("norm2",))
        if key is None:
            return None

        def tail() -> list[torch.Tensor]:
            n2 = clip_coef(use.unit.rule.norm_parts(use, ns), "norm2")
            gb = use.cache.get("gb")
            return [n2] if gb is None else [n2, gb]

        got = tails.run(("norm", use.plan, splits[0][0]), key, tail, (use,), copy=False)
        if got is None:
            return None
        entry = norm_graph_entry(use, key, got)
        if entry is not None:
            self._norm_graphs[id(use)] = entry
        if len(got) == 2:
            use.cache["gb"] = got[1]
        return got[0]

    def _split(self, use: Use, names: tuple[str, ...]) -> tuple[tuple[int, tuple[str, ...], frozenset[str]], ...]:
        """`names` of a use split by group, in order of first appearance."""
        key = (use.plan, names)
        found = self._splits.get(key)
        if found is None:
            by_group: dict[int, list[str]] = {}
            for n in names:
                by_group.setdefault(self._group_of[id(use.unit.params[n])], []).append(n)
            found = self._splits[key] = tuple((k, tuple(ns), frozenset(ns)) for k, ns in by_group.items())
        return found

    def _shared_norm2(self, pu: list[tuple[Use, str]]) -> torch.Tensor:
        """‖Σ_u G_u‖² of one tensor with several uses (tied weights, a layer called twice), with cross terms."""
        facs = [u.unit.rule.factors(u, n) for u, n in pu]
        if all(f is not None for f in facs):
            # each use's own ‖G_u‖² by its rule's own choice (ghost, fused kernel, instantiation), the cross
            # terms <G_u, G_v> as ghost inner products
            total = 0
            for u, n in pu:
                total = total + clip_coef(u.unit.rule.norm_parts(u, (n,)), "norm2")
            for a in range(len(pu)):
                for b in range(a + 1, len(pu)):
                    total = total + 2.0 * ghost_inner(facs[a], facs[b])
            return total
        summed = None
        for u, n in pu:
            g = u.unit.rule.per_sample(u, n)
            summed = g if summed is None else summed + g.to(summed.dtype)
        return summed.to(acc_dtype(summed)).pow(2).flatten(1).sum(1)
