"""transfigure: a torch.compile backend and graph-rewriting compiler for transformer models.

    compiled = torch.compile(model, backend="transfigure", options={...})
    report = transfigure.inspect(model, *inputs, **options)
"""

from .backends import Backend, backend, inspect
from .backends.backend import StaleWeightsError
from .backends.decode import decoding_loop, generate
from .compiler import GraphView, OptionError, Pass, PassResult, Report, option, register_pass
from .compiler.graph import trainable_tensors_for
from .passes.attention_transfer import distill_attention
from .passes.teal_calibration import calibrate

__version__ = "0.1.0"


def trainable_parameters(model):
    """Trainable tensors that passes attached to ``model``'s compiled graphs (adapters, feature maps).

    Graphs compile lazily: call the compiled model once before asking. Give the result to any optimizer,
    together with whatever of ``model.parameters()`` you want trained.
    """
    return list(named_trainable_parameters(model).values())


def named_trainable_parameters(model) -> dict:
    """Like :func:`trainable_parameters`, keyed by the name each pass gave the tensor."""
    return trainable_tensors_for(model.parameters())


__all__ = [
    "Backend",
    "GraphView",
    "OptionError",
    "Pass",
    "PassResult",
    "Report",
    "StaleWeightsError",
    "backend",
    "calibrate",
    "decoding_loop",
    "distill_attention",
    "generate",
    "inspect",
    "named_trainable_parameters",
    "option",
    "register_pass",
    "trainable_parameters",
]
