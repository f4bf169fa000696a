"""Layout of the weight-gradient product's operands on a GPU (H100: results/h100-2026-11-24-scale-layout.json).

    python benchmarks/scale_layout.py --out scale-layout.json

A layer's clipped weight gradient is one product summing over K = B·T rows, gᵀ·(coef ⊙ x) (or the scaled side
swapped). Two parts, GPU time from CUDA-graph replays (10 calls, median of 20):
  gemm    the product alone at the benchmark's shapes, float32 (TF32) and bfloat16, with each operand either as
          stored (row by row: the feature dimension contiguous, "mn") or transposed (the summed B·T dimension
          contiguous, "k"), each checked against the as-stored product;
  scale   the clip path's scaling + product: `scale_rows` (as stored) against `scale_rows_t` (written
          feature-major), float32, at ViT and GPT-2 layer shapes; and the transposing kernel's tile settings.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from ghost_grid import gpu_ms

from groupclip.kernels import triton_ops as T

K_VIT = 128 * 197
GEMM_SHAPES = [(768, 768), (768, 3072), (3072, 768), (768, 2304)]  # (M, N) of the (M, K) x (K, N) product
#: (name, B, T, input width, output width, whether the input is the scaled (narrower) side)
SCALE_SHAPES = [("vit-qkv", 128, 197, 768, 768, True), ("vit-fc1", 128, 197, 768, 3072, True),
                ("vit-fc2", 128, 197, 3072, 768, False), ("g256-attn", 64, 256, 768, 2304, True),
                ("g256-mlp-proj", 64, 256, 3072, 768, False), ("g1024-fc", 16, 1024, 768, 3072, True)]
TILES = [(64, 64, 8), (64, 64, 4), (32, 64, 4), (64, 32, 4), (128, 32, 4), (128, 64, 8)]


def gemm_row(m: int, n: int, dt: torch.dtype) -> dict:
    a = torch.randn(K_VIT, m, device="cuda", dtype=dt)  # (K, M) as stored
    b = torch.randn(K_VIT, n, device="cuda", dtype=dt)
    at, bt = a.t().contiguous(), b.t().contiguous()  # K-major copies

    def mm(x, y):
        return torch.mm(x, y, out_dtype=torch.float32) if dt == torch.bfloat16 else torch.mm(x, y)

    ref = mm(a.t(), b).double()
    row = {"M": m, "N": n, "K": K_VIT, "dtype": str(dt).removeprefix("torch.")}
    for name, x, y in (("mn_mn", a.t(), b), ("k_mn", at, b), ("mn_k", a.t(), bt.t()), ("k_k", at, bt.t())):
        row[f"{name}_ms"] = round(gpu_ms(lambda x=x, y=y: mm(x, y)), 4)
        row[f"{name}_rel_err"] = float((mm(x, y).double() - ref).abs().max() / ref.abs().max())
        row[f"{name}_tflops"] = round(2 * m * n * K_VIT / row[f"{name}_ms"] / 1e9, 1)
    return row


def scale_row(name: str, b: int, t: int, wx: int, wg: int, scale_x: bool) -> dict:
    x = torch.randn(b, t, wx, device="cuda")
    g = torch.randn(b, t, wg, device="cuda")
    c = torch.rand(b, device="cuda")
    scaled = x if scale_x else g

    def product(s):
        return g.flatten(0, 1).t() @ s.flatten(0, 1) if scale_x else s.flatten(0, 1).t() @ x.flatten(0, 1)

    ref = product(T.scale_rows(scaled, c))
    row = {"shape": name, "B": b, "T": t, "input": wx, "output": wg,
           "rel_err": float((product(T.scale_rows_t(scaled, c)) - ref).abs().max() / ref.abs().max()),
           "as_stored_ms": round(gpu_ms(lambda: product(T.scale_rows(scaled, c))), 4),
           "feature_major_ms": round(gpu_ms(lambda: product(T.scale_rows_t(scaled, c))), 4),
           "scale_rows_ms": round(gpu_ms(lambda: T.scale_rows(scaled, c)), 4)}
    for bk, bw, warps in TILES:
        ms = gpu_ms(lambda bk=bk, bw=bw, warps=warps: T.scale_rows_t(scaled, c, bk, bw, warps))
        row[f"scale_rows_t_{bk}_{bw}_{warps}_ms"] = round(ms, 4)
    return row


def run_all(make, cases) -> list[dict]:
    rows = []
    for case in cases:
        row = make(*case)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    result = {"command": "python benchmarks/scale_layout.py --out " + args.out,
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "gemm": run_all(gemm_row, [(m, n, dt) for m, n in GEMM_SHAPES for dt in (torch.float32, torch.bfloat16)]),
              "scale": run_all(scale_row, SCALE_SHAPES)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'M x N':>11} {'dtype':8} {'mn_mn':>7} {'k_mn':>7} {'mn_k':>7} {'k_k':>7}  ms")
    for r in result["gemm"]:
        print(f"{r['M']:>5}x{r['N']:<5} {r['dtype']:8} {r['mn_mn_ms']:7.4f} {r['k_mn_ms']:7.4f} {r['mn_k_ms']:7.4f} "
              f"{r['k_k_ms']:7.4f}")
    print(f"{'shape':14} {'as stored':>9} {'feature-major':>13}  ms (scaling + product, float32)")
    for r in result["scale"]:
        print(f"{r['shape']:14} {r['as_stored_ms']:9.4f} {r['feature_major_ms']:13.4f}")


if __name__ == "__main__":
    main()
