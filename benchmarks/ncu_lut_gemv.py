"""Hardware counters of the decode LUT GEMV variants on one 8B shape (14336 x 4096, M = 1, bf16), under ncu.

Compiles and warms every kernel first, then launches each ONCE between cudaProfilerStart/Stop, so

    ncu --profile-from-start off --clock-control none --section ... python benchmarks/ncu_lut_gemv.py --out DIR

profiles exactly: cuBLAS bf16, the production pair kernel (pair-table gather, XSPLIT), its NIBBLE config, and
the register-table (prmt) and no-lookup variants of ``explore_lut_gemv._v3_kernel``. (SASS and register counts:
point TRITON_CACHE_DIR somewhere and run ``cuobjdump -sass -res-usage`` on the cubins.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/ncu"))
    ap.add_argument("--n", type=int, default=14336)
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from explore_lut_gemv import byte_tables, launch_v3

    from transfigure.kernels.autotune import Config
    from transfigure.kernels.grids import get_grid
    from transfigure.kernels.lut_format import pack
    from transfigure.kernels.lut_gemm import lut_linear_triton, pair_table

    n, k = args.n, args.k
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    pk = pack(w, get_grid("higgs", 4, 1).table, bits=4, p=1, group_size=128, hadamard_size=0)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    wb = w.to(torch.bfloat16)
    a = pk.op_args()
    codes_u8 = pk.codes.view(torch.uint8).reshape(n, -1)
    aux_bytes = byte_tables(pk.table.float())
    aux_pairs = pair_table(pk.table.float(), 4, 1, torch.bfloat16)
    prod = Config({"MODE": "pair", "BLOCK_N": 64, "SPLIT_K": 4, "BLOCK_G": 1, "XSPLIT": 1}, 4, 1)
    nibble = Config({"MODE": "pair", "BLOCK_N": 16, "SPLIT_K": 4, "BLOCK_G": 2, "XSPLIT": 1, "NIBBLE": 1}, 4, 1)
    runs = {
        "cublas": lambda: torch.nn.functional.linear(x, wb),
        "pair_prod": lambda: lut_linear_triton(x, *a, config=prod),
        "pair_nibble": lambda: lut_linear_triton(x, *a, config=nibble),
        "v3_prmt": lambda: launch_v3(x.reshape(-1), codes_u8, pk.scales, aux_bytes, n, 64, 4, 4, 1, 1, 0),
        "v3_prmt_oneshot": lambda: launch_v3(x.reshape(-1), codes_u8, pk.scales, aux_bytes, n, 32, k // 512, 4, 1, 4, 0),
        "v3_none": lambda: launch_v3(x.reshape(-1), codes_u8, pk.scales, aux_pairs, n, 64, 4, 4, 1, 1, 2),
        "v3_none_oneshot": lambda: launch_v3(x.reshape(-1), codes_u8, pk.scales, aux_pairs, n, 32, k // 512, 4, 1, 4, 2),
    }
    ref = lut_linear_triton(x, *a, config=prod).float()
    summary = {}
    for name, fn in runs.items():
        for _ in range(3):
            y = fn()
        torch.cuda.synchronize()
        if name.startswith("v3_prmt"):
            summary[name + "_rel_err_vs_prod"] = float((y.float().reshape(-1) - ref.reshape(-1)).norm() / ref.norm())
    print(json.dumps(summary, indent=1), flush=True)
    with open(os.path.join(args.out, "ncu_summary.json"), "w") as handle:
        json.dump(summary, handle, indent=1)
    torch.cuda.cudart().cudaProfilerStart()
    for fn in runs.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
