"""Triton kernels for the per-sample clipping path on the GPU (imported only where Triton is installed).

Each replaces a chain of small PyTorch operations by one launch:

* `ghost_partials`: per-sample ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s), tiled over (t, s) pairs of one
  sample; only the lower triangle of tiles is computed (the Gram products are symmetric) and neither Gram
  matrix is written to memory. Each program writes its partial sum; the partials are summed by `clip_coef`.
* `layer_norm_ps`: per-sample LayerNorm gradients Σ_t g ⊙ x̂ and Σ_t g from (x, mean, 1/std, g) in one pass.
* `layer_norm_backward`: the same per-sample gradients and LayerNorm's input gradient in one pass (a row per
  thread block row: the input gradient needs whole rows).
* `clip_coef`: per-sample squared norms from up to four sources (raw per-sample values or partial sums),
  and the clip coefficient φ(‖g_i‖)·scale/B of one group.
* `scale_rows`: every sample's factor times its clip coefficient (before the clipped sum's product), with
  vector loads and the product in float32; `scale_rows_t` the same written feature-major.
* `coef_sum`: Σ_i coef_i ps_i of instantiated per-sample gradients, in float32, one pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: clip functions by kernel code; 0 returns the squared norm itself
KINDS = {"norm2": 0, "automatic": 1, "abadi": 2, "autov": 3, "psac": 4}
_TILE = 128


@triton.jit
def _gram_tile(ptr, s_b, s_t, s_d, b, ti, tj, mi, mj, D,
               BI: tl.constexpr, BJ: tl.constexpr, BK: tl.constexpr, FP32: tl.constexpr, TF32: tl.constexpr,
               K0=0):
    """(BI, BJ) float32 block of one sample's Gram matrix x xᵀ, rows ti against rows tj, over features K0..D."""
    acc = tl.zeros((BI, BJ), dtype=tl.float32)
    for k0 in range(K0, D, BK):
        kk = k0 + tl.arange(0, BK)
        mk = kk < D
        base = ptr + b * s_b + kk[None, :] * s_d
        x = tl.load(base + ti[:, None] * s_t, mask=mi[:, None] & mk[None, :], other=0.0)
        y = tl.load(base + tj[:, None] * s_t, mask=mj[:, None] & mk[None, :], other=0.0)
        if FP32:
            if TF32:
                acc = tl.dot(x, tl.trans(y), acc, input_precision="tf32")
            else:
                acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(y), acc)
    return acc


