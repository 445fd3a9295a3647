"""transfigure.generate: the same tokens as HF generate(), one compiled graph, EOS handling, clear errors."""

import pytest
import torch
from torch._dynamo.utils import counters

import transfigure
from transfigure.models import tiny_model


def _prompt(vocab, batch=2, length=7, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _greedy_without_cache(model, ids, new):
    """The definition: recompute the whole sequence each step, take the argmax (no cache, no EOS rules)."""
    for _ in range(new):
        ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("lowering", ["eager", "inductor"])
def test_same_tokens_as_greedy_decoding_and_one_graph(arch, lowering):
    model = tiny_model(arch)
    prompt = _prompt(model.config.vocab_size)
    expected = _greedy_without_cache(model, prompt, 12)
    # HF generate() agrees when it is not told to stop or to suppress EOS
    hf = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(hf, expected)
    torch._dynamo.reset()
    counters.clear()
    backend = transfigure.backend(lowering=lowering)
    first = transfigure.generate(model, prompt, 12, backend=backend)
    again = transfigure.generate(model, prompt[:, :5], 9, backend=backend)  # other lengths: same compiled step
    assert torch.equal(first, expected)
    assert again.shape == (2, 14) and torch.equal(again[:, :5], prompt[:, :5])
    assert counters["stats"]["unique_graphs"] == 1


def test_dynamo_reset_makes_the_kept_step_compile_again():
    """What the bench's warm-compile measurement relies on: after ``torch._dynamo.reset()`` the step kept for a
    model compiles again on the next call (and still decodes the same tokens)."""
    model = tiny_model("llama")
    prompt = _prompt(model.config.vocab_size)
    backend = transfigure.backend(lowering="eager")
    torch._dynamo.reset()
    counters.clear()
    first = transfigure.generate(model, prompt, 6, backend=backend)
    transfigure.generate(model, prompt, 6, backend=backend)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
    second = transfigure.generate(model, prompt, 6, backend=backend)
    assert torch.equal(first, second)
    assert counters["stats"]["unique_graphs"] == 2


def test_rows_stop_at_eos_and_are_padded():
    model = tiny_model("llama")
    prompt = _prompt(model.config.vocab_size, seed=3)
    free = transfigure.generate(model, prompt, 10)
    eos = int(free[0, 7 + 2])  # the third new token of row 0 becomes the EOS id
    pad = (eos + 1) % model.config.vocab_size
    out = transfigure.generate(model, prompt, 10, eos_token_id=eos, pad_token_id=pad, check_every=1)
    row = out[0, 7:].tolist()
    first = row.index(eos)
    assert all(t == pad for t in row[first + 1 :])
    assert torch.equal(out[0, : 7 + first + 1], free[0, : 7 + first + 1])
    if eos not in free[1, 7:].tolist():
        assert out.shape[1] == 17  # row 1 never finished: no early stop


def test_bad_arguments_are_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="input_ids"):
        transfigure.generate(model, torch.zeros(5, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        transfigure.generate(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="pad_token_id=-1"):
        transfigure.generate(model, torch.zeros(1, 3, dtype=torch.long), 2, eos_token_id=2, pad_token_id=-1)
