"""Fused operations of the clipping path: Triton kernels on the GPU, the same maths in PyTorch elsewhere.

`GROUPCLIP_TRITON` chooses: `auto` (default) uses Triton for CUDA tensors when it is installed; `0` never;
`force` uses it for every float32/bfloat16/float16 tensor, also on the CPU (with `TRITON_INTERPRET=1`, for tests).
The PyTorch versions are the reference the kernels are tested against; float64 always takes them.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

_MODE = os.environ.get("GROUPCLIP_TRITON", "auto").lower()
try:
    if _MODE in ("0", "off", "false", "no"):
        raise ImportError("disabled by GROUPCLIP_TRITON")
    from groupclip.kernels import triton_ops as _ops
except Exception as e:  # no Triton, or no compiler for it: the PyTorch path is always there
    _ops = None
    log.debug("groupclip: Triton kernels unavailable (%s); using PyTorch operations", e)

_FAST = (torch.float32, torch.bfloat16, torch.float16)


def _run(name: str, *args, **kw):
    """Call a Triton op. If it cannot be compiled or launched here (no C compiler for Triton's launcher, an
    unsupported GPU), log it once and return None: the caller then computes the same quantity with PyTorch
    operations (the same maths, so nothing about privacy changes). Out-of-memory errors, and every error in
    `force` mode (tests), propagate."""
    global _ops
    try:
        return getattr(_ops, name)(*args, **kw)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:
        if _MODE == "force":
            raise
        log.warning("groupclip: the Triton kernel %s failed (%s: %s); using PyTorch operations from now on "
                    "(set GROUPCLIP_TRITON=0 to skip Triton)", name, type(e).__name__, e)
        _ops = None
        return None


def active(*ts: torch.Tensor) -> bool:
    """Whether the Triton path handles these tensors."""
    if _ops is None:
        return False
    force = _MODE == "force"
    for t in ts:  # a plain loop: this runs several times per layer and step
        if t.dtype not in _FAST or not (force or t.is_cuda):
            return False
    return True


# ------------------------------------------------------------------------------ ghost norms
#: The fused ghost-norm kernel is used up to this many positions T, and at any T that is not a multiple of 8
#: (where cuBLAS would need padded copies). On an H100 it was 1.0-2.2x as fast as the two padded cuBLAS Gram
#: products plus the product-and-sum at every benchmarked shape (T = 197 to 1024; never slower); larger T rarely
#: takes the ghost path at all (instantiation is cheaper there). Environment: GROUPCLIP_GHOST_KERNEL_MAX_T;
#: negative turns it off.
GHOST_KERNEL_MAX_T = int(os.environ.get("GROUPCLIP_GHOST_KERNEL_MAX_T", "4096"))


#: Operands wider than this (a 50257-word output layer) take `ghost_partials_wide`: their features split over
#: many programs. One launch per tile over the whole width ran 192 programs on 132 SMs (GPT-2 T=256, B=64) and
#: lost to cuBLAS on aligned copies in bf16 (3.87 against 3.26 ms on an H100).
GHOST_KERNEL_MAX_D = 8192
#: ... up to this many positions in 16-bit, and GHOST_WIDE_MAX_T_F32 in float32. The split kernel against cuBLAS on
#: aligned chunk copies (H100, GPT-2's output layer, 16K tokens a batch, CUDA-graph timing, ms):
#:   T     256          384          512          768          1024
#:   bf16  2.31 / 3.10  3.04 / 3.32  3.76 / 3.73  5.44 / 4.50  6.62 / 5.35
#:   fp32  2.63 / 4.68  3.37 / 5.75  4.19 / 6.09  5.89 / 6.92  7.19 / 8.52
#: (benchmarks/results/h100-2026-11-24-ops-3.json, the kernel's flat grid); in 16-bit cuBLAS's large Gram
#: products win from T = 512. Float32 was not measured past 1024.
GHOST_WIDE_MAX_T = 384
GHOST_WIDE_MAX_T_F32 = 1024


def use_ghost_kernel(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether the fused kernel should compute the ghost norm of a (B,T,·), g (B,T,·)."""
    if not active(a, g) or GHOST_KERNEL_MAX_T < 0:
        return False
    t = a.shape[1]
    if _MODE == "force":
        return True
    if max(a.shape[2], g.shape[2]) > GHOST_KERNEL_MAX_D:
        return t <= (GHOST_WIDE_MAX_T_F32 if g.dtype == torch.float32 else GHOST_WIDE_MAX_T)
    return t <= GHOST_KERNEL_MAX_T or t % 8 != 0


