"""Command line: ``python -m transfigure {demo,inspect,passes}``."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _passes_table() -> str:
    from transfigure.compiler import builtin_passes
    from transfigure.compiler.options import describe
    from transfigure.compiler.pipeline import CompilerOptions

    import transfigure.passes  # noqa: F401

    lines = ["compiler options (top-level keys of options={...}):"]
    for row in describe(CompilerOptions):
        allowed = f"  allowed: {row['allowed']}" if row["allowed"] else ""
        lines.append(f"  {row['name']:<16} {row['type']:<28} default {row['default']:<10} {row['help']}{allowed}")
    passes = builtin_passes()
    if not passes:
        lines.append("\nbuilt-in passes: none installed")
    for name, cls in passes.items():
        lines.append(f"\n{name} (order {cls.order}): {cls.description}")
        rows = describe(cls.Options)
        if not rows:
            lines.append("  (no options)")
        for row in rows:
            allowed = f"  allowed: {row['allowed']}" if row["allowed"] else ""
            lines.append(f"  {row['name']:<16} {row['type']:<28} default {row['default']:<10} {row['help']}{allowed}")
    return "\n".join(lines)


def options_markdown() -> str:
    """The README's options table, generated from the option dataclasses (a test keeps README in sync)."""
    from transfigure.compiler import builtin_passes
    from transfigure.compiler.options import describe
    from transfigure.compiler.pipeline import CompilerOptions

    import transfigure.passes  # noqa: F401

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| key | type | default | allowed | what it does |", "| --- | --- | --- | --- | --- |"]
    for row in describe(CompilerOptions):
        lines.append(f"| `{row['name']}` | {cell(row['type'])} | `{cell(row['default'])}` | {cell(row['allowed'])} | {cell(row['help'])} |")
    for name, cls in builtin_passes().items():
        lines.append(f"| **`{name}`** | pass | off | `true` or a dict | {cell(cls.description)} (order {cls.order}) |")
        for row in describe(cls.Options):
            lines.append(
                f"| `{name}.{row['name']}` | {cell(row['type'])} | `{cell(row['default'])}` | {cell(row['allowed'])} | {cell(row['help'])} |"
            )
    return "\n".join(lines)


def _apply_assignments(options: dict, assignments: list[str]) -> dict:
    """``verify=true sparsity.target=0.4`` (values parsed as JSON when they can be) into an options dict."""
    import json

    for assignment in assignments:
        if "=" not in assignment:
            raise SystemExit(f"--set expects KEY=VALUE (e.g. verify=true or sparsity.target=0.5), got {assignment!r}")
        key, raw = assignment.split("=", 1)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        if "." in key:
            pass_name, option_name = key.split(".", 1)
            section = options.setdefault(pass_name, {})
            if not isinstance(section, dict):
                section = options[pass_name] = {}
            section[option_name] = value
        else:
            options[key] = value
    return options


