"""GPU check of the fused residual add + RMSNorm + rotation ops against fp64, beside the unfused path.

One decode token, bf16, the 1B model's norm-fed shapes (q/k/v 3072 x 2048, gate/up 16384 x 2048): the fused op
(``transfigure::rmsnorm_lut_linear``: one kernel for add, norm, rotation), and what the graph runs without the
fusion (Inductor compiles the add + norm, then ``transfigure::lut_linear`` rotates and multiplies), each against
the same math in fp64 from the same packed weights. The rotated-sparsity twin against its own reference, which
decides the surviving entries the same way (rounded z), so most outputs agree to rounding.

    python benchmarks/check_norm_fusion.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transfigure.bench import environment  # noqa: E402
from transfigure.kernels import lut_format  # noqa: E402
from transfigure.kernels.grids import higgs_grid  # noqa: E402
from transfigure.kernels.rotation_prologue import rmsnorm_rotated_sparse_lut_linear_reference  # noqa: E402
from transfigure.kernels.rotated_sparse_lut import decode_layout  # noqa: E402


def _unfused(residual, delta, weight, eps, *lut_args):
    h = residual + delta
    hf = h.float()
    x = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return torch.ops.transfigure.lut_linear(x, *lut_args), h


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rows = []
    compiled = torch.compile(_unfused, fullgraph=True)
    table = higgs_grid(4).table
    for n in (3072, 16384):
        torch.manual_seed(n)
        packed = lut_format.pack(torch.randn(n, 2048) / 45, table, bits=4, group_size=128, hadamard_size=512,
                                 signs_seed=0)
        dense = lut_format.dequantize(packed, "original").double()[:, :2048].cuda()
        codes, scales, tab, signs = (t.cuda() for t in (packed.codes, packed.scales, packed.table, packed.signs))
        lut_args = (codes, scales, tab, signs, None, 4, 1, 128, 512, 2048)
        for trial in range(4):
            residual = (torch.randn(1, 1, 2048, device="cuda") * (1 + 4 * torch.rand(1, 1, 2048, device="cuda") ** 4)
                        ).bfloat16()
            delta = (torch.randn(1, 1, 2048, device="cuda") * 0.5).bfloat16()
            weight = (1 + 0.2 * torch.randn(2048, device="cuda")).bfloat16()
            h64 = residual.double() + delta.double()
            x64 = weight.double() * h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5)
            y64 = x64 @ dense.T
            fused, h_fused = torch.ops.transfigure.rmsnorm_lut_linear(residual, delta, weight, 1e-5, *lut_args)
            plain, h_plain = compiled(residual, delta, weight, 1e-5, *lut_args)
            scale = y64.abs().max().item()
            row = {"rows": n, "trial": trial,
                   "fused_max_err_rel": (fused.double() - y64).abs().max().item() / scale,
                   "unfused_max_err_rel": (plain.double() - y64).abs().max().item() / scale,
                   "fused_vs_unfused_rel": (fused.double() - plain.double()).abs().max().item() / scale,
                   "residual_equal": bool(torch.equal(h_fused, h_plain))}
            codes_tm, scales_tm = decode_layout(codes, scales)
            sparse_args = (residual, delta, weight, 1e-5, codes, scales, tab, signs, None, codes_tm, scales_tm, 4,
                           128, 512, 2048, 0.6745, True)
            sparse, _ = torch.ops.transfigure.rmsnorm_rotated_sparse_lut_linear(*sparse_args)
            sparse_ref, _ = rmsnorm_rotated_sparse_lut_linear_reference(*sparse_args)
            diff = (sparse.double() - sparse_ref.double()).abs() / sparse_ref.double().abs().max()
            row["sparse_vs_reference_max_rel"] = diff.max().item()
            row["sparse_outputs_within_1e-2"] = (diff < 1e-2).double().mean().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    # the SwiGLU product into the down projection's rotation (8192 -> 2048)
    swiglu = torch.compile(lambda g, u, *a: torch.ops.transfigure.lut_linear(torch.nn.functional.silu(g) * u, *a),
                           fullgraph=True)
    torch.manual_seed(1)
    packed = lut_format.pack(torch.randn(2048, 8192) / 90, table, bits=4, group_size=128, hadamard_size=512,
                             signs_seed=0)
    dense = lut_format.dequantize(packed, "original").double()[:, :8192].cuda()
    codes, scales, tab, signs = (t.cuda() for t in (packed.codes, packed.scales, packed.table, packed.signs))
    lut_args = (codes, scales, tab, signs, None, 4, 1, 128, 512, 8192)
    for trial in range(4):
        gate = (torch.randn(1, 1, 8192, device="cuda") * 3).bfloat16()
        up = torch.randn(1, 1, 8192, device="cuda").bfloat16()
        y64 = (torch.nn.functional.silu(gate.double()) * up.double()) @ dense.T
        fused = torch.ops.transfigure.silu_mul_lut_linear(gate, up, *lut_args)
        plain = swiglu(gate, up, *lut_args)
        scale = y64.abs().max().item()
        row = {"swiglu_rows": 2048, "trial": trial,
               "fused_max_err_rel": (fused.double() - y64).abs().max().item() / scale,
               "unfused_max_err_rel": (plain.double() - y64).abs().max().item() / scale,
               "fused_vs_unfused_rel": (fused.double() - plain.double()).abs().max().item() / scale}
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_norm_fusion.json"), "w") as f:
        json.dump({**environment("cuda"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