class SharedInput:
    """One input tensor read by several layers of one step (q, k and v read one hidden state).

    Each reader counts itself in forward (`readers`). In backward the first of them to run the fused ghost kernel
    keeps the input's Gram tiles, the others read them instead of recomputing (a Gram over the input's width
    saved per extra reader), and the last one lets them go. The tiles are only read back for the very tensor
    they were computed from (address, shape, strides, dtype, version, TF32 setting); otherwise the reader
    computes its own. Lives in the readers' per-step records, never on a tensor."""

    __slots__ = ("readers", "arrived", "key", "source", "tiles")

    def __init__(self) -> None:
        self.readers = 0
        self.arrived = 0
        self.key: tuple | None = None
        self.source: torch.Tensor | None = None  # holds the storage, so the address in `key` is not reused
        self.tiles: torch.Tensor | None = None

    @staticmethod
    def _key(a: torch.Tensor) -> tuple:
        return (a.device, a.data_ptr(), a.shape, a.stride(), a.dtype, a._version,
                torch.backends.cuda.matmul.allow_tf32)

    def arrive(self, a: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """(tiles of a to read or None, whether to keep this reader's tiles for the readers still to come)."""
        self.arrived += 1
        last = self.arrived >= self.readers
        tiles = self.tiles if self.tiles is not None and self.key == self._key(a) else None
        if last:
            self.key = self.source = self.tiles = None
        return tiles, tiles is None and not last

    def skip(self) -> None:
        """A reader that computes its own Gram (a graphed clip tail, `groupclip.tails`): it arrives without
        keeping or reading tiles."""
        self.arrived += 1
        if self.arrived >= self.readers:
            self.key = self.source = self.tiles = None

    def keep(self, a: torch.Tensor, tiles: torch.Tensor) -> None:
        self.key, self.source, self.tiles = self._key(a), a.detach(), tiles


def ghost_partials(a: torch.Tensor, g: torch.Tensor, shared: SharedInput | None = None) -> torch.Tensor:
    """(B, m) squared contributions summing to ‖Σ_t g_t a_tᵀ‖² per sample; a (B,T,Da), g (B,T,Dg), same dtype.
    `shared`: a is an input that other layers read too (the fused kernel then shares its Gram tiles)."""
    if active(a, g):
        if a.dtype != g.dtype:  # the kernel reads both operands in one dtype
            a = a.to(g.dtype)
        if max(a.shape[2], g.shape[2]) > GHOST_KERNEL_MAX_D and _ops is not None:
            narrow, wide = (a, g) if g.shape[2] >= a.shape[2] else (g, a)  # the norm is symmetric in a and g
            out = _run("ghost_partials_wide", narrow, wide)
            if out is not None:
                return out
        tiles, keep = shared.arrive(a) if shared is not None and shared.readers > 1 else (None, False)
        kept = _ops.gram_tiles(a) if keep else None
        out = _run("ghost_partials", a, g, a_tiles=tiles, keep_a_tiles=kept) if _ops is not None else None
        if out is not None:
            if keep:
                shared.keep(a, kept)
            return out
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    aa = torch.bmm(a.to(acc), a.to(acc).transpose(1, 2))
    gg = torch.bmm(g.to(acc), g.to(acc).transpose(1, 2))
    return (aa * gg).sum(dim=(1, 2))[:, None]


# ------------------------------------------------------------------------------ LayerNorm
def layer_norm_ps(x, mean, rstd, g, weight: bool, bias: bool):
    """Per-sample Σ_t g ⊙ (x − mean)·rstd and Σ_t g, each (B, D) in float32 (float64 for float64 input)."""
    if active(x, g) and x.stride(-1) == 1 and g.stride(-1) == 1:
        out = _run("layer_norm_ps", x, mean.reshape(-1), rstd.reshape(-1), g, weight, bias)
        if out is not None:
            return out
    acc = torch.float64 if torch.float64 in (x.dtype, g.dtype) else torch.float32
    g = g.to(acc)
    gw = (g * ((x.to(acc) - mean) * rstd)).sum(1) if weight else None
    gb = g.sum(1) if bias else None
    return gw, gb


def layer_norm_fits(x, g, w) -> bool:
    """Whether `layer_norm_backward` takes these operands (x, g (B, T, D); w (D,) or None)."""
    return (active(x, g) and x.stride(-1) == 1 and g.stride(-1) == 1 and x.shape[-1] <= _ops.LN_BWD_MAX_D
            and (w is None or w.is_contiguous()))


def layer_norm_backward(x, g, w, eps, out=None):
    """LayerNorm's input gradient and per-sample (weight, bias) gradients in one pass, or None where the fused
    kernel does not apply (then PyTorch's backward and `layer_norm_ps` give the same). x, g (B, T, D); w (D,) or
    None; `eps` the LayerNorm's (the kernel computes the row statistics again from x); `out`: a contiguous tensor
    of x's shape and dtype to write the input gradient into (`groupclip.tails`)."""
    if not layer_norm_fits(x, g, w):
        return None
    return _run("layer_norm_backward", x, g, w, eps, out=out)


# ------------------------------------------------------------------------------ scaling by the coefficient
def scale_rows(x: torch.Tensor, coef: torch.Tensor, k_major: bool = False) -> torch.Tensor:
    """coef_i · x_i for every sample i of x (B, ...), as a new tensor in x's dtype (contiguous).

    The product is formed in float32 (float64 for float64 input) and rounded once: a 16-bit x does not also get a
    rounded coefficient, which would scale every entry of a sample by the same rounding error (up to 2^-9 of
    the clipped norm in bfloat16, systematically in one direction for that sample).

    `k_major` (x of shape (B, T, W)): the result is a (B, T, W) view of a contiguous (W, B·T) array instead, the
    layout in which a product summing over B·T reads it fastest (see `k_major_scaling`)."""
    if active(x) and (k_major or (x.dim() >= 2 and (x.is_contiguous() or _sample_contiguous(x)))):
        out = _run("scale_rows_t" if k_major else "scale_rows", x, coef)
        if out is not None:
            return out
    acc = torch.float64 if torch.float64 in (x.dtype, coef.dtype) else torch.float32
    if k_major:
        bsz, t, w = x.shape
        out = torch.empty((w, bsz * t), device=x.device, dtype=x.dtype)
        rows = coef.to(acc).repeat_interleave(t)[None, :]
        torch.mul(x.reshape(bsz * t, w).t(), rows, out=out)  # computed in `acc`, written in x's dtype
        return out.t().view(bsz, t, w)
    c = coef.to(acc).reshape(-1, *([1] * (x.dim() - 1)))
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    return torch.mul(x, c, out=out)  # computed in `acc`, written in x's dtype: one rounding


def k_major_scaling(x: torch.Tensor) -> bool:
    """Whether a weight-gradient product's scaled factor should be written feature-major (`scale_rows(...,
    k_major=True)`): in float32 on the GPU, where cuBLAS's TF32 products summing over B·T rows run 1.1-1.5x as
    fast with one operand contiguous along B·T (H100, K = 25216, `benchmarks/scale_layout.py`: 768×3072 0.57 →
    0.38 ms, 3072×768 0.57 → 0.42, 768×768 0.151 → 0.118). bfloat16 products keep the row layout (their gain
    was not consistent between runs). `force` mode takes it on the CPU too (tests)."""
    return x.dtype == torch.float32 and x.dim() == 3 and (x.is_cuda or _MODE == "force")


def coef_sum(coef: torch.Tensor, ps: torch.Tensor) -> torch.Tensor | None:
    """(N,) float32 Σ_i coef_i ps_i for 16-bit ps (B, N) by the kernel (products and sum in float32, one pass),
    or None where it does not apply (the caller's product then gives the same sum)."""
    if not (ps.dtype in (torch.bfloat16, torch.float16) and active(ps) and ps.dim() == 2 and ps.stride(1) == 1):
        return None  # float32 (bias sums, most per-sample values): one cuBLAS product, less host time a launch
    return _run("coef_sum", coef, ps)


def _sample_contiguous(x: torch.Tensor) -> bool:
    """Whether each x[i] is one dense block (any stride between samples)."""
    expect = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:]), strict=True):
        if size != 1 and stride != expect:
            return False
        expect *= size
    return True


