"""The interface every layer rule implements, and helpers shared by the rules.

A rule turns one call of a layer into (a) its output, computed with autograd off, (b) the gradient of its
input, and (c) per-sample gradient facts for each trainable parameter: the squared norm, the clipped sum
Σ_i c_i G_i, and, where it can, a factorisation G_i = Σ_t r_t ⊗ c_t that lets two uses of one tensor be
combined without instantiating G_i (ghost inner products).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from groupclip import kernels
from groupclip.capture.context import Use

if TYPE_CHECKING:
    from groupclip.capture.casts import StepCasts


class EngineError(RuntimeError):
    """The engine cannot train this model privately as it stands; the message says what to change."""


@dataclass
class Factors:
    """G_i = Σ_t rows[i,t] ⊗ cols[i,t]. `rows` is dense (B,T,R) or, if `row_index`, integer (B,T) one-hots."""

    rows: torch.Tensor
    cols: torch.Tensor
    row_index: bool = False


class Rule:
    """Base class. Rules are stateless singletons; everything per call lives in the `Use`."""

    name = "rule"
    #: True when the rule computes the layer output inside a custom autograd Function (fast path).
    in_function = True

    def supports(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, module: nn.Module, qualname: str) -> None:
        """Raise EngineError if this module's configuration cannot be clipped per sample."""

    #: True when `forward` casts the module's weight and bias under autocast (through `casts`)
    casts_weights = False
    #: True when the rule has `fused_operands(use)` and `fused_input_grad(use, out, operands)` (LayerNorm): a backward
    #: kernel giving the input gradient and caching the per-sample gradients in one pass, which `groupclip.tails` can
    #: replay as a CUDA graph
    graphs_input_grad = False

    def forward(self, module: nn.Module, x: torch.Tensor, names: tuple[str, ...], x_grad: bool,
                casts: StepCasts | None = None):
        """Return (output, saved tensors or None, extra dict). Runs with autograd off.

        `names` are the trainable parameters of this call; `x_grad` whether the input needs a gradient. Rules with
        `casts_weights` are also given `casts`, the step's autocast copies of weights (`StepCasts.get(t, dtype)`
        instead of `t.to(dtype)`).
        """
        raise NotImplementedError

    def input_grad(self, module: nn.Module, use: Use, needs: bool) -> torch.Tensor | None:
        raise NotImplementedError

    def forward_facts(self, module: nn.Module, args: tuple, kwargs: dict) -> dict | None:
        """For a call through the generic path (`in_function` False): facts taken in forward that let the rule
        compute its per-sample gradients without a per-sample re-run (merged into the use's `extra`), or None:
        the re-run is needed (the outputs of children that read the module's inputs are recorded for it)."""
        return None

    def norms2(self, use: Use, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Per-sample squared gradient norms (B,) in float32 or wider, one entry per name."""
        return {n: kernels.clip_coef(self.norm_parts(use, (n,)), "norm2") for n in names}

    def norm_parts(self, use: Use, names: tuple[str, ...]) -> list[tuple[torch.Tensor, bool]]:
        """The squared norm of `names` together, as (B, m) sources for `kernels.clip_coef`: (t, True) holds
        squared contributions to be summed, (t, False) per-sample gradient entries to be squared and summed.
        Rules override either this or `norms2`."""
        return [(v[:, None], True) for v in type(self).norms2(self, use, names).values()]

    def clipped_sum(self, use: Use, coef: torch.Tensor, name: str) -> torch.Tensor:
        """Σ_i coef_i G_i for parameter `name`, shaped like the parameter."""
        raise NotImplementedError

    def per_sample(self, use: Use, name: str) -> torch.Tensor:
        """Instantiated per-sample gradients (B, *param.shape): only for a tensor with several uses."""
        raise NotImplementedError

    def factors(self, use: Use, name: str) -> Factors | None:
        return None

    def compact(self, use: Use) -> None:
        """Called for a use that waits for later uses of its group, after its norms are known: drop what the
        clipped sum will not need (rules whose per-sample gradients are small and already cached drop the
        saved input and the output gradient)."""


def sq_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norms of (B, ...) in float32 or wider, in one reduction pass."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1, dtype=acc_dtype(t)).square()


def flat_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) per-sample values as (B, m) rows: t itself where it is 2-D already (no view to make)."""
    return t if t.dim() == 2 else t.flatten(1)


def coef_sum(coef: torch.Tensor, ps: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ_i coef_i ps_i for per-sample tensors ps (B, *p.shape), in p's dtype.

    16-bit per-sample values are not multiplied by a 16-bit coefficient: rounding coef_i would scale sample i's
    whole gradient by the same error (up to 2^-9 of its clipped norm in bfloat16). On the GPU one kernel forms
    every product and the sum in float32; elsewhere the coefficient is split into a 16-bit head and tail, one
    product of two rows, accumulated in float32."""
    flat = flat_rows(ps)
    fused = kernels.coef_sum(coef, flat)
    if fused is not None:
        return param_dtype_like(fused, p).view(p.shape)
    if flat.dtype in _LOW:
        head = coef.to(flat.dtype)
        tail = (coef.float() - head.float()).to(flat.dtype)
        return param_dtype_like(_mm_f32(torch.stack((head, tail)), flat).sum(0), p).view(p.shape)
    # (B,) @ (B, N) is the product (1, B) @ (B, N) (matmul makes it one mm), without its two Python-side views
    out = param_dtype_like((coef if coef.dtype == flat.dtype else coef.to(flat.dtype)) @ flat, p)
    return out if p.dim() == 1 else out.view_as(p)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b of 16-bit operands with a float32 result: products exact, sums in float32 (on a GPU where the
    leading dimensions are aligned; otherwise the 16-bit product's round-to-nearest output)."""
    if not a.is_cuda:
        return a.float() @ b.float()
    if a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


class WeightBiasRule(Rule):
    """Shared norm / sum logic of layers with a matrix-like weight and a bias (linear, convolution).

    Subclasses give `_bias_ps` (per-sample bias gradients), `per_sample` (instantiated weight gradients,
    cached as use.cache["G"]), `_weight_ghost` (the ghost norm², or None when instantiation is cheaper; or
    `_weight_ghost_part`, the same as a norm source for `kernels.clip_coef`) and `_weight_sum` (Σ coef_i G_i
    without instantiating G).
    """

    def _bias_ps(self, use: Use) -> torch.Tensor:
        raise NotImplementedError

    def _weight_ghost(self, use: Use) -> torch.Tensor | None:
        raise NotImplementedError

    def _weight_sum(self, use: Use, coef: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_ghost_part(self, use: Use) -> tuple[torch.Tensor, bool] | None:
        ghost = self._weight_ghost(use)
        return None if ghost is None else (ghost[:, None], True)

    def norm_parts(self, use, names):
        parts = []
        for name in names:
            if name == "bias":
                parts.append((self._bias_ps(use), False))
                continue
            ghost = self._weight_ghost_part(use)
            parts.append(ghost if ghost is not None else (self.per_sample(use, name).flatten(1), False))
        return parts

    def compact(self, use):
        # the weight (or its autocast copy) served the input gradient only; the input stays for the sums
        use.saved = use.saved[:1]

    def clipped_sum(self, use, coef, name):
        p = use.unit.params[name]
        if name == "bias":
            return coef_sum(coef, self._bias_ps(use), p)
        if "G" in use.cache:  # instantiated for the norm: Σ c_i G_i replaces the weight-gradient product
            return coef_sum(coef, use.cache["G"], p)
        return self._weight_sum(use, coef, p)


def param_dtype_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == p.dtype else t.to(p.dtype)


def acc_dtype(*ts: torch.Tensor) -> torch.dtype:
    """Accumulation dtype for norms: float64 stays float64, everything else float32."""
    for t in ts:
        if t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two operands to one dtype (the output gradient's under autocast)."""
    if a.dtype != b.dtype:
        if b.dtype == torch.float64 or a.dtype == torch.float64:
            return a.double(), b.double()
        a = a.to(b.dtype)
    return a, b


_STEP_MEMOS: list = []  # the step's memos (each with a clear()): _TensorMemo's and rules' own
_MEMOS_OFF = [0]  # depth of `memos_off` scopes


@contextlib.contextmanager
def memos_off():
    """Scope in which the tensor memos neither return nor keep values (a CUDA-graph capture of a clip tail must
    compute everything it reads, not read a tensor cached from outside the graph)."""
    _MEMOS_OFF[0] += 1
    try:
        yield
    finally:
        _MEMOS_OFF[0] -= 1


def clear_step_memos() -> None:
    """Forget every memo of the step (at the end of a backward pass, and after a failed one)."""
    for memo in _STEP_MEMOS:
        memo.clear()


class _TensorMemo:
    """Results keyed by the identity of a live tensor (it holds a reference, so the address cannot be reused).

    Small and most-recent-first: consecutive layers reading one input (q, k, v projections) share work.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.items: list[tuple[tuple, torch.Tensor, object]] = []
        _STEP_MEMOS.append(self)

    @staticmethod
    def key(t: torch.Tensor, tag: object) -> tuple:
        return (t.data_ptr(), t.shape, t.stride(), t.dtype, t._version, tag)

    def get(self, t: torch.Tensor, tag: object):
        return None if _MEMOS_OFF[0] else self._find(self.key(t, tag))

    def put(self, t: torch.Tensor, tag: object, value) -> None:
        if not _MEMOS_OFF[0]:
            self._insert(self.key(t, tag), t, value)

    def get_or_make(self, t: torch.Tensor, tag: object, make, *args):
        """The value kept for (t, tag), or `make(*args)` kept for it now (one key computation for both)."""
        if _MEMOS_OFF[0]:
            return make(*args)
        k = self.key(t, tag)
        value = self._find(k)
        if value is None:
            value = make(*args)
            self._insert(k, t, value)
        return value

    def _find(self, k: tuple):
        items = self.items
        for i, item in enumerate(items):
            if item[0] == k:
                if i:
                    items.insert(0, items.pop(i))
                return item[2]
        return None

    def _insert(self, k: tuple, t: torch.Tensor, value) -> None:
        # keep t's storage (so its address is not reused while the key lives) but not its autograd history:
        # an input held with its graph would keep a failed step's activations alive (a tensor that requires no
        # gradient and is no view has no history to drop)
        kept = t.detach() if t.requires_grad or t._is_view() else t
        items = self.items
        items.insert(0, (k, kept, value))
        if len(items) > self.size:
            del items[self.size :]

    def clear(self) -> None:
        self.items.clear()


GRAMS = _TensorMemo()
SCALED = _TensorMemo(size=1)  # an input -> (coefficient, the input scaled by it, its version), see scaled_input
_ONE_COEF = [0]  # depth of `one_coefficient` scopes


@contextlib.contextmanager
def one_coefficient():
    """Scope of one group's clipped sums, all under one coefficient tensor: layers that read one input (q, k and v
    under all-layer clipping) scale it once (`scaled_input`); the copy is dropped when the scope ends."""
    _ONE_COEF[0] += 1
    try:
        yield
    finally:
        _ONE_COEF[0] -= 1
        if not _ONE_COEF[0]:
            SCALED.clear()


def scaled_input(x: torch.Tensor, coef: torch.Tensor, shared: bool, k_major: bool = False) -> torch.Tensor:
    """`kernels.scale_rows(x, coef, k_major)`; for an input several layers read (`shared`), inside
    `one_coefficient`, made once for the very same tensor, coefficient and layout (the memo holds the coefficient:
    its identity stays unique)."""
    if not (shared and _ONE_COEF[0]):
        return kernels.scale_rows(x, coef, k_major)
    tag = ("scaled", k_major)
    hit = SCALED.get(x, tag)
    if hit is not None and hit[0] is coef and hit[2] == coef._version:
        return hit[1]
    out = kernels.scale_rows(x, coef, k_major)
    SCALED.put(x, tag, (coef, out, coef._version))
    return out


_LOW = (torch.float16, torch.bfloat16)


def bmm_acc(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched product with a float32 (or wider) result, so norms are never rounded to 16 bits."""
    if x.dtype in _LOW:
        if x.is_cuda:
            return torch.bmm(x, y, out_dtype=torch.float32)
        return torch.bmm(x.float(), y.float())
    return torch.bmm(x, y)


def mm_into(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a @ b in the dtype of `like` (the parameter), without a separate cast where the GPU can avoid it.

    The float32-output product of 16-bit operands has no fast kernel for sizes that are not multiples of 8
    (a 50257-word output layer: 8 ms instead of under 1 on an H100); those take the 16-bit product and a cast,
    as autocast's own weight gradient does."""
    if a.dtype in _LOW and like.dtype == torch.float32 and a.is_cuda and not (a.shape[0] % 8 or a.shape[1] % 8
                                                                                or b.shape[1] % 8):
        return torch.mm(a, b, out_dtype=torch.float32)
    out = a @ b
    return out if out.dtype == like.dtype else out.to(like.dtype)


def _pad_dim(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Zero-pad `dim` to a multiple of 8 (one concatenation kernel)."""
    extra = -t.shape[dim] % 8
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat((t, t.new_zeros(shape)), dim)


def _gram(x: torch.Tensor, y: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """Per-sample x yᵀ, (B,T,S). On a GPU, sizes that are not multiples of 8 (T=197 tokens, a 50257-word
    vocabulary) give misaligned operands and slow kernels: zero-pad them (zeros add nothing to the Gram)."""
    if not (x.is_cuda if pad is None else pad):
        return bmm_acc(x, y.mT)
    s = y.shape[1]
    if x.shape[2] % 8 and x.numel() * x.element_size() > CHUNK_BYTES:
        return _chunked_gram(x, y)
    same = x is y
    x = _pad_dim(x, 2)
    y = x if same else _pad_dim(y, 2)
    y = _pad_dim(y, 1)
    return bmm_acc(x, y.transpose(1, 2))[:, :, :s]


#: Above this size a misaligned contraction (an output gradient over a 50257-word vocabulary) is not padded
#: in one copy, which would add a full extra copy at the backward's memory peak, but in aligned chunks.
CHUNK_BYTES = 256 * 2**20


def _chunked_gram(x: torch.Tensor, y: torch.Tensor, width: int = 4096) -> torch.Tensor:
    same = x is y
    out = None
    for j in range(0, x.shape[2], width):
        xc = _pad_dim(x[:, :, j : j + width].contiguous(), 2)
        yc = xc if same else _pad_dim(y[:, :, j : j + width].contiguous(), 2)
        yc = _pad_dim(yc, 1)
        part = bmm_acc(xc, yc.transpose(1, 2))
        out = part if out is None else out.add_(part)
    return out[:, :, : y.shape[1]]


def self_gram(x: torch.Tensor) -> torch.Tensor:
    """x xᵀ per sample, shared between layers that read the same input tensor."""
    return GRAMS.get_or_make(x, "gram", _gram, x, x)


def ghost_inner(u: Factors, v: Factors) -> torch.Tensor:
    """Per-sample <G_u, G_v> = Σ_{t,s} (r_t·r'_s)(c_t·c'_s) without forming G. Returns (B,)."""
    cu, cv = common(u.cols, v.cols)
    cc = self_gram(cu) if u is v else _gram(cu, cv)
    if u.row_index and v.row_index:
        rr = (u.rows[:, :, None] == v.rows[:, None, :]).to(cc.dtype)
    elif u.row_index:
        rr = v.rows.gather(2, u.rows[:, None, :].expand(-1, v.rows.shape[1], -1)).transpose(1, 2).to(cc.dtype)
    elif v.row_index:
        rr = u.rows.gather(2, v.rows[:, None, :].expand(-1, u.rows.shape[1], -1)).to(cc.dtype)
    else:
        ru, rv = common(u.rows, v.rows)
        rr = self_gram(ru) if u is v else _gram(ru, rv)
    if rr.dtype != cc.dtype:
        rr, cc = rr.double(), cc.double()
    return (rr * cc).sum(dim=(1, 2))


#: FLOPs a GPU does in the time it moves one byte of memory, times the 3 passes over an instantiated G_i.
#: Ghost norms cost 2T²(R+C) multiply-adds per sample; instantiating G_i replaces the weight-gradient
#: product (no extra multiply-adds) but writes and twice reads R·C elements per sample. On an H100 (about
#: 600 TFLOP/s bf16 against 3 TB/s, 300 TFLOP/s tf32) both precisions give ghost iff T²(R+C) < 600·R·C.
GHOST_BALANCE = 600.0
#: Never instantiate per-sample gradients of one layer larger than this many bytes (transient memory).
INSTANTIATE_MAX_BYTES = 512 * 2**20


def prefer_ghost(t: int, rows: int, cols: int, batch: int = 1, elem_size: int = 4) -> bool:
    """Choose the ghost norm over instantiating G_i for a layer with T positions and an R×C weight."""
    if batch * rows * cols * elem_size > INSTANTIATE_MAX_BYTES:
        return True
    return t * t * (rows + cols) < GHOST_BALANCE * rows * cols


#: Per round of `chunked_norms`: at most this many bytes of instantiated per-sample gradients.
NORM_CHUNK_BYTES = 256 * 2**20


def prefer_chunks(t: int, rows: int, cols: int, batch: int = 1, elem_size: int = 4) -> bool:
    """For a 16-bit layer too large to instantiate the whole batch's G_i (so `prefer_ghost` is True): whether ghost
    norms cost more multiply-adds, T²(R+C) a sample, than instantiating G_i once more, T·R·C, a few samples at a
    time (`chunked_norms`). GPT-2's output layer (50257×768) at T=1024 is one: on an H100 its norms took 4.98 ms
    this way against 5.49 ms of ghost norms in bf16 at B=16; in float32 (TF32) 9.19 against 8.55, so float32
    keeps ghost norms."""
    if elem_size > 2 or batch * rows * cols * elem_size <= INSTANTIATE_MAX_BYTES:
        return False
    return t * (rows + cols) > rows * cols


def chunked_norms(r: torch.Tensor, c: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """‖Σ_t r_t c_tᵀ‖² per sample, (B,), from G_i = r_iᵀ c_i instantiated a few samples at a time (never cached:
    the clipped sum uses the factors). `pad` (default: on the GPU) zero-pads widths to multiples of 8."""
    r, c = common(r, c)
    b, _, rows = r.shape
    k = max(1, NORM_CHUNK_BYTES // max(1, rows * c.shape[2] * 4))
    out = []
    for i in range(0, b, k):
        rr, cc = r[i : i + k], c[i : i + k]
        if rr.is_cuda if pad is None else pad:  # aligned leading dimensions (a 50257-word layer's are not)
            rr, cc = _pad_dim(rr, 2), _pad_dim(cc, 2)
        out.append(sq_norms(bmm_acc(rr.transpose(1, 2), cc)))
    return torch.cat(out) if out else r.new_zeros(0, dtype=acc_dtype(r))
