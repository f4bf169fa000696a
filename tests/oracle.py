"""Ground-truth reference for groupclip's clipped gradient, written one sample at a time.

The oracle functions do not use groupclip. The reference follows the public contract literally:

    p.grad = (1/batch_size) * sum_i phi_k(||g_i^k||) * g_i^k

where g_i is the gradient of sample i's own loss (sample i = index i along dim 0 of every batched input),
g_i^k its restriction to group k, and phi_k the clipping function with threshold C_k (C/sqrt(K) unless
explicit thresholds are given). Every per-sample gradient is computed by a separate forward/backward pass
(torch.autograd.grad) on a float64 deep copy of the model, so the oracle shares no code path with the engine.

Helpers for the tests (engine attachment, comparison) live here too, so each test file stays short."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFn = Callable[..., torch.Tensor]
Groups = str | Sequence[Sequence[str]]

CLIPPINGS = ("automatic", "autov", "abadi", "psac")
GROUP_STYLES = ("all-layer", "layer-wise", "param-wise")


# ----------------------------------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------------------------------
def trainable_names(model: nn.Module) -> list[str]:
    """Names of trainable parameters in (deduplicated) named_parameters() order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def resolve_groups(model: nn.Module, groups: Groups) -> list[list[str]]:
    """The contract's group list, as lists of parameter names (named_parameters() names), in group order."""
    if isinstance(groups, str):
        names = trainable_names(model)
        if groups == "all-layer":
            return [names]
        if groups == "param-wise":
            return [[n] for n in names]
        if groups == "layer-wise":
            # One group per module that directly owns trainable parameters, in named_modules() order; a tied
            # parameter belongs to the first module that owns it (= deduplicated named_parameters() order).
            seen: set[int] = set()
            out: list[list[str]] = []
            for mname, module in model.named_modules():
                own = []
                for pname, p in module.named_parameters(recurse=False):
                    if p.requires_grad and id(p) not in seen:
                        seen.add(id(p))
                        own.append(f"{mname}.{pname}" if mname else pname)
                if own:
                    out.append(own)
            assert sum(len(g) for g in out) == len(names)
            return out
        raise ValueError(f"oracle: unknown group style {groups!r}")
    return [list(g) for g in groups]


# ----------------------------------------------------------------------------------------------------
# per-sample gradients and clipping
# ----------------------------------------------------------------------------------------------------
def _as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.double() if torch.is_floating_point(t) else t


def float64_copy(model: nn.Module) -> nn.Module:
    """A float64 deep copy of the model (the input model is not touched)."""
    return copy.deepcopy(model).double()


def per_sample_grads(
    model: nn.Module, loss_fn_per_sample: LossFn, inputs: Sequence[torch.Tensor]
) -> tuple[list[str], list[dict[str, torch.Tensor]]]:
    """Per-sample gradients, one forward/backward per sample on a float64 copy.

    loss_fn_per_sample(model, *one_sample_inputs) must return the (scalar) loss of that one sample; it is
    called with the slices i:i+1 of every batched input.
    Returns (trainable parameter names, [{name: g_i[name]} for each sample i]) in float64.
    """
    m = float64_copy(model)
    names = trainable_names(m)
    params = dict(m.named_parameters())
    plist = [params[n] for n in names]
    batch = inputs[0].shape[0]
    assert all(t.shape[0] == batch for t in inputs), "every input must be batched along dim 0"
    out = []
    for i in range(batch):
        sl = [_as_float64(t[i : i + 1]) for t in inputs]
        loss = loss_fn_per_sample(m, *sl)
        assert loss.dim() == 0, "the loss of one sample must be a scalar"
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        out.append(
            {
                n: (torch.zeros_like(p) if g is None else g.detach())
                for n, p, g in zip(names, plist, grads, strict=True)
            }
        )
    return names, out


def phi(
    norm: torch.Tensor, c_k: float, clipping: str, gamma: float = 0.01, psac_r: float = 0.01
) -> torch.Tensor:
    """The contract's clipping factor phi_k(||g||)."""
    if clipping == "abadi":
        return torch.clamp(c_k / (norm + 1e-6), max=1.0)
    if clipping == "automatic":
        return c_k / (norm + gamma)
    if clipping == "autov":
        return c_k / norm
    if clipping == "psac":
        return c_k / (norm + psac_r / (norm + psac_r))
    raise ValueError(f"oracle: unknown clipping {clipping!r}")


def group_thresholds(n_groups: int, C: float, thresholds: Sequence[float] | None) -> list[float]:
    if thresholds is None:
        return [C / n_groups**0.5] * n_groups
    assert len(thresholds) == n_groups
    return [float(t) for t in thresholds]