def _time(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3


# what the demo shows by default: the 4-bit Hadamard-rotated LUT quantization (the headline decode rewrite)
DEMO_PASSES = ("lut_quant",)


def _calibrate_if_needed(model, options: dict, seq_len: int, device) -> None:
    """``sparsity`` without a calibration: calibrate on pydoc text (what a first try on the command line wants)."""
    import transfigure

    if isinstance(options.get("sparsity"), dict) and "calibration" not in options["sparsity"]:
        from transfigure.models import byte_batches

        print("sparsity: calibrating thresholds on 8 batches of pydoc text (pass sparsity.calibration=PATH to reuse one)")
        batches = [b.to(device) for b in byte_batches(2, seq_len, count=8)]
        options["sparsity"]["calibration"] = transfigure.calibrate(model, batches, greedy=False)
        options["sparsity"].setdefault("allocation", "uniform")


def demo(args: argparse.Namespace) -> int:
    import transfigure
    from transfigure.compiler import builtin_passes
    from transfigure.models import example_inputs, tiny_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch = args.model
    model = tiny_model(arch, hidden_size=args.hidden, intermediate_size=args.hidden * 2) if arch != "gpt2" else tiny_model(arch)
    model = model.to(device)
    inputs = {k: v.to(device) for k, v in example_inputs(arch, batch=args.batch, seq_len=args.seq_len).items()}
    options = _apply_assignments({name: {} for name in (args.passes or [])}, args.set or [])
    _calibrate_if_needed(model, options, args.seq_len, device)
    available = list(builtin_passes())
    print(f"transfigure demo: {arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, random weights) on {device}")
    print(f"built-in passes available: {', '.join(available) or '(none yet)'}; running: {', '.join(args.passes or []) or '(none)'}")
    report = transfigure.inspect(model, kwargs=inputs, **options)
    print(report)
    backend = transfigure.backend(**options)
    compiled = torch.compile(model, backend=backend)
    key = "logits" if arch != "bert" else "last_hidden_state"
    with torch.no_grad():
        start = time.perf_counter()
        out = compiled(**inputs)[key]
        compile_seconds = time.perf_counter() - start
        ref = model(**inputs)[key]
        error = ((out - ref).abs().max() / ref.abs().max()).item()
        eager_ms = _time(lambda: model(**inputs), args.repeats)
        compiled_ms = _time(lambda: compiled(**inputs), args.repeats)
    print(f"\nmax relative error vs the original model: {error:.2e}")
    lossy = [name for name in (args.passes or []) if name in ("lut_quant", "sparsity", "linearize", "ladder")]
    if lossy:
        print(f"  ({', '.join(lossy)} {'changes' if len(lossy) == 1 else 'change'} the function by design, and random weights amplify it; "
              "`python -m transfigure quality` measures the cost on a trained model)")
    print(f"compile time (first call): {compile_seconds:.1f} s")
    print(f"eager: {eager_ms:.2f} ms/call   transfigure: {compiled_ms:.2f} ms/call   speedup {eager_ms / compiled_ms:.2f}x")
    if device == "cpu" and any(name in ("lut_quant", "sparsity") for name in (args.passes or [])):
        print("  (on CPU the quantized / sparse linears run their plain-PyTorch references, which dequantize; their "
              "Triton kernels run on a GPU, where the README's speed numbers come from)")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    import transfigure
    from transfigure.models import example_inputs, tiny_model

    model = tiny_model(args.model)
    options = _apply_assignments({name: {} for name in (args.passes or [])}, args.set or [])
    _calibrate_if_needed(model, options, args.seq_len, "cpu")
    report = transfigure.inspect(model, kwargs=example_inputs(args.model, seq_len=args.seq_len), **options)
    print(report)
    if args.out:
        print(f"\nreport written to {report.save(args.out)}")
    return 0


def quality_command(args: argparse.Namespace) -> int:
    from transfigure import quality

    text = open(args.text, encoding="utf-8").read() if args.text else None
    result = quality.evaluate(args.model, text, args.combinations, seq_len=args.seq_len, max_windows=args.max_windows,
                              device=args.device, lowering=args.lowering, distill_steps=args.distill_steps)
    print(quality.markdown_table(result))
    if args.out:
        print(f"\nwritten to {quality.save(result, args.out)}")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from transfigure import bench

    if args.no_static_launcher:
        import torch._inductor.config as inductor_config

        inductor_config.use_static_cuda_launcher = False
    if args.training:
        result = bench.run_training(args.models, args.train_variants, args.train_batch, args.seq_len, args.steps,
                                    args.device, args.out, lowering=args.lowering, lora_rank=args.lora_rank,
                                    galore_rank=args.galore_rank, mode=args.mode)
        print(bench.training_markdown(result))
        return 0
    result = bench.run(args.models, args.batch, args.new_tokens, args.variants, args.prompt_len, args.device, args.out,
                       warm_compile=not args.no_warm, lowering=args.lowering, loop=args.loop, decoding=args.decoding)
    print(bench.markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    from transfigure.models import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m transfigure", description="transfigure: rewrite transformer graphs under torch.compile")
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="compile a small built-in Llama with the available passes; print report, error, timings")
    p_demo.add_argument("--model", choices=ARCHITECTURES, default="llama")
    p_demo.add_argument("--passes", nargs="*", default=list(DEMO_PASSES),
                        help=f"built-in passes to enable (default: {' '.join(DEMO_PASSES)}; '--passes' alone: none)")
    p_demo.add_argument("--set", nargs="*", help="options as KEY=VALUE, e.g. verify=true sparsity.target=0.4")
    p_demo.add_argument("--hidden", type=int, default=256)
    p_demo.add_argument("--batch", type=int, default=1)
    p_demo.add_argument("--seq-len", type=int, default=64)
    p_demo.add_argument("--repeats", type=int, default=10)
    p_demo.set_defaults(func=demo)

    p_inspect = sub.add_parser("inspect", help="show what the passes do to a built-in tiny model's graph")
    p_inspect.add_argument("--model", choices=ARCHITECTURES, default="llama")
    p_inspect.add_argument("--passes", nargs="*", default=None)
    p_inspect.add_argument("--set", nargs="*", help="options as KEY=VALUE")
    p_inspect.add_argument("--seq-len", type=int, default=16)
    p_inspect.add_argument("--out", help="directory for code, diffs, pictures and summary.json")
    p_inspect.set_defaults(func=inspect_command)

    p_quality = sub.add_parser("quality", help="perplexity / KL (or cosine for encoders) of each pass combination vs the original")
    p_quality.add_argument("--model", default="tiny-llama", help="local HF checkpoint dir, 'tiny-llama' (trained in-process) or a tiny arch")
    p_quality.add_argument("--text", help="UTF-8 text file (default: Python's pydoc topics)")
    p_quality.add_argument("--combinations", nargs="*", help="default: every combination whose passes are installed")
    p_quality.add_argument("--seq-len", type=int, default=128)
    p_quality.add_argument("--max-windows", type=int, default=32)
    p_quality.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_quality.add_argument("--lowering", choices=("eager", "inductor"), default="eager")
    p_quality.add_argument("--distill-steps", type=int, default=200)
    p_quality.add_argument("--out", help="directory for quality.json and quality.md")
    p_quality.set_defaults(func=quality_command)

    from transfigure.bench import DEFAULT_VARIANTS, TRAINING_VARIANTS

    p_bench = sub.add_parser("bench", help="end-to-end benchmarks (GPU): generate() decode (eager, inductor, transfigure + passes), or --training")
    p_bench.add_argument("--models", nargs="*", default=["llama-1b"], help="llama-1b, llama-8b, or a tiny architecture")
    p_bench.add_argument("--batch", nargs="*", type=int, default=[1])
    p_bench.add_argument("--new-tokens", nargs="*", type=int, default=[256])
    p_bench.add_argument("--prompt-len", type=int, default=128)
    p_bench.add_argument("--variants", nargs="*", default=list(DEFAULT_VARIANTS))
    p_bench.add_argument("--device", default=None)
    p_bench.add_argument("--out", default="benchmarks/results")
    p_bench.add_argument("--no-warm", action="store_true", help="skip the warm (cached) recompile measurement")
    p_bench.add_argument("--no-static-launcher", action="store_true", help="Inductor's use_static_cuda_launcher = False")
    p_bench.add_argument("--lowering", choices=("inductor", "eager"), default="inductor",
                         help="what runs the rewritten graphs (eager: quick CPU smoke runs)")
    p_bench.add_argument("--loop", choices=("generate", "custom", "step"), default="generate",
                         help="generate: transformers' generate() (the issue's harness); custom: generate() with "
                              "custom_generate=transfigure.decoding_loop (a compiled one-token step without a host sync "
                              "per token); step: transfigure.generate, the same loop as a function. custom and step "
                              "apply to Inductor and transfigure alike")
    p_bench.add_argument("--decoding", choices=("greedy", "sample", "padded"), default="greedy",
                         help="greedy; sample: top-k 50, top-p 0.95, temperature 0.8; padded: greedy over a left-padded "
                              "batch (row i 8*i tokens shorter; needs --batch >= 2)")
    p_bench.add_argument("--training", action="store_true",
                         help="training-step benchmark instead of decode: full fine-tuning, LoRA, GaLore")
    p_bench.add_argument("--train-variants", nargs="*", default=list(TRAINING_VARIANTS))
    p_bench.add_argument("--train-batch", type=int, default=8)
    p_bench.add_argument("--seq-len", type=int, default=512)
    p_bench.add_argument("--steps", type=int, default=5, help="timed training steps after the compiling one and two warm-up steps")
    p_bench.add_argument("--lora-rank", type=int, default=16)
    p_bench.add_argument("--galore-rank", type=int, default=128)
    p_bench.add_argument("--mode", default=None, choices=("default", "reduce-overhead", "max-autotune"),
                         help="torch.compile mode of every training variant (reduce-overhead: CUDA graphs)")
    p_bench.set_defaults(func=bench_command)

    p_passes = sub.add_parser("passes", help="list built-in passes and their options")
    p_passes.add_argument("--markdown", action="store_true", help="print the README options table")
    p_passes.set_defaults(func=lambda args: print(options_markdown() if args.markdown else _passes_table()) or 0)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # show option errors plainly, not as a traceback
        from transfigure.compiler import OptionError

        cause = error
        while cause is not None and not isinstance(cause, OptionError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
