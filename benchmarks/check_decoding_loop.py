"""GPU check of transfigure.decoding_loop under CUDA graphs: the same tokens as transformers' own loop.

The CPU tests run the loop without CUDA graphs; here the compiled step runs with mode="reduce-overhead" (the
in-graph token choice mutates static buffers, and the buffers are reused across calls). Tiny fp32 models so
that both sides compute the same logits up to rounding; greedy (with an EOS that fires mid-way), sampled with
top-k, left-padded batches, two calls in a row each.

    python benchmarks/check_decoding_loop.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import transfigure
from transfigure.bench import environment
from transfigure.models import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    for arch in ("llama", "qwen3", "gpt2"):
        for backend_name in ("transfigure", "inductor"):
            torch._dynamo.reset()
            model = tiny_model(arch).cuda()
            backend = transfigure.backend() if backend_name == "transfigure" else "inductor"
            loop = transfigure.decoding_loop(backend)
            prompt = torch.randint(3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1)).cuda()
            mask = torch.ones_like(prompt)
            mask[1, :2] = 0
            mask[2, :6] = 0
            free = model.generate(prompt, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
            eos = int(free[0, 9 + 5])
            cases = {"greedy": dict(do_sample=False, eos_token_id=None),
                     "greedy+eos": dict(do_sample=False, eos_token_id=eos),
                     "sampled top-k": dict(do_sample=True, top_k=8, eos_token_id=None),
                     "left-padded greedy": dict(do_sample=False, eos_token_id=None, attention_mask=mask),
                     "left-padded sampled": dict(do_sample=True, top_k=8, eos_token_id=None, attention_mask=mask)}
            for name, kwargs in cases.items():
                inputs = prompt.masked_fill(mask == 0, 0) if "attention_mask" in kwargs else prompt
                for call in (1, 2):
                    torch.manual_seed(call)
                    theirs = model.generate(inputs, max_new_tokens=24, pad_token_id=0, **kwargs)
                    torch.manual_seed(call)
                    ours = model.generate(inputs, max_new_tokens=24, pad_token_id=0, custom_generate=loop, **kwargs)
                    same = theirs.shape == ours.shape and bool(torch.equal(theirs, ours))
                    agree = float((theirs == ours).float().mean()) if theirs.shape == ours.shape else 0.0
                    rows.append({"arch": arch, "backend": backend_name, "case": name, "call": call, "same": same,
                                 "agreement": agree, "shape": list(ours.shape), "hf_shape": list(theirs.shape)})
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**environment("cuda"), "rows": rows}
    (out / "check_decoding_loop.json").write_text(json.dumps(result, indent=1))
    bad = [r for r in rows if not r["same"]]
    lines = [f"# decoding_loop vs transformers' loop under CUDA graphs ({result['device']}, torch {result['torch']}, "
             f"{result['date']})", "", f"{len(rows) - len(bad)} of {len(rows)} calls gave transformers' exact tokens.", ""]
    if bad:
        lines += ["| arch | backend | case | call | token agreement | shapes (ours, theirs) |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['arch']} | {r['backend']} | {r['case']} | {r['call']} | {r['agreement']:.3f} | {r['shape']}, {r['hf_shape']} |"
                  for r in bad]
    (out / "check_decoding_loop.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