def group_norms(grads: list[dict[str, torch.Tensor]], groups: list[list[str]]) -> torch.Tensor:
    """(B, K) per-sample group norms."""
    return torch.stack(
        [torch.stack([torch.sqrt(sum((g[n] ** 2).sum() for n in grp)) for grp in groups]) for g in grads]
    )


def clip_factors(
    grads: list[dict[str, torch.Tensor]],
    groups: list[list[str]],
    *,
    C: float,
    clipping: str,
    thresholds: Sequence[float] | None = None,
    gamma: float = 0.01,
    psac_r: float = 0.01,
) -> torch.Tensor:
    """(B, K) clipping factors phi_k(||g_i^k||)."""
    norms = group_norms(grads, groups)
    cks = group_thresholds(len(groups), C, thresholds)
    return torch.stack([phi(norms[:, k], cks[k], clipping, gamma, psac_r) for k in range(len(groups))], dim=1)


def oracle_grads(
    model: nn.Module,
    loss_fn_per_sample: LossFn,
    inputs: Sequence[torch.Tensor],
    *,
    batch_size: int,
    C: float,
    clipping: str,
    groups: Groups,
    thresholds: Sequence[float] | None = None,
    gamma: float = 0.01,
    psac_r: float = 0.01,
) -> dict[str, torch.Tensor]:
    """{name: expected p.grad} = (1/batch_size) sum_i phi_k(||g_i^k||) g_i^k in float64, trainable params."""
    names, grads = per_sample_grads(model, loss_fn_per_sample, inputs)
    grp = resolve_groups(model, groups)
    listed = [n for g in grp for n in g]
    assert sorted(listed) == sorted(names), "oracle: groups must partition the trainable parameters"
    factors = clip_factors(
        grads, grp, C=C, clipping=clipping, thresholds=thresholds, gamma=gamma, psac_r=psac_r
    )
    group_of = {n: k for k, g in enumerate(grp) for n in g}
    out = {}
    for n in names:
        k = group_of[n]
        out[n] = sum(factors[i, k] * g[n] for i, g in enumerate(grads)) / batch_size
    return out


