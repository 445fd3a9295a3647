"""The quality harness on the tiny Llama trained in-process on pydoc text (the README's quality numbers)."""

import math

from transfigure import quality


def test_quality_harness_on_trained_tiny_llama(tmp_path):
    result = quality.evaluate(
        "tiny-llama", combinations=["none", "sparsity-40", "ladder-upper-half"], seq_len=64, max_windows=12,
        batch_size=6, progress=False,
    )
    rows = {row["combination"]: row for row in result["rows"]}
    original, untouched = rows["original"], rows["none"]
    assert 1.0 < original["perplexity"] < 20.0  # trained: far below the 256 of a uniform byte model
    assert abs(untouched["perplexity"] - original["perplexity"]) < 1e-3 * original["perplexity"]
    assert untouched["kl"] < 1e-6 and untouched["top1_agreement"] == 1.0
    for name in ("sparsity-40", "ladder-upper-half"):
        assert 1e-5 < rows[name]["kl"] < 5.0 and math.isfinite(rows[name]["perplexity"]), name
        assert rows[name]["perplexity"] > original["perplexity"] * 0.95, name
    assert rows["sparsity-40"]["kl"] < rows["ladder-upper-half"]["kl"]  # ladder changes the function much more
    saved = quality.save(result, tmp_path)
    assert "| sparsity-40 |" in (saved / "quality.md").read_text()


def test_quality_harness_on_an_encoder_reports_cosine():
    result = quality.evaluate("bert", combinations=["none"], seq_len=32, max_windows=4, batch_size=2, progress=False)
    rows = {row["combination"]: row for row in result["rows"]}
    assert not result["causal"] and rows["none"]["cosine"] > 0.99999


def test_quality_harness_on_a_checkpoint_directory_without_tokenizer(tmp_path):
    """A local HF checkpoint with no tokenizer files is read as UTF-8 bytes (transformers may still build a
    tokenizer from the config alone, one that encoded the text to zero tokens: "the text has 0 tokens")."""
    from transfigure.models import tiny_model

    tiny_model("qwen3").save_pretrained(tmp_path / "ckpt")
    result = quality.evaluate(str(tmp_path / "ckpt"), text="The quick brown fox jumps over the lazy dog. " * 20,
                              combinations=["none"], seq_len=64, max_windows=4, batch_size=2, progress=False)
    rows = {row["combination"]: row for row in result["rows"]}
    assert result["causal"] and rows["none"]["kl"] == 0.0 and rows["none"]["perplexity"] > 1.0


def test_any_combination_may_add_decode_attention_and_unknown_names_are_named():
    needs, build = quality.combination("lut-4bit+lm_head+decode-attn")
    assert needs == ("lut_quant", "decode_attention")
    assert build({}) == {"lut_quant": {"bits": 4, "exclude": ("*embed*", "embed_out")}, "decode_attention": {}}
    assert quality.combination("decode-attn")[0] == ("decode_attention",)
    import pytest

    with pytest.raises(ValueError, match="unknown combination 'lut-5bit\\+decode-attn'.*may end in '\\+decode-attn'"):
        quality.combination("lut-5bit+decode-attn")
