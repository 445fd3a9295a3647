"""Bad options raise one clear error naming the key, before any compilation work."""

import dataclasses

import pytest
import torch

import transfigure
from transfigure.compiler import OptionError, option, parse_compile_options
from transfigure.compiler.options import describe, parse
from transfigure.models import example_inputs, tiny_model


@dataclasses.dataclass(frozen=True)
class _Example:
    target: float = option(0.5, "target sparsity", low=0.0, high=1.0, high_open=True)
    bits: int = option(4, "bits", choices=(2, 3, 4))
    modules: tuple[str, ...] = option(("*",), "patterns")
    mode: str = option("fast", "mode", choices=("fast", "exact"))


class _ExamplePass(transfigure.Pass):
    name = "example"
    Options = _Example

    def run(self, graph):
        return transfigure.PassResult(self.name)


def test_unknown_top_level_key_names_it_and_suggests():
    with pytest.raises(OptionError, match="'verfy'") as error:
        parse_compile_options({"verfy": True})
    assert "did you mean 'verify'" in str(error.value)


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(OptionError, match="'verify'.*'yes'.*true or false"):
        parse_compile_options({"verify": "yes"})


def test_bad_literal_lists_allowed_values():
    with pytest.raises(OptionError, match="'weight_check'.*'always'.*'error', 'recompile', 'ignore'"):
        parse_compile_options({"weight_check": "always"})


def test_disable_unknown_pass():
    with pytest.raises(OptionError, match="'disable'.*'nope'"):
        parse_compile_options({"disable": ["nope"]})


def test_pass_options_range_choices_and_types():
    with pytest.raises(OptionError, match="'example.target'.*1.5.*\\[0.0, 1.0\\)"):
        _ExamplePass(target=1.5)
    with pytest.raises(OptionError, match="'example.bits'.*5.*2, 3, 4"):
        _ExamplePass(bits=5)
    with pytest.raises(OptionError, match="'example.bits'.*'4'.*integer"):
        _ExamplePass(bits="4")
    with pytest.raises(OptionError, match="'example.modules'"):
        _ExamplePass(modules="q_proj")
    with pytest.raises(OptionError, match="'example.bitz'.*did you mean 'bits'"):
        _ExamplePass(bitz=4)
    assert _ExamplePass(target=0, modules=["a", "b"]).options == _Example(target=0.0, modules=("a", "b"))


def test_describe_rows_come_from_the_dataclass():
    rows = {r["name"]: r for r in describe(_Example)}
    assert rows["target"]["allowed"] == "a number in [0.0, 1.0)"
    assert rows["bits"]["default"] == "4" and rows["bits"]["type"] == "int"
    assert parse(_Example, {"mode": "exact"}).mode == "exact"


def test_backend_factory_validates_immediately():
    with pytest.raises(OptionError, match="'verify'"):
        transfigure.backend(verify=3)


def test_torch_compile_options_error_names_the_key_before_compiling():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="transfigure", options={"not_a_pass": {}})
    with pytest.raises(Exception, match="not_a_pass") as error:
        compiled(**example_inputs("llama"))
    assert "built-in passes" in str(error.value)


@pytest.mark.parametrize("backend_name", ["transfigure", "transfigure_eager"])
def test_lowering_in_options_is_a_clear_error(backend_name):
    """``options={"lowering": ...}`` used to fail inside Backend() with "got multiple values for keyword argument"."""
    compiled = torch.compile(tiny_model("llama"), backend=backend_name, options={"lowering": "eager"})
    with pytest.raises(Exception, match="'lowering'.*backend='transfigure_eager'") as error:
        compiled(**example_inputs("llama"))
    assert "multiple values" not in str(error.value)


def test_user_passes_must_be_pass_instances_and_unique():
    with pytest.raises(OptionError, match="'passes'"):
        transfigure.backend(passes=[object()])
    with pytest.raises(OptionError, match="repeated: example"):
        transfigure.backend(passes=[_ExamplePass(), _ExamplePass()])