# ----------------------------------------------------------------------------------------------------
# losses used throughout the tests
# ----------------------------------------------------------------------------------------------------
def weighted_mse(model: nn.Module, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Mean over samples of w_i * mean((model(x_i) - target_i)^2). Per-sample weights w_i spread the
    per-sample gradient norms over orders of magnitude, so that abadi clipping clips some samples and leaves
    others."""
    out = model(x)
    per_sample = ((out - target) ** 2).flatten(1).mean(1)
    return (w * per_sample).mean()


def weighted_mse_sum(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Same per-sample losses as weighted_mse, reduced by sum (for loss_reduction="sum")."""
    out = model(x)
    return (w * ((out - target) ** 2).flatten(1).mean(1)).sum()


def sample_weights(batch: int) -> torch.Tensor:
    """Per-sample loss weights spanning ~3 orders of magnitude, deterministic."""
    return torch.logspace(-1.5, 1.5, batch, dtype=torch.float64)


def make_mse_inputs(
    model: nn.Module, x: torch.Tensor, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, random target shaped like model(x), weights), floating tensors in the model's dtype."""
    with torch.no_grad():
        out = float64_copy(model)(_as_float64(x))
    g = torch.Generator().manual_seed(seed + 1)
    dtype = next(model.parameters()).dtype
    target = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    x = x.to(dtype) if torch.is_floating_point(x) else x
    return x, target, sample_weights(x.shape[0]).to(dtype)


# ----------------------------------------------------------------------------------------------------
# engine helpers
# ----------------------------------------------------------------------------------------------------
def make_engine(model: nn.Module, optimizer: torch.optim.Optimizer, **kw):
    """groupclip.PrivacyEngine with the defaults the tests share; the "not private" warning of
    noise_multiplier=0.0 is silenced here (test_noise checks that it is emitted)."""
    import groupclip

    kw.setdefault("sample_size", 1000)
    if "epochs" not in kw:
        kw.setdefault("steps", 10)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("seed", 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not private")
        return groupclip.PrivacyEngine(model, optimizer, **kw)


def cast_inputs(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype) if torch.is_floating_point(t) else t for t in inputs]


def engine_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Sequence[torch.Tensor],
    *,
    dtype: torch.dtype = torch.float64,
    autocast: torch.dtype | None = None,
    **engine_kw,
) -> dict[str, torch.Tensor | None]:
    """Attach an engine (noise 0) to `model` (cast to dtype), run one backward on the whole batch, return
    {name: p.grad as float64 or None} for every parameter, and detach. `model` is modified (cast, grads)."""
    model.to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine_kw.setdefault("batch_size", inputs[0].shape[0])
    engine = make_engine(model, opt, **engine_kw)
    try:
        opt.zero_grad(set_to_none=True)
        xs = cast_inputs(inputs, dtype)
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                loss = loss_fn(model, *xs)
        else:
            loss = loss_fn(model, *xs)
        loss.backward()
        return {
            n: (None if p.grad is None else p.grad.detach().double().clone())
            for n, p in model.named_parameters()
        }
    finally:
        engine.detach()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def assert_grads_close(
    got: dict[str, torch.Tensor | None], expected: dict[str, torch.Tensor], rtol: float = 1e-6
) -> None:
    """||got - expected|| <= rtol * ||expected|| per parameter and over all parameters.

    Per parameter, ||expected|| is floored at 1e-3 * ||expected over all params||: a parameter whose gradient
    is mathematically zero (e.g. the key bias of softmax attention: it shifts all logits of a query equally)
    only carries float64 round-off, ~1e-10 of the total in HF ViT, which no rtol can bound relative to itself.
    The floor keeps the check absolute at rtol * 1e-3 of the total for such parameters (1e-9 at rtol=1e-6);
    any real bug (a wrong clip factor, a missed sample) moves a gradient by a sizable fraction of itself."""
    missing = [n for n in expected if got.get(n) is None]
    assert not missing, f"no .grad on trainable parameters: {missing}"
    total_ref = torch.sqrt(sum((e**2).sum() for e in expected.values()))
    total_err = torch.sqrt(sum(((got[n] - e) ** 2).sum() for n, e in expected.items()))
    bad = []
    for n, e in expected.items():
        g = got[n]
        assert g.shape == e.shape, f"{n}: grad shape {tuple(g.shape)} != {tuple(e.shape)}"
        err = float((g - e).norm())
        ref = max(float(e.norm()), 1e-3 * float(total_ref))
        if not err <= rtol * ref:
            bad.append(
                f"{n}: rel err {err / ref:.3e} "
                f"(|expected|={float(e.norm()):.3e}, |got|={float(g.norm()):.3e})"
            )
    assert not bad, f"per-parameter relative error above {rtol:g}:\n  " + "\n  ".join(bad)
    assert float(total_err) <= rtol * float(total_ref), (
        f"total rel err {float(total_err / total_ref):.3e} > {rtol:g}"
    )


def check_against_oracle(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Sequence[torch.Tensor],
    *,
    C: float = 1.0,
    clipping: str = "automatic",
    groups: Groups = "all-layer",
    thresholds: Sequence[float] | None = None,
    gamma: float = 0.01,
    psac_r: float = 0.01,
    rtol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    autocast: torch.dtype | None = None,
    **extra_engine_kw,
) -> dict[str, torch.Tensor]:
    """Run the engine on `model` and compare p.grad with the float64 oracle. Also checks that frozen
    parameters keep .grad None. Returns the oracle grads."""
    ref = copy.deepcopy(model)  # taken before the engine touches the model
    batch = inputs[0].shape[0]
    expected = oracle_grads(
        ref,
        loss_fn,
        inputs,
        batch_size=batch,
        C=C,
        clipping=clipping,
        groups=groups,
        thresholds=thresholds,
        gamma=gamma,
        psac_r=psac_r,
    )
    kw = dict(max_grad_norm=C, clipping=clipping, groups=_groups_arg(groups), **extra_engine_kw)
    if thresholds is not None:
        kw["thresholds"] = list(thresholds)
    if gamma != 0.01:
        kw["gamma"] = gamma
    if psac_r != 0.01:
        kw["psac_r"] = psac_r
    got = engine_grads(model, loss_fn, inputs, dtype=dtype, autocast=autocast, **kw)
    frozen = [n for n, p in ref.named_parameters() if not p.requires_grad]
    leaked = [n for n in frozen if got.get(n) is not None]
    assert not leaked, f"frozen parameters got a .grad: {leaked}"
    assert_grads_close(got, expected, rtol)
    return expected


def _groups_arg(groups: Groups):
    return groups if isinstance(groups, str) else [list(g) for g in groups]


def spread_C(model: nn.Module, loss_fn: LossFn, inputs: Sequence[torch.Tensor]) -> float:
    """A total threshold C at the median per-sample (all-layer) gradient norm, so abadi clips some samples."""
    _, grads = per_sample_grads(model, loss_fn, inputs)
    norms = group_norms(grads, [list(grads[0])])[:, 0]
    return float(norms.median())
