"""The fused Triton kernels of groupclip.kernels against float64 references written here with plain torch.

Without a GPU the kernels run under Triton's interpreter (conftest.py sets TRITON_INTERPRET=1); the `calls`
fixture forces the Triton path (also for CPU float32/float16 tensors) and counts the kernel launches, so every
test also proves that the kernel, not the PyTorch fallback, produced the result. With a GPU the same tests run
on CUDA tensors. bfloat16 is tested on the GPU only: the interpreter computes through numpy, which has none.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from oracle import check_against_oracle, make_mse_inputs, spread_C, weighted_mse
from torch import nn
from torch.utils.checkpoint import checkpoint

pytest.importorskip("triton")

import groupclip.kernels as K  # noqa: E402
import groupclip.rules.base as rules_base  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
#: the ghost kernel's (t, s) tile: shapes below straddle it
TILE = getattr(K._ops, "_TILE", 64)
FP16 = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.fixture
def calls(monkeypatch):
    """Force the Triton path and count the launches of each kernel (a Counter of function names)."""
    monkeypatch.setattr(K, "_MODE", "force")
    assert K._ops is not None, "groupclip.kernels did not import its Triton kernels"
    count: collections.Counter = collections.Counter()
    for name in ("ghost_partials", "layer_norm_ps", "layer_norm_backward", "clip_coef", "scale_rows", "scale_rows_t",
                 "coef_sum"):
        fn = getattr(K._ops, name)

        def counted(*args, _fn=fn, _name=name, **kw):
            count[_name] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(K._ops, name, counted)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # triton_ops reads it: float32 ghost dots in full precision
    torch.backends.cuda.matmul.allow_tf32 = False
    yield count
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Elementwise relative error of got against a float64 reference."""
    return (got.double() - ref).abs() / ref.abs().clamp_min(1e-300)


def _torch_path(fn, *args, **kw):
    """Call a groupclip.kernels function with the Triton kernels hidden: its PyTorch path."""
    ops = K._ops
    K._ops = None
    try:
        return fn(*args, **kw)
    finally:
        K._ops = ops


