"""Write a pass: rewrite every SiLU in a Llama MLP as x * sigmoid(x), and inspect what changed."""

import dataclasses

import torch

import transfigure
from transfigure.models import example_inputs, tiny_model


@dataclasses.dataclass(frozen=True)
class SiluOptions:
    layers: tuple[int, ...] = transfigure.option((), "layer indices to rewrite (empty: all)")


class ExpandSilu(transfigure.Pass):
    """silu(x) = x * sigmoid(x): the same function, spelled with two ops."""

    name = "expand_silu"
    Options = SiluOptions

    def run(self, graph: transfigure.GraphView) -> transfigure.PassResult:
        result = transfigure.PassResult(self.name)
        for node in list(graph.calls([torch.nn.functional.silu])):
            layer = transfigure.compiler.layer_index(graph.module_fqn(node))
            if self.options.layers and layer not in self.options.layers:
                result.skip(node, f"layer {layer} not selected")
                continue
            x = node.args[0]
            with graph.graph.inserting_before(node):
                gate = graph.graph.call_function(torch.sigmoid, (x,))
                product = graph.graph.call_function(torch.mul, (x, gate))
            result.rewrote(node, f"layer {layer}")
            node.replace_all_uses_with(product)
            graph.graph.erase_node(node)
        return result


def main() -> None:
    model = tiny_model("llama")
    inputs = example_inputs("llama")
    report = transfigure.inspect(model, passes=[ExpandSilu(layers=(0,))], kwargs=inputs)
    print(report)
    print(report.pass_report("expand_silu").diff)

    backend = transfigure.backend(passes=[ExpandSilu()])  # one backend object, reused
    compiled = torch.compile(model, backend=backend)
    error = (compiled(**inputs).logits - model(**inputs).logits).abs().max().item()
    print(f"max |compiled - eager| = {error:.2e}")


if __name__ == "__main__":
    main()
