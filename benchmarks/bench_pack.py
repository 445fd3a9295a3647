"""Compile-time cost of LUT quantization per weight: packing (with and without the Triton scale search) and
the disk cache's key (GPU fingerprint vs host SHA-256), on the Llama-3-8B linear shapes.

    python benchmarks/bench_pack.py --out benchmarks/results          # on a GPU host

Also checks, on the GPU, that the Triton search picks scales whose error equals the reference's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from transfigure.bench import pyplot
from transfigure.kernels import lut_format, scale_search
from transfigure.kernels.grids import get_grid

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}
PER_LAYER = {"q/o 4096x4096": 2, "k/v 1024x4096": 2, "gate/up 14336x4096": 2, "down 4096x14336": 1}


def _timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _host_sha256(weight: torch.Tensor) -> str:
    """The key as it was computed before the GPU fingerprint (host copy + bytes + SHA-256)."""
    h = hashlib.sha256()
    t = weight.detach().to("cpu", copy=True).contiguous()
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plot(result: dict, path: Path) -> None:
    """Per 8B linear shape: packing with the Triton vs the torch-ops scale search, and the two cache keys."""
    plt = pyplot()
    if plt is None:
        return
    rows = result["rows"]
    series = {"pack, Triton search": "pack_triton_search_s", "pack, torch-ops search": "pack_torch_search_s",
              "key: GPU fingerprint": "key_gpu_fingerprint_s", "key: host SHA-256": "key_host_sha256_s"}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(series)
    for i, (label, field) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(rows))], [1e3 * r[field] for r in rows], width, label=label)
    ax.set_xticks([j + 1.5 * width for j in range(len(rows))], [r["shape"] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per weight (log)")
    ax.set_title(f"LUT packing cost at compile time, {result['device']}, torch {result['torch']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--replot", action="store_true", help="only redraw OUT/pack.png from OUT/pack.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((Path(args.out) / "pack.json").read_text()), Path(args.out) / "pack.png")
        return
    table = get_grid("higgs", args.bits, 1).table
    rows = []
    for name, (n, k) in SHAPES.items():
        weight = torch.randn(n, k, device="cuda").to(torch.bfloat16)
        pack = lambda: lut_format.pack(weight, table, bits=args.bits, group_size=128, hadamard_size=512,  # noqa: E731
                                       scale_search=17)
        triton_s = _timed(pack)
        original = lut_format.search_scales
        lut_format.search_scales = scale_search.search_scales_reference  # the torch-ops search, as before
        try:
            torch_s = _timed(pack)
        finally:
            lut_format.search_scales = original
        no_search_s = _timed(lambda: lut_format.pack(weight, table, bits=args.bits, group_size=128,
                                                     hadamard_size=512, scale_search=0))
        fingerprint_s = _timed(lambda: lut_format.content_key(weight, quant="x"))
        sha_s = _timed(lambda: _host_sha256(weight), repeats=1)
        # correctness on the GPU: equal errors at the picked scales
        groups = torch.randn(512, k // 128, 128, device="cuda")
        base = groups.pow(2).mean(-1).sqrt()
        picked = scale_search.search_scales_triton(groups, base, table.cuda(), 1, 17)
        expected = scale_search.search_scales_reference(groups, base, table.cuda(), 1, 17)
        sorted_t = torch.sort(table.cuda()[:, 0]).values
        mids = (sorted_t[1:] + sorted_t[:-1]) / 2

        def err(s):
            q = sorted_t[torch.bucketize((groups / s[..., None]).contiguous(), mids)]
            return (q * s[..., None] - groups).pow(2).sum(-1)

        rel = float(((err(picked) - err(expected)).abs() / err(expected).clamp(min=1e-12)).max())
        same = float((picked == expected).float().mean())
        rows.append({"shape": name, "pack_triton_search_s": triton_s, "pack_torch_search_s": torch_s,
                     "pack_no_search_s": no_search_s, "key_gpu_fingerprint_s": fingerprint_s,
                     "key_host_sha256_s": sha_s, "search_max_rel_err_diff": rel, "search_same_pick": same})
        print(rows[-1], flush=True)
        del weight
    per_layer = {f: sum(r[f] * PER_LAYER[r["shape"]] for r in rows) for f in rows[0] if f.endswith("_s")}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bits": args.bits,
              "rows": rows, "per_8b_layer": per_layer}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pack.json").write_text(json.dumps(result, indent=1))
    lines = [f"# LUT packing cost per weight ({result['device']}, torch {result['torch']}, HIGGS {args.bits}-bit g128, "
             "Hadamard 512, bf16 weights on the GPU)", "",
             "Seconds per weight (best of 3). Scale search: 17 multiples of the group RMS. Key: the disk cache's "
             "content key.", "",
             "| shape | pack, Triton search | pack, torch-ops search | pack, no search | key: GPU fingerprint | "
             "key: host SHA-256 | search: same pick | max rel. error diff |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['pack_triton_search_s']:.3f} | {r['pack_torch_search_s']:.3f} | "
                     f"{r['pack_no_search_s']:.3f} | {r['key_gpu_fingerprint_s']:.4f} | {r['key_host_sha256_s']:.3f} | "
                     f"{r['search_same_pick']:.4f} | {r['search_max_rel_err_diff']:.1e} |")
    p = per_layer
    lines += ["", f"One 8B layer (7 linears; x32 layers for the model): pack {p['pack_triton_search_s']:.3f} s with the "
              f"Triton search vs {p['pack_torch_search_s']:.3f} s with torch ops ({p['pack_no_search_s']:.3f} s without "
              f"search); key {p['key_gpu_fingerprint_s']:.4f} s on the GPU vs {p['key_host_sha256_s']:.3f} s on the host."]
    (out / "pack.md").write_text("\n".join(lines) + "\n")
    plot(result, out / "pack.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