# ------------------------------------------------------------------------------------------------ ghost norms
def ghost_ref(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """‖g_iᵀ a_i‖_F² per sample in float64, from the per-sample weight gradient itself."""
    return torch.stack([(g[i].double().T @ a[i].double()).square().sum() for i in range(a.shape[0])])


# (B, T, Da, Dg): one position, a partial tile, a full tile, several tiles (off-diagonal tiles count twice)
GHOST_SHAPES = sorted({
    (1, 1, 5, 7),
    (3, 1, 33, 17),
    (3, 37, 45, 21),
    (1, 64, 50, 70),
    (3, 64, 31, 40),
    (3, 130, 37, 45),
    (2, TILE, 20, 30),
    (2, TILE + 1, 19, 8),
    (1, 2 * TILE + 3, 65, 3),
})


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("shape", GHOST_SHAPES, ids=lambda s: "B{}-T{}-Da{}-Dg{}".format(*s))
def test_ghost_partials_sum_to_per_sample_norms(calls, shape, dtype):
    b, t, da, dg = shape
    # rows of different magnitudes, so a mix-up between samples shows
    s = torch.logspace(-1, 1, b, dtype=torch.float64)[:, None, None]
    a = (torch.randn(b, t, da, dtype=torch.float64) * s).to(dtype).to(DEV)
    g = (torch.randn(b, t, dg, dtype=torch.float64) / s).to(dtype).to(DEV)
    out = K.ghost_partials(a, g)
    assert calls["ghost_partials"] == 1
    assert out.dim() == 2 and out.shape[0] == b and out.dtype == torch.float32
    ref = ghost_ref(a, g)  # of the (float16-rounded) inputs: the kernel accumulates in float32
    # 16-bit products are exact in float32, so every dtype is held to float32 accumulation accuracy
    assert rel(out.sum(1), ref).max() <= 1e-5, (out.sum(1), ref)
    # and the PyTorch path gives the same norms
    assert rel(_torch_path(K.ghost_partials, a, g).sum(1), ref).max() <= 1e-5


@pytest.mark.parametrize("t", [1, 16, 37, 50, 16 * 21 + 5])
def test_ghost_kernel_small_tiles_cover_every_lower_pair_once(t):
    """Tiles of 16 positions: up to 22 tile rows, 253 lower-triangle tile pairs, each program finding its pair
    (i, j) from its flat index. Every (t, s) pair must be counted exactly once as (t, s) and once as (s, t): the
    partials are checked against the norm, and one sample's partials (one per tile pair) against the Gram
    products' sums over each tile."""
    if K._ops is None:
        pytest.skip("no Triton kernels")
    a = torch.randn(3, t, 24, device=DEV) * torch.tensor([0.5, 1.0, 3.0], device=DEV)[:, None, None]
    g = torch.randn(3, t, 40, device=DEV)
    out = K._ops.ghost_partials(a, g, 16, 16, 4, 1)
    ni = -(-t // 16)
    assert out.shape == (3, ni * (ni + 1) // 2)
    assert rel(out.sum(1), ghost_ref(a, g)).max() <= 1e-5
    prod = (a[1].double() @ a[1].double().T) * (g[1].double() @ g[1].double().T)
    want = []
    for i in range(ni):
        for j in range(i + 1):
            block = prod[16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
            want.append(2 * block.sum() if j < i else block.sum())  # a diagonal block holds both orders itself
    want = torch.stack(want)
    assert ((out[1].double() - want).abs() <= 1e-5 * prod.abs().sum()).all()


@pytest.mark.parametrize("dtype", FP16, ids=str)
def test_ghost_partials_non_contiguous(calls, dtype):
    b, t, da, dg = 3, 70, 36, 19
    # a: transposed storage (time is the fastest dim); g: a slice along the last dim of a wider tensor
    a = torch.randn(b, da, t, dtype=dtype, device=DEV).transpose(1, 2)
    g = torch.randn(b, t, dg + 9, dtype=dtype, device=DEV)[:, :, 4 : 4 + dg]
    assert not a.is_contiguous() and not g.is_contiguous()
    out = K.ghost_partials(a, g)
    assert calls["ghost_partials"] == 1
    assert rel(out.sum(1), ghost_ref(a, g)).max() <= 1e-5
    # every other sample of the batch: a non-unit batch stride too
    a2, g2 = torch.randn(6, t, da, dtype=dtype, device=DEV)[::2], torch.randn(6, t, dg, dtype=dtype, device=DEV)[1::2]
    assert rel(K.ghost_partials(a2, g2).sum(1), ghost_ref(a2, g2)).max() <= 1e-5


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("t", [1, 37, TILE + 9, 2 * TILE + 1])
def test_ghost_kernel_shares_input_gram_tiles(dtype, t):
    """A second layer reading the same input gets the same partials from the first one's kept Gram tiles."""
    a = torch.randn(3, t, 40, device=DEV).to(dtype)
    g1, g2 = (torch.randn(3, t, d, device=DEV).to(dtype) for d in (24, 56))
    kept = K._ops.gram_tiles(a)
    first = K._ops.ghost_partials(a, g1, keep_a_tiles=kept)
    assert torch.equal(first, K._ops.ghost_partials(a, g1))
    second = K._ops.ghost_partials(a, g2, a_tiles=kept)
    assert torch.equal(second, K._ops.ghost_partials(a, g2))  # the same float32 tile values, read back
    assert rel(second.sum(1), ghost_ref(a, g2)).max() <= 1e-5


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("shape", [(3, 37, 12, 200), (2, TILE + 2, 20, 300), (1, 5, 300, 8)],
                         ids=lambda s: "B{}-T{}-Da{}-Dg{}".format(*s))
def test_ghost_partials_wide_operand(calls, monkeypatch, shape, dtype):
    """An operand wider than GHOST_KERNEL_MAX_D (an output layer over a vocabulary): its features split over
    programs, each slice's partial against the other operand's kept Gram tiles."""
    monkeypatch.setattr(K, "GHOST_KERNEL_MAX_D", 64)
    b, t, da, dg = shape
    a = torch.randn(b, t, da, device=DEV).to(dtype)
    g = torch.randn(b, t, dg, device=DEV).to(dtype)
    seen = []
    inner = K._ops.ghost_partials_wide

    def rec(narrow, wide, *args, **kw):
        seen.append((narrow.shape[2], wide.shape[2]))
        return inner(narrow, wide, *args, **kw)

    monkeypatch.setattr(K._ops, "ghost_partials_wide", rec)
    out = K.ghost_partials(a, g)
    assert seen == [(min(da, dg), max(da, dg))]  # the wider one is split, whichever argument it is
    assert calls["ghost_partials"] == 1  # the narrow operand's tiles
    assert rel(out.sum(1), ghost_ref(a, g)).max() <= 1e-5
    # several slices, the last one ragged
    split = K._ops.ghost_partials_wide(a, g, programs=4 * b, bk=16) if dg > da else None
    if split is not None:
        assert split.shape[1] > triton_tiles(t) * (triton_tiles(t) + 1) // 2  # several slices a tile pair
        assert rel(split.sum(1), ghost_ref(a, g)).max() <= 1e-5


def triton_tiles(t: int) -> int:
    return -(-t // TILE)


def test_shared_input_hands_tiles_to_later_readers_only_for_the_same_tensor(calls):
    a = torch.randn(2, 20, 16, device=DEV)
    shared = K.SharedInput()
    shared.readers = 3
    g = [torch.randn(2, 20, 8, device=DEV) for _ in range(3)]
    seen = []
    inner = K._ops.ghost_partials

    def rec(a, g, a_tiles=None, keep_a_tiles=None):
        seen.append((a_tiles is not None, keep_a_tiles is not None))
        return inner(a, g, a_tiles=a_tiles, keep_a_tiles=keep_a_tiles)

    K._ops.ghost_partials = rec
    try:
        outs = [K.ghost_partials(a, gi, shared) for gi in g]
    finally:
        K._ops.ghost_partials = inner
    assert seen == [(False, True), (True, False), (True, False)]
    assert shared.tiles is None and shared.source is None  # the last reader let them go
    for gi, out in zip(g, outs, strict=True):
        assert rel(out.sum(1), ghost_ref(a, gi)).max() <= 1e-5
    # a changed input (in place: its version moves) is not read from tiles of the old values
    again = K.SharedInput()
    again.readers = 2
    K.ghost_partials(a, g[0], again)
    assert again.tiles is not None
    a.mul_(2.0)
    tiles, keep = again.arrive(a)
    assert tiles is None and not keep


def test_layer_norm_ps_empty_batch(calls):
    x = torch.randn(0, 200, 40, device=DEV)  # a long sequence: would split T if there were samples
    mean = torch.zeros(0, 200, 1, device=DEV)
    gw, gb = K.layer_norm_ps(x, mean, mean, x.clone(), True, True)
    assert gw.shape == (0, 40) and gb.shape == (0, 40)


def test_ghost_partials_empty_batch(calls):
    a, g = torch.randn(0, 70, 8, device=DEV), torch.randn(0, 70, 5, device=DEV)
    out = K.ghost_partials(a, g)
    assert calls["ghost_partials"] == 1
    assert out.dim() == 2 and out.shape[0] == 0
    assert K.clip_coef([(out, True)], "automatic").shape == (0,)


# ------------------------------------------------------------------------------------------------ LayerNorm
@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, True)], ids=["w+b", "w", "b"])
@pytest.mark.parametrize("shape", [(2, 19, 300), (3, 5, 40), (1, 33, 257), (1, 150, 300), (2, 200, 40)],
                         ids=lambda s: "B{}-T{}-D{}".format(*s))
def test_layer_norm_ps(calls, shape, affine, dtype):
    b, t, d = shape
    weight, bias = affine
    x = (torch.randn(b, t, d) * 3 + 1).to(dtype).to(DEV)
    g = torch.randn(b, t, d).to(dtype).to(DEV)
    _, mean, rstd = torch.native_layer_norm(x, (d,), None, None, 1e-5)
    assert mean.shape == (b, t, 1)
    gw, gb = K.layer_norm_ps(x, mean, rstd, g, weight, bias)
    assert calls["layer_norm_ps"] == 1
    g64 = g.double()
    ref_w = (g64 * (x.double() - mean.double()) * rstd.double()).sum(1)
    ref_b = g64.sum(1)
    # sums of t terms of size ~1 in float32: compare against the scale of the terms, not the (cancelling) sum
    tol = 1e-5 * (g64.abs() * (x.double() - mean.double()).abs() * rstd.double()).sum(1).clamp_min(1)
    if weight:
        assert gw.shape == (b, d) and gw.dtype == torch.float32
        assert ((gw.double() - ref_w).abs() <= tol).all(), (gw.double() - ref_w).abs().max()
    else:
        assert gw is None
    if bias:
        assert gb.shape == (b, d) and gb.dtype == torch.float32
        assert ((gb.double() - ref_b).abs() <= 1e-5 * g64.abs().sum(1).clamp_min(1)).all()
    else:
        assert gb is None


def test_layer_norm_ps_strided(calls):
    """x and g with unit last stride but padded rows and a skipped time step: the kernel must use the strides."""
    b, t, d = 2, 130, 300
    x = torch.randn(b, 2 * t, d + 20, device=DEV)[:, ::2, 10 : 10 + d]
    g = torch.randn(b, t, d + 5, device=DEV)[:, :, :d]
    _, mean, rstd = torch.native_layer_norm(x, (d,), None, None, 1e-5)
    gw, gb = K.layer_norm_ps(x, mean, rstd, g, True, True)
    assert calls["layer_norm_ps"] == 1
    ref_w = (g.double() * (x.double() - mean.double()) * rstd.double()).sum(1)
    assert (gw.double() - ref_w).abs().max() <= 1e-4
    assert (gb.double() - g.double().sum(1)).abs().max() <= 1e-4


def _ln_backward_ref(x, g, w, b, eps=1e-5):
    """float64 input gradient of F.layer_norm by autograd, and the per-sample Σ_t g ⊙ x̂ and Σ_t g with x̂ and its
    statistics in float64 (the kernel computes the statistics from x itself)."""
    x64 = x.double().requires_grad_(True)
    d = x.shape[-1]
    y = F.layer_norm(x64, (d,), None if w is None else w.double(), None if b is None else b.double(), eps)
    (dx,) = torch.autograd.grad(y, x64, g.double())
    xh = F.layer_norm(x.double(), (d,), None, None, eps)
    return dx, (g.double() * xh).sum(1), g.double().sum(1)


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("with_w", [True, False], ids=["w", "no-w"])
@pytest.mark.parametrize("shape", [(2, 19, 300), (3, 5, 40), (1, 33, 257), (1, 150, 64), (4, 1, 768)],
                         ids=lambda s: "B{}-T{}-D{}".format(*s))
def test_layer_norm_backward(calls, shape, with_w, dtype):
    """Input gradient (against float64 autograd of F.layer_norm) and per-sample weight/bias gradients, one pass."""
    b, t, d = shape
    x = (torch.randn(b, t, d) * 3 + 1).to(dtype).to(DEV)
    g = torch.randn(b, t, d).to(dtype).to(DEV)
    w = (1 + 0.3 * torch.randn(d)).to(dtype).to(DEV) if with_w else None
    bias = (0.1 * torch.randn(d)).to(dtype).to(DEV)
    dx, gw, gb = K.layer_norm_backward(x, g, w, 1e-5)
    assert calls["layer_norm_backward"] == 1
    assert dx.shape == x.shape and dx.dtype == dtype and gw.shape == gb.shape == (b, d)
    ref_dx, ref_w, ref_b = _ln_backward_ref(x, g, w, bias)
    # float32 arithmetic, then rounded to the input's dtype (16-bit: also from 16-bit statistics on the CPU)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    assert ((dx.double() - ref_dx).abs() <= tol * (ref_dx.abs() + ref_dx.abs().mean())).all(), \
        (dx.double() - ref_dx).abs().max()
    scale = (g.double().abs() * F.layer_norm(x.double(), (d,)).abs()).sum(1).clamp_min(1)
    assert ((gw.double() - ref_w).abs() <= 1e-5 * scale).all()
    assert ((gb.double() - ref_b).abs() <= 1e-5 * g.double().abs().sum(1).clamp_min(1)).all()


def test_layer_norm_backward_strided_and_empty(calls):
    b, t, d = 2, 70, 96
    x = torch.randn(b, 2 * t, d + 8, device=DEV)[:, ::2, 4 : 4 + d]
    g = torch.randn(b, t, d + 3, device=DEV)[:, :, :d]
    w = torch.randn(d, device=DEV)
    dx, gw, gb = K.layer_norm_backward(x, g, w, 1e-5)
    ref_dx, ref_w, ref_b = _ln_backward_ref(x, g, w, None)
    assert (dx.double() - ref_dx).abs().max() <= 1e-4 and (gw.double() - ref_w).abs().max() <= 1e-4
    assert (gb.double() - ref_b).abs().max() <= 1e-4
    empty = torch.randn(0, 5, d, device=DEV)
    dx, gw, gb = K.layer_norm_backward(empty, empty, w, 1e-5)
    assert dx.shape == (0, 5, d) and gw.shape == gb.shape == (0, d)
    # too wide for one program's rows: not taken (the caller uses PyTorch's backward)
    wide = torch.randn(1, 2, K._ops.LN_BWD_MAX_D + 1, device=DEV)
    assert K.layer_norm_backward(wide, wide, None, 1e-5) is None


# ------------------------------------------------------------------------------------------------ coefficients
KINDS = ["norm2", "automatic", "abadi", "autov", "psac"]
C, SCALE, OUT_SCALE, GAMMA, R = 0.7, 3.0, 0.25, 0.05, 0.1


def coef_ref(parts, kind):
    """The contract's formulas in float64."""
    n2 = sum(t.double().sum(1) if sq else t.double().square().sum(1) for t, sq in parts)
    if kind == "norm2":
        return n2
    norm = SCALE * n2.sqrt()
    if kind == "automatic":
        phi = C / (norm + GAMMA)
    elif kind == "abadi":
        phi = torch.clamp(C / (norm + 1e-6), max=1.0)
    elif kind == "autov":
        phi = torch.where(norm > 0, C / norm, torch.zeros_like(norm))
    else:
        phi = C / (norm + R / (norm + R))
    return OUT_SCALE * phi


def make_parts(n: int, b: int = 7) -> list[tuple[torch.Tensor, bool]]:
    """n sources of different widths, alternately squared partial sums and raw entries, one transposed and one
    a column slice; sample 0 is all zeros, the others spread over orders of magnitude around the threshold."""
    s = torch.logspace(-4, 1, b)
    s[0] = 0
    parts = []
    for k in range(n):
        m = [5, 1, 37, 600, 3, 64][k]
        if k % 2 == 0:  # raw per-sample entries
            t = torch.randn(b, m) * s[:, None]
            if k == 2:
                t = t.t().contiguous().t()  # non-contiguous: last stride b
                assert t.stride(-1) != 1
            parts.append((t.to(DEV), False))
        else:  # squared contributions (non-negative)
            t = (torch.rand(b, m + 7) * s[:, None] ** 2)[:, 3 : 3 + m]  # column slice: row stride m + 7
            assert t.stride(0) == m + 7
            parts.append((t.to(DEV), True))
    return parts


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_clip_coef(calls, kind, n):
    parts = make_parts(n)
    out = K.clip_coef(parts, kind, C, SCALE, OUT_SCALE, GAMMA, R)
    assert calls["clip_coef"] == (1 if n <= 4 else 2)  # more than 4 sources: chained launches
    assert out.shape == (7,) and out.dtype == torch.float32
    ref = coef_ref(parts, kind)
    if kind in ("norm2", "autov"):
        assert out[0] == 0  # the all-zero sample
    assert rel(out, ref).max() <= 1e-5, (out, ref)
    if kind == "abadi":  # the setting clips some samples and leaves others
        assert (ref[1:] < OUT_SCALE).any() and (ref[1:] == OUT_SCALE).any()
    torch_out = _torch_path(K.clip_coef, parts, kind, C, SCALE, OUT_SCALE, GAMMA, R)
    assert torch.allclose(out, torch_out, rtol=2e-6, atol=0), (out, torch_out)


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_clip_coef_sample_mask(calls, kind, n):
    """A graphed step's padding rows: coefficient exactly 0 where the mask is 0 (also for a NaN norm), the
    others as without the mask; squared norms ('norm2') ignore the mask. Kernel and PyTorch path agree."""
    parts = make_parts(n)
    parts[0][0][3] = float("nan")  # a padding row whose norm is not even finite
    mask = torch.tensor([1, 1, 1, 0, 1, 0, 0], dtype=torch.float32, device=DEV)
    plain = K.clip_coef(parts, kind, C, SCALE, OUT_SCALE, GAMMA, R)
    out = K.clip_coef(parts, kind, C, SCALE, OUT_SCALE, GAMMA, R, mask)
    assert calls["clip_coef"] == 2 * (1 if n <= 4 else 2)
    keep = mask != 0
    assert torch.equal(out[keep], plain[keep])
    if kind == "norm2":
        assert torch.equal(out.nan_to_num(-1.0), plain.nan_to_num(-1.0))
    else:
        assert torch.equal(out[~keep], torch.zeros(3, device=DEV))
    torch_out = _torch_path(K.clip_coef, parts, kind, C, SCALE, OUT_SCALE, GAMMA, R, mask)
    assert torch.allclose(out.nan_to_num(-1.0), torch_out.nan_to_num(-1.0), rtol=2e-6, atol=0), (out, torch_out)


@pytest.mark.parametrize("squared", [False, True])
def test_clip_coef_wide_parts_are_reduced_first(calls, squared):
    """Rows wider than kernels.WIDE (instantiated per-sample gradients) are summed by PyTorch before the kernel,
    which gives each sample a single program; the result is the same."""
    b, m = 3, K.WIDE + 1000
    wide = torch.randn(b, m) * torch.tensor([[0.5], [2.0], [7.0]])
    if squared:
        wide = wide.square()
    parts = [(wide.to(DEV), squared)] + make_parts(2, b=3)
    out = K.clip_coef(parts, "automatic", C, SCALE, OUT_SCALE, GAMMA, R)
    assert calls["clip_coef"] == 1
    assert rel(out, coef_ref(parts, "automatic")).max() <= 1e-5


@pytest.mark.parametrize("dtype", FP16[1:], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_clip_coef_16bit_parts(calls, kind, dtype):
    parts = [(t.to(dtype), sq) for t, sq in make_parts(3)]
    out = K.clip_coef(parts, kind, C, SCALE, OUT_SCALE, GAMMA, R)
    assert calls["clip_coef"] == 1
    ref = coef_ref(parts, kind)  # of the 16-bit values, squared and summed in float32 by the kernel
    assert rel(out, ref).max() <= 1e-5, (out, ref)


# ------------------------------------------------------------------------------------------------ row scaling
def scale_exact(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """coef_i · x_i in float64 (exact for float32 and 16-bit factors)."""
    return x.double() * coef.double().reshape(-1, *([1] * (x.dim() - 1)))


def scale_f32(x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The intended arithmetic: the float32 product, rounded once to x's dtype."""
    return (x.float() * coef.float().reshape(-1, *([1] * (x.dim() - 1)))).to(x.dtype)


def awkward_coef(b: int) -> torch.Tensor:
    """float32 coefficients that no 16-bit type holds exactly, one exact 0 (a padding row) and one 1."""
    coef = torch.rand(b, dtype=torch.float32) * 0.7 + 0.1 + 1e-4
    coef[0], coef[-1] = 0.0, 1.0
    return coef


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("shape", [(3, 197, 40), (5, 3000), (2, 1, 1), (4, 7, 3, 5), (3, 2100, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_scale_rows(calls, shape, dtype):
    x = torch.randn(shape, device=DEV).to(dtype)
    coef = awkward_coef(shape[0]).to(DEV)
    out = K.scale_rows(x, coef)
    assert calls["scale_rows"] == 1
    assert torch.equal(K.scale_rows(x[1:], coef[1:]), out[1:])
    assert torch.equal(K.scale_rows(x[::2], coef[::2]), out[::2])  # strided samples and coefficients
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, scale_f32(x, coef))
    # one rounding of the exact product: within half a unit in the last place of x's dtype (plus float32's)
    half_ulp = torch.finfo(dtype).eps / 2 + 2 ** -24
    nz = x != 0
    assert rel(out[nz], scale_exact(x, coef)[nz]).max() <= half_ulp
    if dtype != torch.float32 and x.numel() > 1000:
        # what rounding the coefficient to x's dtype first gives (it scales a sample systematically)
        rounded = x * coef.to(dtype).reshape(-1, *([1] * (x.dim() - 1)))
        assert not torch.equal(rounded, out)
    assert torch.equal(_torch_path(K.scale_rows, x, coef), out)  # the PyTorch path: the same single rounding
    assert not out[0].any()  # coefficient 0: the padding row contributes exactly nothing


def test_scale_rows_strides_and_empty(calls):
    base = torch.randn(6, 9, 10, device=DEV).half()
    coef = awkward_coef(3).to(DEV)
    every_other = base[::2]  # samples apart, each one dense: the kernel reads it in place
    assert torch.equal(K.scale_rows(every_other, coef), scale_f32(every_other, coef))
    assert calls["scale_rows"] == 1
    cut = base[:3, :, :7]  # rows of a sample not adjacent: the PyTorch path, same values
    out = K.scale_rows(cut, coef)
    assert calls["scale_rows"] == 1 and out.is_contiguous()
    assert torch.equal(out, scale_f32(cut, coef))
    assert K.scale_rows(torch.randn(0, 4, device=DEV).half(), torch.ones(0, device=DEV)).shape == (0, 4)


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("shape", [(5, 1, 3), (3, 70, 65), (2, 129, 130), (4, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_scale_rows_feature_major(calls, shape, dtype):
    """k_major: the same single-rounding product, written as a (B, T, W) view of a contiguous (W, B·T) array (the
    summed dimension of the weight-gradient product contiguous), by the kernel and by the PyTorch path."""
    b, t, w = shape
    x = torch.randn(b, t, w, device=DEV).to(dtype)
    coef = awkward_coef(b).to(DEV)
    coef[-1] = 0.0
    out = K.scale_rows(x, coef, k_major=True)
    assert calls["scale_rows_t"] == 1 and calls["scale_rows"] == 0
    assert out.shape == x.shape and out.dtype == dtype
    assert out.flatten(0, 1).t().is_contiguous()  # a view of a contiguous (W, B·T) array
    assert torch.equal(out, scale_f32(x, coef))
    assert not out[-1].any()
    assert torch.equal(_torch_path(K.scale_rows, x, coef, k_major=True), out)
    # any strides in: a transposed and a sliced input
    xt = torch.randn(b, w, t, device=DEV).to(dtype).transpose(1, 2)
    assert torch.equal(K.scale_rows(xt, coef, k_major=True), scale_f32(xt, coef))
    xs = torch.randn(b, t, w + 7, device=DEV).to(dtype)[:, :, 3 : 3 + w]
    assert torch.equal(K.scale_rows(xs, coef, k_major=True), scale_f32(xs, coef))
    assert K.scale_rows(x[:0], coef[:0], k_major=True).shape == (0, t, w)


def test_k_major_scaling_choice(monkeypatch):
    """Feature-major scaled copies for float32 only (TF32 products gain; 16-bit ones do not), on the GPU or in
    force mode."""
    x32, x16 = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.float16)
    monkeypatch.setattr(K, "_MODE", "force")
    assert K.k_major_scaling(x32) and not K.k_major_scaling(x16) and not K.k_major_scaling(x32.double())
    assert not K.k_major_scaling(x32[0])  # not (B, T, W)
    monkeypatch.setattr(K, "_MODE", "auto")
    assert not K.k_major_scaling(x32)  # a CPU tensor outside force mode


@pytest.mark.parametrize("dtype", FP16, ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (7, 3001), (33, 1024), (4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_coef_sum_kernel(calls, shape, dtype):
    """Σ_i coef_i ps_i of per-sample gradients: products and sum in float32, coefficients not rounded to 16 bits."""
    ps = torch.randn(shape, device=DEV).to(dtype)
    coef = awkward_coef(shape[0]).to(DEV)
    p = torch.empty(shape[1], device=DEV)
    out = rules_base.coef_sum(coef, ps, p)
    assert calls["coef_sum"] == (dtype != torch.float32)  # float32: one cuBLAS product (less host time)
    assert out.dtype == torch.float32 and out.shape == (shape[1],)
    exact = (coef.double()[:, None] * ps.double()).sum(0)
    assert (out.double() - exact).abs().max() <= 1e-6 * (coef.double()[:, None] * ps.double()).abs().sum(0).max()
    # in the parameter's dtype, and through a strided view of samples
    half = rules_base.coef_sum(coef[::2], ps[::2], p.to(dtype))
    assert half.dtype == dtype
    terms = coef.double()[::2, None] * ps[::2].double()
    exact_half = terms.sum(0)
    # float32 sums (relative to the terms' size), then one rounding to the dtype
    bound = torch.finfo(dtype).eps / 2 * exact_half.abs() + 1e-6 * terms.abs().sum(0) + 1e-30
    assert ((half.double() - exact_half).abs() <= bound).all()


# ------------------------------------------------------------------------------------------------ end to end
GROUPS = ["all-layer", "layer-wise", "param-wise"]
CLIPS = ["automatic", "abadi"]


class SeqNet(nn.Module):
    """Linear on (B, T, D) input -> LayerNorm -> tanh -> Linear."""

    def __init__(self, d_in=64, d=72, d_out=64):
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, d_out)
        with torch.no_grad():  # move LayerNorm off weight 1, bias 0
            self.norm.weight.add_(0.1 * torch.randn(d))
            self.norm.bias.add_(0.1 * torch.randn(d))

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def record_ghost_T(monkeypatch) -> list[int]:
    """Sequence lengths the ghost kernel was launched with."""
    seen: list[int] = []
    inner = K._ops.ghost_partials

    def rec(a, g, *args, **kw):
        seen.append(a.shape[1])
        return inner(a, g, *args, **kw)

    monkeypatch.setattr(K._ops, "ghost_partials", rec)
    return seen


@pytest.mark.parametrize("clipping", CLIPS)
@pytest.mark.parametrize("groups", GROUPS)
def test_engine_linear_layernorm(calls, monkeypatch, groups, clipping):
    b, t = 4, 130
    assert t > TILE  # several tiles: the off-diagonal one counts twice
    # sizes for which the engine picks the ghost norm by itself: T²(R+C) < 600·R·C
    assert rules_base.prefer_ghost(t, 72, 64) and rules_base.prefer_ghost(t, 64, 72)
    model = SeqNet()
    x, target, w = make_mse_inputs(model, torch.randn(b, t, 64))
    inputs = tuple(v.to(DEV) for v in (x, target, w))
    model.to(DEV)
    seen = record_ghost_T(monkeypatch)
    c = spread_C(model, weighted_mse, inputs) if clipping == "abadi" else 1.0
    check_against_oracle(model, weighted_mse, inputs, C=c, clipping=clipping, groups=groups, rtol=1e-4,
                         dtype=torch.float32)
    assert seen == [t, t], seen  # both Linear layers took the fused ghost kernel
    # the LayerNorm's input gradient and per-sample gradients in one fused pass
    assert calls["layer_norm_backward"] == 1 and calls["layer_norm_ps"] == 0
    assert calls["clip_coef"] >= 1


class NormFirst(nn.Module):
    """LayerNorm straight on the input (no input gradient needed: the per-sample-only kernel), then a Linear and
    a second LayerNorm whose weight is frozen (the fused backward, bias only)."""

    def __init__(self, d=40):
        super().__init__()
        self.first = nn.LayerNorm(d)
        self.mid = nn.Linear(d, d)
        self.last = nn.LayerNorm(d)
        with torch.no_grad():
            for m in (self.first, self.last):
                m.weight.add_(0.2 * torch.randn(d))
                m.bias.add_(0.2 * torch.randn(d))
        self.last.weight.requires_grad_(False)

    def forward(self, x):
        return self.last(torch.tanh(self.mid(self.first(x)))).tanh()



class NormShapes(nn.Module):
    """A LayerNorm over the last two dims (rows of 4·10 features) and one without a bias."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 10)
        self.two = nn.LayerNorm((4, 10))
        self.nob = nn.LayerNorm(10, bias=False)
        with torch.no_grad():
            self.two.weight.add_(0.3 * torch.randn(4, 10))
            self.two.bias.add_(0.3 * torch.randn(4, 10))
            self.nob.weight.add_(0.3 * torch.randn(10))

    def forward(self, x):
        return self.nob(torch.tanh(self.two(self.inp(x)))).flatten(1)


# (model, input shape, per-sample-only launches, fused backward launches)
NORM_CASES = [(NormFirst, (3, 21, 40), 1, 1), (NormShapes, (3, 4, 10), 0, 2)]


@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: c[0].__name__)
@pytest.mark.parametrize("groups", GROUPS)
def test_engine_layer_norm_paths(calls, groups, case):
    model_cls, shape, n_ps, n_fused = case
    model = model_cls()
    x, target, w = make_mse_inputs(model, torch.randn(*shape))
    inputs = tuple(v.to(DEV) for v in (x, target, w))
    model.to(DEV)
    check_against_oracle(model, weighted_mse, inputs, C=1.0, clipping="automatic", groups=groups, rtol=1e-4,
                         dtype=torch.float32)
    assert calls["layer_norm_ps"] == n_ps and calls["layer_norm_backward"] == n_fused


def gpt2(transformers):
    cfg = transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )
    model = transformers.GPT2LMHeadModel(cfg).float()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


def lm_loss(model, ids):
    logits = model(input_ids=ids).logits
    vocab = logits.shape[-1]
    per_tok = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none")
    return per_tok.view(ids.shape[0], -1).mean(1).mean()


@pytest.mark.parametrize("wide", [False, True], ids=["", "wide-kernel"])
@pytest.mark.parametrize("clipping", CLIPS)
@pytest.mark.parametrize("groups", GROUPS)
def test_engine_gpt2(calls, monkeypatch, groups, clipping, wide):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(rules_base, "GHOST_BALANCE", 1e12)  # every Conv1D takes the ghost norm
    wide_calls = []
    if wide:  # the tied 50-word lm_head (and every layer wider than 40) takes the split-feature kernel
        monkeypatch.setattr(K, "GHOST_KERNEL_MAX_D", 40)
        inner = K._ops.ghost_partials_wide
        monkeypatch.setattr(K._ops, "ghost_partials_wide",
                            lambda n, w, *a, **k: wide_calls.append(w.shape[2]) or inner(n, w, *a, **k))
    model = gpt2(transformers).to(DEV)
    ids = torch.randint(0, 50, (3, 12), device=DEV)
    ids[0, 3:6] = ids[0, 0]
    c = spread_C(model, lm_loss, (ids,)) if clipping == "abadi" else 1.0
    check_against_oracle(model, lm_loss, (ids,), C=c, clipping=clipping, groups=groups,
                         rtol=1e-4, dtype=torch.float32)
    # c_attn, c_proj, c_fc, mlp c_proj of the one block, and the tied lm_head's own term of wte's norm
    assert calls["ghost_partials"] == 5
    if wide:
        assert sorted(wide_calls) == [50, 96, 128, 128]  # lm_head, c_attn, c_fc, mlp c_proj (c_proj is 32 wide)
    assert calls["layer_norm_backward"] == 3 and calls["layer_norm_ps"] == 0  # ln_1, ln_2, ln_f
    assert calls["clip_coef"] >= 1


class QKV(nn.Module):
    """Three projections of one normalised input (q, k, v), a product of them, and a projection of another input."""

    def __init__(self, d=48):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 7.0, dim=-1)
        return self.o(torch.tanh(att @ self.v(h)))


class CheckpointedQKV(QKV):
    """QKV with its attention recomputed in backward (non-reentrant activation checkpointing)."""

    def forward(self, x):
        return checkpoint(super().forward, x, use_reentrant=False)


@pytest.mark.parametrize("model_cls", [QKV, CheckpointedQKV], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("clipping", CLIPS)
@pytest.mark.parametrize("groups", GROUPS)
def test_engine_q_k_v_share_their_input_gram(calls, monkeypatch, groups, clipping, model_cls):
    b, t = 3, TILE + 21
    monkeypatch.setattr(rules_base, "GHOST_BALANCE", 1e12)  # every Linear takes the ghost norm
    model = model_cls()
    x, target, w = make_mse_inputs(model, torch.randn(b, t, 48))
    inputs = tuple(v.to(DEV) for v in (x, target, w))
    model.to(DEV)
    modes = []
    inner = K._ops.ghost_partials

    def rec(a, g, *args, a_tiles=None, keep_a_tiles=None, **kw):
        modes.append("read" if a_tiles is not None else "keep" if keep_a_tiles is not None else "own")
        return inner(a, g, *args, a_tiles=a_tiles, keep_a_tiles=keep_a_tiles, **kw)

    monkeypatch.setattr(K._ops, "ghost_partials", rec)
    c = spread_C(model, weighted_mse, inputs) if clipping == "abadi" else 1.0
    check_against_oracle(model, weighted_mse, inputs, C=c, clipping=clipping, groups=groups, rtol=1e-4,
                         dtype=torch.float32)
    # o reads its own input; of q, k and v the first in backward keeps the tiles, the other two read them
    assert sorted(modes) == ["keep", "own", "read", "read"], modes
    # the clipped sums scale the shared input once where q, k and v share a coefficient (one group for all); in
    # float32 the scaled copies are written feature-major for the weight-gradient products
    assert calls["scale_rows_t"] == (2 if groups == "all-layer" else 4) and calls["scale_rows"] == 0, calls


# ------------------------------------------------------------------------------------------------ fallback
class _Broken:
    """Stands in for triton_ops where Triton cannot compile or launch (no compiler, unsupported GPU)."""

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise RuntimeError(f"cannot compile {name}")

        return fail


def test_kernel_failure_falls_back_to_the_same_maths_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(K, "_MODE", "auto")
    monkeypatch.setattr(K, "_ops", _Broken())
    monkeypatch.setattr(K, "active", lambda *ts: True)
    a, g = torch.randn(3, 9, 5), torch.randn(3, 9, 4)
    with caplog.at_level("WARNING", logger="groupclip.kernels"):
        got = K.ghost_partials(a, g).sum(1)
    assert K._ops is None  # switched off for the rest of the run
    assert "ghost_partials failed" in caplog.text
    assert rel(got, ghost_ref(a, g)).max() <= 1e-5
    parts = make_parts(3, b=3)
    monkeypatch.setattr(K, "_ops", _Broken())
    assert rel(K.clip_coef(parts, "automatic", C, SCALE, OUT_SCALE, GAMMA, R),
               coef_ref(parts, "automatic")).max() <= 1e-5
    assert K._ops is None


def test_kernel_failure_is_raised_in_force_mode(monkeypatch):
    monkeypatch.setattr(K, "_MODE", "force")
    monkeypatch.setattr(K, "_ops", _Broken())
    with pytest.raises(RuntimeError, match="cannot compile"):
        K.ghost_partials(torch.randn(2, 4, 3), torch.randn(2, 4, 3))


def test_ghost_kernel_choice_by_sequence_length(monkeypatch):
    """Up to GHOST_KERNEL_MAX_T positions, and at any T that is not a multiple of 8, the fused kernel; a
    negative limit turns it off."""
    monkeypatch.setattr(K, "_MODE", "auto")
    monkeypatch.setattr(K, "active", lambda *ts: True)
    monkeypatch.setattr(K, "GHOST_KERNEL_MAX_T", 256)

    def choice(t):
        return K.use_ghost_kernel(torch.empty(2, t, 3), torch.empty(2, t, 5))

    assert choice(256) and choice(197) and choice(1001)
    assert not choice(1024)

    def wide(t, dtype=torch.float16):  # an output layer over a 50257-word vocabulary
        return K.use_ghost_kernel(torch.empty(2, t, 3, dtype=dtype), torch.empty(2, t, K.GHOST_KERNEL_MAX_D + 1,
                                                                               dtype=dtype))

    assert wide(384) and wide(197) and not wide(1024) and not wide(385)  # 16-bit: up to T=384
    assert wide(1024, torch.float32) and not wide(1025, torch.float32)
    monkeypatch.setattr(K, "GHOST_KERNEL_MAX_T", -1)
    assert not choice(197) and not choice(16)
