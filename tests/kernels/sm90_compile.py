"""Compile the Triton kernels for sm_90 on a machine without a GPU (run by test_sm90_compile.py).

The interpreter (how CI runs kernels) executes Python: it never type-checks the code Triton's compiler would
build, so a kernel can pass every CPU test and fail to compile on the GPU (a statement after a returning
``constexpr`` branch is still compiled, for one). This script calls the real launchers with CPU tensors and an
explicit config, catches the launch (``JITFunction.run``) before it reaches a driver, and compiles that exact
specialization with Triton's bundled ptxas for an H100 target. Must run with TRITON_INTERPRET unset (a fresh
process): under the interpreter ``triton.jit`` builds no compilable kernels.

Prints one JSON line per case: ``{"case", "kernel", "ok", "error"}``.
"""

from __future__ import annotations

import json
import math
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


def _capture(launch):
    """Run ``launch()`` with Triton launches recorded instead of run; return [(kernel, arguments, options)].

    The launcher goes on after each (its outputs stay unwritten), so multi-kernel launchers give every kernel;
    an error after at least one recorded launch (a launcher reading an unwritten result) ends the capture."""
    seen = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        seen.append((self, args, kwargs))

    JITFunction.run = run
    try:
        launch()
    except Exception:
        if not seen:
            raise
    finally:
        JITFunction.run = original
    if not seen:
        raise RuntimeError("the launcher ran no Triton kernel")
    launches = []
    for kernel, args, kwargs in seen:
        names = [p.name for p in kernel.params]
        options = {k: v for k, v in kwargs.items() if k not in names}
        bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
        bound.apply_defaults()
        launches.append((kernel, bound.arguments, options))
    return launches


def _tuner_cases(label, tuner, args):
    """One case per config the autotuner would try for ``args``."""
    configs = tuner.prune(tuner.configs, args) if tuner.prune else tuner.configs
    for config in configs:
        yield f"{label} {config.describe()}", lambda config=config: tuner.launch(config, *args)