@triton.jit
def _lower_pair(p):
    """Tile (i, j), j <= i, of the p-th lower-triangle pair in row order: (0,0), (1,0), (1,1), (2,0), ..."""
    i = ((tl.sqrt((8 * p + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= p, i + 1, i)  # the float square root can be one off either way
    i = tl.where(i * (i + 1) // 2 > p, i - 1, i)
    return i, p - i * (i + 1) // 2


@triton.jit
def _tile_slot(tiles_ptr, slot, BI: tl.constexpr):
    """Pointers to one (BI, BI) tile of the compact lower-triangle Gram tile buffer (`gram_tiles`): slot
    b·NL + p holds sample b's p-th lower-triangle tile."""
    return tiles_ptr + slot * (BI * BI) + tl.arange(0, BI)[:, None] * BI + tl.arange(0, BI)[None, :]


@triton.jit
def _pair_sum(prod, ti, tj, i, j):
    """Σ over the (t, s) pairs of lower-triangle tile (i, j) of the Gram product, each unordered pair counted as
    both (t, s) and (s, t)."""
    if j < i:  # wholly below the diagonal: each pair stands for (t, s) and (s, t)
        total = 2.0 * tl.sum(tl.sum(prod, axis=1), axis=0)
    else:  # on the diagonal: pairs below it twice, the diagonal once, pairs above it not at all
        below = tj[None, :] < ti[:, None]
        w = tl.where(below, 2.0, tl.where(tj[None, :] == ti[:, None], 1.0, 0.0))
        total = tl.sum(tl.sum(prod * w, axis=1), axis=0)
    return total


# The grids below are flat and put the batch slowest: one sample's tiles run side by side, so rows that two of
# its tiles read come from L2 the second time. With the batch on the fastest grid axis, the first tile of every
# sample ran before the second of any, each sample's rows were read from memory twice, and the kernel was
# memory-bound (H100, ViT MLP shape fp32 0.266 -> 0.170 ms, bf16 0.142 -> 0.088; benchmarks/NOTES.md).
@triton.jit
def _ghost_kernel(a_ptr, g_ptr, out_ptr, tiles_ptr, T, DA, DG, sa_b, sa_t, sa_d, sg_b, sg_t, sg_d, NL,
                  BI: tl.constexpr, BK: tl.constexpr, FP32: tl.constexpr, TF32: tl.constexpr,
                  A_TILES: tl.constexpr):
    """Program b·NL + p: sample b, lower-triangle tile pair p. A_TILES 0: compute both Gram tiles; 1: also store
    a's tile (compact lower triangle); 2: read a's tile from there instead of computing it (another layer read
    the same input)."""
    pid = tl.program_id(0).to(tl.int64)  # up to 2^31 - 1 programs
    b = pid // NL
    i, j = _lower_pair((pid % NL).to(tl.int32))
    ti = i * BI + tl.arange(0, BI)
    tj = j * BI + tl.arange(0, BI)
    mi = ti < T
    mj = tj < T
    if A_TILES != 0:
        at = _tile_slot(tiles_ptr, pid, BI)
    if A_TILES == 2:
        acc_a = tl.load(at)
    else:
        acc_a = _gram_tile(a_ptr, sa_b, sa_t, sa_d, b, ti, tj, mi, mj, DA, BI, BI, BK, FP32, TF32)
        if A_TILES == 1:
            tl.store(at, acc_a)
    acc_g = _gram_tile(g_ptr, sg_b, sg_t, sg_d, b, ti, tj, mi, mj, DG, BI, BI, BK, FP32, TF32)
    tl.store(out_ptr + pid, _pair_sum(acc_a * acc_g, ti, tj, i, j))


@triton.jit
def _ghost_split_kernel(g_ptr, tiles_ptr, out_ptr, T, DG, sg_b, sg_t, sg_d, NL, S, KCHUNK,
                        BI: tl.constexpr, BK: tl.constexpr, FP32: tl.constexpr, TF32: tl.constexpr):
    """The ghost kernel for a very wide g (an output layer over a vocabulary): program (b·S + split)·NL + p forms
    the g-Gram tile over one slice of g's features only, and multiplies it by a's whole Gram tile, read from
    `tiles_ptr` (the product is linear in the g-Gram, so the slices' partials add up)."""
    pid = tl.program_id(0).to(tl.int64)
    p = (pid % NL).to(tl.int32)
    b = pid // (NL * S)
    split = (pid // NL) % S
    i, j = _lower_pair(p)
    ti = i * BI + tl.arange(0, BI)
    tj = j * BI + tl.arange(0, BI)
    acc_a = tl.load(_tile_slot(tiles_ptr, b * NL + p, BI))
    k0 = split * KCHUNK
    acc_g = _gram_tile(g_ptr, sg_b, sg_t, sg_d, b, ti, tj, ti < T, tj < T, tl.minimum(DG, k0 + KCHUNK),
                       BI, BI, BK, FP32, TF32, k0)
    tl.store(out_ptr + pid, _pair_sum(acc_a * acc_g, ti, tj, i, j))


def _lower_pairs(t: int, tile: int) -> int:
    ni = triton.cdiv(max(t, 1), tile)
    return ni * (ni + 1) // 2


def ghost_partials_wide(a: torch.Tensor, g: torch.Tensor, programs: int = 1024, bk: int = 64,
                        num_warps: int = 8, num_stages: int | None = None) -> torch.Tensor:
    """`ghost_partials` for a g much wider than a: a's Gram tiles first (one launch over a's few features), then
    g's features split over enough programs to fill the GPU (a (B, T, 50257) output gradient in place: no
    aligned copies). (B, m) float32 partials."""
    bsz, t, _ = a.shape
    dg = g.shape[2]
    nl = _lower_pairs(t, _TILE)
    splits = max(1, min(triton.cdiv(programs, max(1, bsz * nl)), triton.cdiv(dg, 4 * bk)))
    kchunk = triton.cdiv(triton.cdiv(dg, splits), bk) * bk
    splits = triton.cdiv(dg, kchunk)
    out = torch.empty((bsz, splits * nl), device=a.device, dtype=torch.float32)
    if bsz == 0:
        return out
    tiles = gram_tiles(a)
    ghost_partials(a, a[:, :, :0], keep_a_tiles=tiles)  # a's tiles (a zero-width g: nothing else is computed)
    fp32 = g.dtype == torch.float32
    _ghost_split_kernel[(bsz * splits * nl,)](
        g, tiles, out, t, dg, g.stride(0), g.stride(1), g.stride(2), nl, splits, kchunk,
        BI=_TILE, BK=bk, FP32=fp32, TF32=bool(torch.backends.cuda.matmul.allow_tf32),
        num_warps=num_warps, num_stages=num_stages or (3 if fp32 else 4),
    )
    return out


def gram_tiles(a: torch.Tensor, tile: int = _TILE) -> torch.Tensor:
    """An uninitialised buffer for the lower-triangle Gram tiles of a (B, T, D), as the ghost kernel stores them."""
    return torch.empty((a.shape[0], _lower_pairs(a.shape[1], tile), tile, tile), device=a.device,
                       dtype=torch.float32)


def ghost_partials(a: torch.Tensor, g: torch.Tensor, tile: int = _TILE, bk: int | None = None,
                   num_warps: int = 8, num_stages: int | None = None,
                   a_tiles: torch.Tensor | None = None, keep_a_tiles: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) float32 partial sums whose row sums are the per-sample squared norms of Σ_t g_t a_tᵀ: one program
    per (tile × tile) block of the lower triangle of (t, s) pairs. `keep_a_tiles` (from `gram_tiles`) receives
    a's Gram tiles; `a_tiles` holds them already (computed from this same a)."""
    bsz, t, da = a.shape
    dg = g.shape[2]
    nl = _lower_pairs(t, tile)
    out = torch.empty((bsz, nl), device=a.device, dtype=torch.float32)
    if bsz == 0:
        return out
    fp32 = a.dtype == torch.float32
    mode = 2 if a_tiles is not None else 1 if keep_a_tiles is not None else 0
    tiles = a_tiles if mode == 2 else keep_a_tiles if mode == 1 else out
    if mode:
        assert tuple(tiles.shape) == (bsz, nl, tile, tile), "Gram tiles of another shape"
    _ghost_kernel[(bsz * nl,)](
        a, g, out, tiles, t, da, dg, a.stride(0), a.stride(1), a.stride(2), g.stride(0), g.stride(1), g.stride(2),
        nl,
        # float32: 32-wide steps in four pipeline stages (H100: 1-11% faster than 64-wide in three at the
        # benchmark's shapes with the flat grid; 64 in four does not fit in shared memory); 16-bit: 64 in four
        BI=tile, BK=bk or (32 if fp32 else 64), FP32=fp32, TF32=bool(torch.backends.cuda.matmul.allow_tf32),
        A_TILES=mode, num_warps=num_warps, num_stages=num_stages or 4,
    )
    return out


@triton.jit
def _ln_rows(x_ptr, g_ptr, mean_ptr, rstd_ptr, b, tt, mt, dd, md, T, sx_b, sx_t, sg_b, sg_t, NEED_X: tl.constexpr):
    """Rows tt (valid where mt) and columns dd (valid where md) of one sample, in float32: g, and with NEED_X the
    normalised input x̂ = (x − mean)·rstd (zero outside the valid block; g stands in for it otherwise), and rstd."""
    m2 = mt[:, None] & md[None, :]
    g = tl.load(g_ptr + b * sg_b + tt[:, None] * sg_t + dd[None, :], mask=m2, other=0.0).to(tl.float32)
    rs = tl.load(rstd_ptr + b * T + tt, mask=mt, other=0.0).to(tl.float32)
    xh = g
    if NEED_X:
        x = tl.load(x_ptr + b * sx_b + tt[:, None] * sx_t + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        mu = tl.load(mean_ptr + b * T + tt, mask=mt, other=0.0).to(tl.float32)
        xh = tl.where(m2, (x - mu[:, None]) * rs[:, None], 0.0)
    return g, xh, rs


@triton.jit
def _ln_ps_kernel(x_ptr, mean_ptr, rstd_ptr, g_ptr, gw_ptr, gb_ptr, T, D, T_PER, sx_b, sx_t, sg_b, sg_t, so_s,
                  HAS_W: tl.constexpr, HAS_B: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    split = tl.program_id(2)
    md = dd < D
    acc_w = tl.zeros((BD,), dtype=tl.float32)
    acc_b = tl.zeros((BD,), dtype=tl.float32)
    t_end = tl.minimum(T, (split + 1) * T_PER)
    for t0 in range(split * T_PER, t_end, BT):
        tt = t0 + tl.arange(0, BT)
        g, xh, _ = _ln_rows(x_ptr, g_ptr, mean_ptr, rstd_ptr, b, tt, tt < t_end, dd, md, T, sx_b, sx_t, sg_b, sg_t,
                            HAS_W)
        if HAS_W:
            acc_w += tl.sum(g * xh, axis=0)
        if HAS_B:
            acc_b += tl.sum(g, axis=0)
    out = split * so_s + b * D + dd
    if HAS_W:
        tl.store(gw_ptr + out, acc_w, mask=md)
    if HAS_B:
        tl.store(gb_ptr + out, acc_b, mask=md)


def _t_splits(t: int, min_rows: int, programs: int, others: int) -> tuple[int, int]:
    """(splits, positions per split) of T positions over programs, so that `others` programs per split give about
    `programs` in all, each split at least `min_rows` positions long."""
    splits = max(1, min(triton.cdiv(t, min_rows), triton.cdiv(programs, others))) if others else 1
    t_per = triton.cdiv(max(t, 1), splits)
    return triton.cdiv(max(t, 1), t_per), t_per


#: programs wanted per LayerNorm launch (about four waves on a 132-multiprocessor GPU; tuned on an H100)
_LN_PROGRAMS = 528


def layer_norm_ps(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, g: torch.Tensor,
                  weight: bool, bias: bool, bt: int = 32, bd: int = 128, num_warps: int = 4,
                  programs: int = _LN_PROGRAMS) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample LayerNorm gradients (B, D) float32 of x, g shaped (B, T, D), last dim contiguous;
    mean and rstd hold B·T values in (b, t) order. Few samples with long sequences split T over programs
    (partial sums added after, in a fixed order)."""
    bsz, t, d = x.shape
    bd = min(bd, triton.next_power_of_2(d))
    nd = triton.cdiv(d, bd)
    splits, t_per = _t_splits(t, 64, programs, bsz * nd)
    shape = (splits, bsz, d) if splits > 1 else (bsz, d)
    gw = torch.empty(shape, device=x.device, dtype=torch.float32) if weight else None
    gb = torch.empty(shape, device=x.device, dtype=torch.float32) if bias else None
    if bsz == 0:
        return gw, gb
    dummy = gw if gw is not None else gb
    _ln_ps_kernel[(bsz, nd, splits)](
        x, mean, rstd, g, dummy if gw is None else gw, dummy if gb is None else gb, t, d, t_per,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), bsz * d,
        HAS_W=weight, HAS_B=bias, BT=bt, BD=bd, num_warps=num_warps,
    )
    if splits > 1:
        gw = None if gw is None else gw.sum(0)
        gb = None if gb is None else gb.sum(0)
    return gw, gb


@triton.jit
def _ln_bwd_kernel(x_ptr, g_ptr, w_ptr, dx_ptr, gw_ptr, gb_ptr, T, D, T_PER, eps,
                   sx_b, sx_t, sg_b, sg_t, so_s, HAS_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    dd = tl.arange(0, BD)
    md = dd < D
    if HAS_W:
        w = tl.load(w_ptr + dd, mask=md, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BD,), dtype=tl.float32)
    acc_b = tl.zeros((BD,), dtype=tl.float32)
    t_end = tl.minimum(T, (split + 1) * T_PER)
    for t0 in range(split * T_PER, t_end, BT):
        tt = t0 + tl.arange(0, BT)
        mt = tt < t_end
        m2 = mt[:, None] & md[None, :]
        g = tl.load(g_ptr + b * sg_b + tt[:, None] * sg_t + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * sx_b + tt[:, None] * sx_t + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        # the row statistics again, from the whole rows this program holds (reads nothing more)
        mu = tl.sum(x, axis=1) / D
        xc = tl.where(m2, x - mu[:, None], 0.0)
        rs = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        xh = xc * rs[:, None]
        acc_w += tl.sum(g * xh, axis=0)
        acc_b += tl.sum(g, axis=0)
        if HAS_W:
            gw = g * w[None, :]
        else:
            gw = g
        c1 = tl.sum(gw * xh, axis=1) / D
        c2 = tl.sum(gw, axis=1) / D
        dx = (gw - xh * c1[:, None] - c2[:, None]) * rs[:, None]
        tl.store(dx_ptr + (b * T + tt[:, None]) * D + dd[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m2)
    out = split * so_s + b * D + dd
    tl.store(gw_ptr + out, acc_w, mask=md)
    tl.store(gb_ptr + out, acc_b, mask=md)


#: widest LayerNorm the fused backward takes (one program holds whole rows)
LN_BWD_MAX_D = 8192


def layer_norm_backward(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor | None, eps: float, num_warps: int = 8,
                        programs: int = _LN_PROGRAMS, rows: int | None = None, out: torch.Tensor | None = None):
    """LayerNorm's input gradient (B, T, D) in x's dtype together with the per-sample gradients of its weight and
    bias, Σ_t g ⊙ x̂ and Σ_t g, (B, D) float32, in one pass over (x, g); x and g with unit last stride. The row
    statistics are computed again from x (float32, two passes over the row in registers), so the kernel reads
    only x, g and w. `out`: a contiguous (B, T, D) tensor of x's dtype the input gradient is written into (and
    returned), instead of a new one."""
    bsz, t, d = x.shape
    bd = triton.next_power_of_2(d)
    bt = rows or max(1, min(16, 4096 // bd))  # rows per step: 4096 values (4 rows at D = 768)
    splits, t_per = _t_splits(t, bt, programs, bsz)
    dx = torch.empty((bsz, t, d), device=x.device, dtype=x.dtype) if out is None else out
    ps = torch.empty((2, splits, bsz, d), device=x.device, dtype=torch.float32)  # (weight, bias) partial sums
    if bsz == 0 or t == 0:
        ps = ps.sum(1).zero_()
        return dx, ps[0], ps[1]
    _ln_bwd_kernel[(bsz, splits)](
        x, g, ps if w is None else w, dx, ps[0], ps[1], t, d, t_per, eps,
        x.stride(0), x.stride(1), g.stride(0), g.stride(1), bsz * d,
        HAS_W=w is not None, BT=bt, BD=bd, num_warps=num_warps,
    )
    ps = ps.sum(1) if splits > 1 else ps[:, 0]
    return dx, ps[0], ps[1]


@triton.jit
def _accumulate(acc, ptr, width, stride, b, SQ: tl.constexpr, BK: tl.constexpr):
    for k0 in range(0, width, BK):
        kk = k0 + tl.arange(0, BK)
        v = tl.load(ptr + b * stride + kk, mask=kk < width, other=0.0).to(tl.float32)
        if SQ:
            v = v * v
        acc += v
    return acc


@triton.jit
def _phi(n2, c, scale, out_scale, gamma, r, KIND: tl.constexpr):
    """The squared norm itself (KIND 0) or the clip coefficient out_scale·φ(scale·‖g‖)."""
    if KIND == 0:
        res = n2
    else:
        norm = scale * tl.sqrt(tl.maximum(n2, 0.0))
        if KIND == 1:
            res = c / (norm + gamma)
        elif KIND == 2:
            res = tl.minimum(c / (norm + 1e-6), 1.0)
        elif KIND == 3:
            res = tl.where(norm > 0, c / tl.maximum(norm, 1e-38), 0.0)
        else:
            res = c / (norm + r / (norm + r))
        res = res * out_scale
    return res


@triton.jit
def _store_coef(out_ptr, mask_ptr, b, res, MASKED: tl.constexpr):
    """Store sample b's result; a masked-out sample (a padding row of a graphed step) gets exactly 0."""
    if MASKED:
        res = tl.where(tl.load(mask_ptr + b) != 0, res, 0.0)
    tl.store(out_ptr + b, res)


@triton.jit
def _coef_kernel(p0, w0, s0, p1, w1, s1, p2, w2, s2, p3, w3, s3, out_ptr, mask_ptr, c, scale, out_scale, gamma, r,
                 SQ0: tl.constexpr, SQ1: tl.constexpr, SQ2: tl.constexpr, SQ3: tl.constexpr,
                 KIND: tl.constexpr, MASKED: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BK,), dtype=tl.float32)
    acc = _accumulate(acc, p0, w0, s0, b, SQ0, BK)
    acc = _accumulate(acc, p1, w1, s1, b, SQ1, BK)
    acc = _accumulate(acc, p2, w2, s2, b, SQ2, BK)
    acc = _accumulate(acc, p3, w3, s3, b, SQ3, BK)
    _store_coef(out_ptr, mask_ptr, b, _phi(tl.sum(acc, axis=0), c, scale, out_scale, gamma, r, KIND), MASKED)


@triton.jit
def _coef2_kernel(p0, w0, s0, p1, w1, s1, out_ptr, mask_ptr, c, scale, out_scale, gamma, r,
                  SQ0: tl.constexpr, SQ1: tl.constexpr, KIND: tl.constexpr, MASKED: tl.constexpr,
                  BK: tl.constexpr):
    """`_coef_kernel` for at most two sources (a weight and a bias): half the arguments, and Triton's launcher
    costs the host time per argument."""
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BK,), dtype=tl.float32)
    acc = _accumulate(acc, p0, w0, s0, b, SQ0, BK)
    acc = _accumulate(acc, p1, w1, s1, b, SQ1, BK)
    _store_coef(out_ptr, mask_ptr, b, _phi(tl.sum(acc, axis=0), c, scale, out_scale, gamma, r, KIND), MASKED)


def clip_coef(parts: list[tuple[torch.Tensor, bool]], kind: str, c: float, scale: float, out_scale: float,
              gamma: float, r: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) float32: squared norm (kind 'norm2') or clip coefficient from at most four (B, m) sources.

    A source flagged True already holds squared contributions (partial sums); False means its entries are
    per-sample gradient values to be squared. Where `mask` (B,) is 0 the result is 0."""
    assert 1 <= len(parts) <= 4
    t0 = parts[0][0]
    bsz = t0.shape[0]
    out = torch.empty((bsz,), device=t0.device, dtype=torch.float32)
    if bsz == 0:
        return out
    slots = 2 if len(parts) <= 2 else 4
    args, flags = [], {}
    for i in range(slots):
        t, sq = parts[i] if i < len(parts) else (t0, True)
        args += [t, t.shape[1] if i < len(parts) else 0, t.stride(0)]
        flags[f"SQ{i}"] = not sq
    kernel = _coef2_kernel if slots == 2 else _coef_kernel
    kernel[(bsz,)](*args, out, out if mask is None else mask, float(c), float(scale), float(out_scale),
                   float(gamma), float(r), KIND=KINDS[kind], MASKED=mask is not None, BK=512, num_warps=4, **flags)
    return out


@triton.jit
def _scale_rows_kernel(x_ptr, coef_ptr, out_ptr, N, sx_b, CHUNKS, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // CHUNKS
    offs = (pid % CHUNKS) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    c = tl.load(coef_ptr + b).to(tl.float32)
    x = tl.load(x_ptr + b * sx_b + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * N + offs, (x * c).to(out_ptr.dtype.element_ty), mask=m)


def scale_rows(x: torch.Tensor, coef: torch.Tensor, block: int = 2048, num_warps: int = 4) -> torch.Tensor:
    """coef_i · x_i for every sample of x (B, ...), each sample's entries contiguous; a contiguous result in x's
    dtype, the product formed in float32. One flat stream per sample: vector loads and stores, unlike PyTorch's
    broadcasting multiply by coef[:, None, None] (its non-vectorised kernel, about half the memory speed)."""
    bsz = x.shape[0]
    n = x.numel() // bsz if bsz else 0
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if bsz == 0 or n == 0:
        return out
    chunks = triton.cdiv(n, block)
    _scale_rows_kernel[(bsz * chunks,)](x, coef.contiguous(), out, n, x.stride(0), chunks, BLOCK=block,
                                        num_warps=num_warps)
    return out


@triton.jit
def _scale_rows_t_kernel(x_ptr, coef_ptr, out_ptr, K, W, T, sx_b, sx_t, sx_w, BK: tl.constexpr, BW: tl.constexpr):
    """out[w, k] = coef[k // T] · x[k // T, k % T, w]: rows k = b·T + t of a (B, T, W) x, scaled and written
    feature-major (a (W, B·T) array); the product in float32."""
    k = tl.program_id(0).to(tl.int64) * BK + tl.arange(0, BK)
    w = tl.program_id(1).to(tl.int64) * BW + tl.arange(0, BW)
    mk = k < K
    m = mk[:, None] & (w < W)[None, :]
    b = k // T
    x = tl.load(x_ptr + (b * sx_b + (k % T) * sx_t)[:, None] + w[None, :] * sx_w, mask=m, other=0.0)
    c = tl.load(coef_ptr + b, mask=mk, other=0.0).to(tl.float32)
    y = (x.to(tl.float32) * c[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + w[None, :] * K + k[:, None], y, mask=m)


def scale_rows_t(x: torch.Tensor, coef: torch.Tensor, bk: int = 64, bw: int = 64, num_warps: int = 8) -> torch.Tensor:
    """coef_b · x[b] for x (B, T, W) (any strides), written feature-major: a (B, T, W) view of a contiguous
    (W, B·T) array, so that the B·T dimension, which a weight-gradient product sums over, is contiguous (cuBLAS's
    float32/TF32 products with a K-major operand). H100, CUDA-graph timing (`benchmarks/scale_layout.py`):
    scaling + product 0.60 → 0.45 ms at ViT's MLP shapes, 0.20 → 0.17 at its attention, 0.31 → 0.21 / 0.40 → 0.30
    at GPT-2's; the scaling alone 3-5% slower than `scale_rows` (64×64 tiles, 8 warps: the best of six)."""
    bsz, t, w = x.shape
    k = bsz * t
    out = torch.empty((w, k), device=x.device, dtype=x.dtype)
    if k and w:
        _scale_rows_t_kernel[(triton.cdiv(k, bk), triton.cdiv(w, bw))](
            x, coef.contiguous(), out, k, w, t, x.stride(0), x.stride(1), x.stride(2), BK=bk, BW=bw,
            num_warps=num_warps)
    return out.t().view(bsz, t, w)


@triton.jit
def _coef_sum_kernel(ps_ptr, coef_ptr, out_ptr, B, N, s_b, BLOCK: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for b in range(0, B):
        c = tl.load(coef_ptr + b).to(tl.float32)
        acc += c * tl.load(ps_ptr + b * s_b + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + cols, acc, mask=m)


def coef_sum(coef: torch.Tensor, ps: torch.Tensor, block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """(N,) float32 Σ_b coef_b · ps[b] for ps (B, N) with unit column stride: every product and the sum in
    float32, one pass over ps."""
    bsz, n = ps.shape
    out = torch.empty((n,), device=ps.device, dtype=torch.float32)
    if n == 0:
        return out
    _coef_sum_kernel[(triton.cdiv(n, block),)](ps, coef.contiguous(), out, bsz, n, ps.stride(0), BLOCK=block,
                                               num_warps=num_warps)
    return out
