"""Three rewrites composed in one compile: 4-bit LUT weights, TEAL activation sparsity, LoRA adapters on top.

A QLoRA-style recipe on a tiny byte-level Llama trained in-process on Python's own docs (no downloads):

1. calibrate activation thresholds on real text (``transfigure.calibrate``, a progress bar on long runs);
2. compile with ``lut_quant`` (4-bit HIGGS, Hadamard-rotated), ``sparsity`` (50% of each projection input) and
   ``lora`` (r=8 on q/v) — they run in order 40, 45, 50, then ``lut_fuse`` (90) merges q/k/v and gate/up into
   one LUT GEMV each;
3. read what each pass did (the report) and the rewritten code of one layer;
4. train only the adapters for a few steps to win back some of the loss the cheaper model gave up.

    python examples/compose_quant_sparsity_lora.py
"""

from __future__ import annotations

import torch

import transfigure
from transfigure.models import byte_batches, eval_loss, trained_tiny_llama


def main(train_steps: int = 30, quiet: bool = False) -> dict[str, float]:
    say = (lambda *a: None) if quiet else print  # noqa: E731
    model = trained_tiny_llama()
    model.requires_grad_(False)  # LoRA trains adapters only; the base (and its LUT codes) stays frozen
    dense_loss = eval_loss(model)

    calibration = transfigure.calibrate(model, list(byte_batches(8, 128, count=8, seed=3)), progress=not quiet)
    backend = transfigure.backend(
        lowering="eager",  # CPU-friendly; on a GPU drop this line to lower through Inductor
        lut_quant={"bits": 4},
        sparsity={"target": 0.5, "calibration": calibration},
        lora={"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
    )
    compiled = torch.compile(model, backend=backend)
    batches = byte_batches(8, 128, seed=4)
    first = next(batches)
    loss = compiled(input_ids=first, labels=first).loss  # compiles: the passes run here

    report = backend.report
    say(report.table())
    code = report.graphs[0].final_code
    start = code.index("lut_linear.default(")
    say("\n... the first layer's attention projections after all four passes:\n" +
        "\n".join(line for line in code[start - 400 : start + 1200].splitlines()[1:-1] if "narrow" in line or "lut_linear" in line or "lora" in line))

    with torch.no_grad():
        compressed_loss = sum(compiled(input_ids=t, labels=t).loss.item() for t in byte_batches(8, 128, "eval", seed=1, count=8)) / 8

    optimizer = torch.optim.AdamW(transfigure.trainable_parameters(model), lr=3e-3)
    for step in range(train_steps):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = next(batches)
        loss = compiled(input_ids=tokens, labels=tokens).loss
    with torch.no_grad():
        tuned_loss = sum(compiled(input_ids=t, labels=t).loss.item() for t in byte_batches(8, 128, "eval", seed=1, count=8)) / 8
    say(f"\nheld-out loss: dense {dense_loss:.3f} | 4-bit + 50% sparse {compressed_loss:.3f} | "
        f"+ LoRA after {train_steps} steps {tuned_loss:.3f}")
    return {"dense": dense_loss, "compressed": compressed_loss, "tuned": tuned_loss}


if __name__ == "__main__":
    main()