def _compile(kernel, arguments, options):
    signature, constants = {}, {}
    for i, param in enumerate(kernel.params):
        value = arguments[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constants[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif value is None:
            signature[param.name] = "constexpr"
            constants[(i,)] = None
        else:
            raise TypeError(f"{param.name}: cannot type {type(value).__name__}")
    triton.compile(ASTSource(kernel, signature, constants), target=TARGET,
                   options={k: v for k, v in options.items() if k in ("num_warps", "num_stages", "maxnreg")})


def _cases():
    from transfigure.kernels import decode_attention, fwht, lut_gemm, rotation_prologue, rotated_sparse_lut
    from transfigure.kernels.grids import higgs_grid
    from transfigure.kernels.lut_format import pack

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows in (1, 64):  # a decode token, a prefill
            x = torch.randn(rows, 8192, dtype=dtype)
            signs = torch.ones(8192)
            for h in (64, 512, 4096):
                # the configs the FWHT autotuner would try for this input
                for config in fwht._prune_dot(fwht._fwht_dot_tuner.configs, (x, signs, h, 1.0)):
                    if config.meta.get("COMBINE"):
                        continue
                    yield (f"fwht rows={rows} h={h} {dtype} {config.describe()}",
                           lambda x=x, h=h, config=config: fwht._launch_dot(config, x, signs, h, 1 / math.sqrt(h)))

    table = higgs_grid(4).table
    weight = torch.randn(1024, 2048) / 2048**0.5
    packed = pack(weight, table, bits=4, group_size=128, hadamard_size=512, signs_seed=0)
    for dtype in (torch.bfloat16, torch.float16):
        x2 = torch.randn(1, 2048, dtype=dtype)
        for config in lut_gemm.configs_for(1, 2048, 1, 128, 4, dtype):
            yield (f"lut_linear M=1 {dtype} {config.describe()}",
                   lambda x2=x2, config=config: lut_gemm._launch(config, x2, packed.codes, packed.scales,
                                                                 packed.table.float(), None, 4, 1, 128))
        x = torch.randn(1, 2048, dtype=dtype)
        yield (f"rotate+compact {dtype}",
               lambda x=x: rotated_sparse_lut.rotate_compact_triton(x, packed.signs, 0.6745, 512, 128, 2048, 2048))
        residual, delta, norm = torch.randn(1, 2048, dtype=dtype), torch.randn(1, 2048, dtype=dtype), torch.ones(
            2048, dtype=dtype)
        for tau in (None, 0.6745):
            yield (f"add+rmsnorm+rotate tau={tau} {dtype}",
                   lambda residual=residual, delta=delta, norm=norm, tau=tau: rotation_prologue.add_rmsnorm_rotate(
                       residual, delta, norm, 1e-5, packed.signs, 512, 2048, tau=tau, group_size=128))
            yield (f"silu*mul+rotate tau={tau} {dtype}",
                   lambda gate=residual, up=delta, tau=tau: rotation_prologue.silu_mul_rotate(
                       gate, up, packed.signs, 512, 2048, tau=tau, group_size=128))
        codes_tm, scales_tm = rotated_sparse_lut.decode_layout(packed.codes, packed.scales)
        vals, idx = torch.randn(2048), torch.arange(2048, dtype=torch.int32)
        counts = torch.full((16,), 64, dtype=torch.int32)
        for config in rotated_sparse_lut._configs():
            yield (f"rotated sparse GEMV {dtype} {config.describe()}",
                   lambda dtype=dtype, config=config: rotated_sparse_lut._launch(
                       config, vals, idx, counts, codes_tm, scales_tm, packed.table.float(), None, 128, dtype, 1024))
        q = torch.randn(1, 32, 1, 64, dtype=dtype)
        k = torch.randn(1, 8, 512, 64, dtype=dtype)
        mask = torch.ones(1, 1, 1, 512, dtype=torch.bool)
        for config in decode_attention._configs():
            yield (f"decode_attention {dtype} {config.describe()}",
                   lambda q=q, k=k, config=config: decode_attention._launch(
                       config, q, k, k, mask, 1, (0, 0, 0, 1), 0.125, False))
        k_new, table = torch.randn(1, 8, 1, 64, dtype=dtype), torch.randn(1, 1, 1, 64, dtype=dtype)
        fill, positions = torch.tensor(7), torch.tensor([7])
        for config in decode_attention._configs()[:2]:
            for rope in (True, False):
                for counter in (True, False):
                    update = (k_new, k_new, table if rope else None, table if rope else None,
                              None if counter else positions, fill if counter else None)
                    yield (f"decode_attention_update rope={rope} counter={counter} {dtype} {config.describe()}",
                           lambda q=q, k=k, config=config, update=update: decode_attention._launch(
                               config, q, k, k, mask, 1, (0, 0, 0, 1), 0.125, False, update=update))
    from transfigure.kernels import lora, linear_attention, scale_search, sparse_gemv, sparse_lut_gemv, threshold
    from transfigure.kernels import window_attention
    from transfigure.kernels.sparse_lut_gemv import repack_column_major

    for dtype in (torch.bfloat16, torch.float16):
        weight_t = torch.randn(2048, 1024, dtype=dtype)
        bias = torch.randn(1024, dtype=dtype)
        for m in (1, 4):
            x2 = torch.randn(m, 2048, dtype=dtype)
            yield from _tuner_cases(f"sparse GEMV M={m} {dtype}", sparse_gemv._tuner, (x2, weight_t, bias, 0.5))
            yield from _tuner_cases(f"sparse GEMV (compaction) M={m} {dtype}", sparse_gemv._compact_tuner,
                                    (x2, weight_t, bias, 0.5))
            codes_t, scales_t = repack_column_major(packed.codes, packed.scales, 4)
            yield from _tuner_cases(f"sparse LUT GEMV M={m} {dtype}", sparse_lut_gemv._tuner,
                                    (x2, codes_t, scales_t, packed.table.reshape(-1).float(), None, 4, 128, 0.5))
        yield from _tuner_cases(f"threshold {dtype}", threshold._sparsify_tuner, (torch.randn(4096, dtype=dtype), 0.5))
        x = torch.randn(64, 512, dtype=dtype)
        w = torch.randn(1024, 512, dtype=dtype)
        a, b = torch.randn(512, 16, dtype=dtype), torch.randn(16, 1024, dtype=dtype)
        yield from _tuner_cases(f"LoRA low-rank addmm {dtype}", lora._tuner, (x, w, a, b, 2.0, None))
        q = torch.randn(1, 4, 256, 128, dtype=dtype)
        for gated in (False, True):
            g = -torch.rand(1, 4, 256, 128) if gated else None
            yield from _tuner_cases(f"linear attention fwd gated={gated} {dtype}", linear_attention._fwd_tuner,
                                    (q, q, q, g, 0.1, 64))
            yield from _tuner_cases(f"linear attention bwd gated={gated} {dtype}", linear_attention._bwd_tuner,
                                    (q, q, q, g, q, 0.1, 64))
            state = torch.zeros(1, 4, 128, 128)
            step = q[:, :, 0].contiguous()  # one token: [B, H, D]
            yield from _tuner_cases(f"linear attention decode gated={gated} {dtype}", linear_attention._decode_tuner,
                                    (step, step, step, g[:, :, 0].contiguous() if gated else None, state, 0.1))
        valid = torch.ones(1, 256, dtype=torch.bool)
        factor = torch.full((4,), 0.5)
        for mode in window_attention.MODES:
            yield (f"window attention {mode} {dtype}",
                   lambda q=q, valid=valid, mode=mode: window_attention.window_attention_triton(
                       q, q, q, valid, factor, 64, 0.1, mode))
    groups = torch.randn(64, 16, 128)
    yield ("scale search", lambda: scale_search.search_scales_triton(
        groups, groups.abs().amax(2) / table.abs().max(), table, 1, 17))


def main() -> int:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    failures = 0
    done = set()
    for name, launch in _cases():
        if only not in name:
            continue
        try:
            launches = _capture(launch)
        except Exception as error:  # noqa: BLE001  (reported, the test fails on it)
            failures += 1
            print(json.dumps({"case": name, "ok": False, "error": f"{type(error).__name__}: {error}"[-1500:]}),
                  flush=True)
            continue
        for kernel, arguments, options in launches:
            # one compile per code path: the switches (bool / str constexprs) and the tensors' dtypes, not the
            # sizes (every size compiled takes ~0.5 s of CI)
            key = (kernel.fn.__name__,
                   repr(sorted((k, repr(v)) for k, v in arguments.items() if isinstance(v, (bool, str, type(None))))),
                   repr(sorted((k, str(v.dtype)) for k, v in arguments.items() if isinstance(v, torch.Tensor))))
            if key in done:
                continue
            done.add(key)
            try:
                _compile(kernel, arguments, options)
                print(json.dumps({"case": name, "kernel": kernel.fn.__name__, "ok": True}), flush=True)
            except Exception as error:  # noqa: BLE001
                failures += 1
                text = f"{type(error).__name__}: {error}".replace("\n", " | ")
                print(json.dumps({"case": name, "kernel": kernel.fn.__name__, "ok": False, "error": text[-1500:]}),
                      flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
