"""Compile a Hugging Face model with transfigure: inference, a training step, and generate().

Uses a built-in tiny Llama config (random weights, no downloads); swap in any
``AutoModelForCausalLM.from_pretrained(path)`` the same way.
"""

import torch

import transfigure
from transfigure.models import example_inputs, tiny_model


def main() -> None:
    model = tiny_model("llama")
    inputs = example_inputs("llama")

    # Inference through Inductor; options are validated before any compilation work.
    compiled = torch.compile(model, backend="transfigure", options={"verify": True})
    with torch.no_grad():
        error = (compiled(**inputs).logits - model(**inputs).logits).abs().max().item()
    print(f"inference: max |compiled - eager| = {error:.2e}")

    # A training step: gradients flow through the rewritten graph to the parameters.
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    optimizer.step()
    print(f"training step: loss {loss.item():.4f}")

    # generate() with a compiled forward (one reusable backend object).
    model.eval()
    model.forward = torch.compile(model.forward, backend=transfigure.backend())
    tokens = model.generate(inputs["input_ids"][:1, :8], max_new_tokens=8, do_sample=False)
    print(f"generated {tokens.shape[1] - 8} tokens: {tokens[0, 8:].tolist()}")


if __name__ == "__main__":
    main()