# ------------------------------------------------------------------------------ coefficients
def clip_coef(parts: list[tuple[torch.Tensor, bool]], kind: str, c: float = 1.0, scale: float = 1.0,
              out_scale: float = 1.0, gamma: float = 0.01, r: float = 0.01,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared norm (kind='norm2') or clip coefficient out_scale·φ(scale·‖g_i‖) of one group.

    `parts` are (B, m) tensors: flagged True when they hold squared contributions (partial sums), False when
    they hold per-sample gradient entries to be squared. `mask` (B,) float32: the coefficient of a sample where
    it is 0 is exactly 0 (padding rows of a graphed step), whatever its norm."""
    if kind == "norm2":
        mask = None
    fused = _ops is not None
    rows = []
    for t, sq in parts:  # one pass: (B, m) rows, and whether the kernel takes them all
        if t.dim() != 2:
            t = t.reshape(t.shape[0], -1)
        fused = fused and active(t)
        rows.append((t, sq))
    parts = rows
    if fused:
        # the kernel gives each sample one program: wide rows (instantiated per-sample gradients, millions of
        # entries) are reduced first by PyTorch's parallel reduction
        parts = [(_row_sums(t, sq), True) if t.shape[1] > WIDE else (t if t.stride(-1) == 1 else t.contiguous(), sq)
                 for t, sq in parts]
        while len(parts) > 4 and _ops is not None:
            head = _run("clip_coef", parts[:4], "norm2", c, scale, out_scale, gamma, r)
            if head is not None:
                parts = [(head[:, None], True)] + parts[4:]
        out = _run("clip_coef", parts, kind, c, scale, out_scale, gamma, r, mask) if _ops is not None else None
        if out is not None:
            return out
    acc = torch.float64 if any(t.dtype == torch.float64 for t, _ in parts) else torch.float32
    n2 = None
    for t, sq in parts:
        v = t.to(acc).sum(1) if sq else torch.linalg.vector_norm(t, dim=1, dtype=acc).square()
        n2 = v if n2 is None else n2 + v
    if kind == "norm2" or n2.numel() == 0:
        return n2
    norm = n2.clamp_min(0).sqrt_().mul_(scale)
    coef = clip_factor(kind, norm, c, gamma, r).mul_(out_scale)
    return coef if mask is None else torch.where(mask != 0, coef, 0.0)


#: Rows wider than this are summed by PyTorch before the coefficient kernel.
WIDE = 16384


def _row_sums(t: torch.Tensor, squared: bool) -> torch.Tensor:
    if squared:
        return t.sum(1, keepdim=True, dtype=torch.float32)
    return torch.linalg.vector_norm(t, dim=1, keepdim=True, dtype=torch.float32).square()


def clip_factor(kind: str, norm: torch.Tensor, c: float, gamma: float = 0.01, r: float = 0.01) -> torch.Tensor:
    """φ(‖g‖) for one group with threshold c."""
    if kind == "abadi":
        return torch.clamp(c / (norm + 1e-6), max=1.0)
    if kind == "automatic":
        return c / (norm + gamma)
    if kind == "autov":
        return torch.where(norm > 0, c / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(norm))
    if kind == "psac":
        return c / (norm + r / (norm + r))
    raise ValueError(f"unknown clipping {kind!r}; choose one of automatic, autov, abadi, psac")
