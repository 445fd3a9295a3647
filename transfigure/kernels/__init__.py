"""Kernels: each Triton kernel beside its plain-PyTorch reference, registered as a ``transfigure::`` op.

This package imports nothing from the rest of transfigure (dependencies point kernels <- passes <- backends).
"""

from .autotune import Autotuner, Config
from .registry import define_op, interpreter_mode, triton_available
from .threshold import sparsify, sparsify_reference, sparsify_triton

__all__ = [
    "Autotuner",
    "Config",
    "define_op",
    "interpreter_mode",
    "triton_available",
    "sparsify",
    "sparsify_reference",
    "sparsify_triton",
]
