"""Compile a Hugging Face model with transfigure: inference, a training step, and generate() -- plain, and with
transfigure's decode loop plugged into generate() (``custom_generate=transfigure.decoding_loop(...)``).

Uses a built-in tiny Llama config (random weights, no downloads); swap in any
``AutoModelForCausalLM.from_pretrained(path)`` the same way.
"""

import torch

import transfigure
from transfigure.models import example_inputs, tiny_model


def main() -> dict:
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

    # generate() through transfigure's decode loop: transformers prepares the call, a compiled one-token step
    # decodes (CUDA graphs on a GPU, the greedy choice inside the graph, no host sync per token).
    model.eval()
    prompt = inputs["input_ids"][:2, :8]
    backend = transfigure.backend()  # one reusable backend object (a new one per call would recompile)
    looped = model.generate(prompt, max_new_tokens=8, do_sample=False,
                            custom_generate=transfigure.decoding_loop(backend))
    print(f"decoding_loop generated: {looped[:, 8:].tolist()}")

    # generate() with a compiled forward and transformers' own loop.
    model.forward = torch.compile(model.forward, backend=backend)
    tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    print(f"generated {tokens.shape[1] - 8} tokens: {tokens[:, 8:].tolist()}")
    return {"inference_error": error, "loss": loss.item(), "decoding_loop": looped, "generate": tokens}


if __name__ == "__main__":
    main()
