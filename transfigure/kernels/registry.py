"""How every transfigure kernel becomes a torch op.

Each kernel module defines a plain-PyTorch *reference* (the CPU path and the test oracle) and, where it
has one, a Triton *launcher* for CUDA tensors. :func:`define_op` turns the pair into one
``torch.library.custom_op`` under the ``transfigure::`` namespace so that:

* Dynamo, AOTAutograd and Inductor treat it as an opaque, well-typed call (it shows by name in every
  graph dump, e.g. ``torch.ops.transfigure.sparsify``);
* CPU tensors run the reference, CUDA tensors run the Triton launcher (fall back to the reference when
  Triton is unavailable);
* a fake implementation gives shapes to the tracer, and an optional backward makes it differentiable.

Custom ops (not ``triton_op``) are used because ``triton_op`` fails under torch.compile in Triton's
interpreter mode (see DESIGN.md), and CI runs only that mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

NAMESPACE = "transfigure"


def triton_available() -> bool:
    """True when Triton can be imported (it is absent on macOS/Windows CPU installs)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreter_mode() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def define_op(
    name: str,
    reference: Callable[..., Any],
    *,
    cuda: Callable[..., Any] | None = None,
    fake: Callable[..., Any] | None = None,
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., Any] | None = None,
    mutates_args: tuple[str, ...] = (),
    tags: tuple[Any, ...] = (),
):
    """Register ``transfigure::<name>`` with ``reference`` as its schema source and CPU kernel.

    ``reference`` must be type-annotated (the schema is inferred from it) and must return fresh tensors,
    never views of its inputs. ``cuda`` (same signature) runs for CUDA tensors; ``fake`` computes output
    metadata for tracing (defaults to running ``reference`` on fake tensors, which is right for references
    built from shape-polymorphic torch ops). ``backward``/``setup_context`` follow
    ``torch.library.register_autograd``. ``tags``: ``torch.Tag`` values of the op (e.g. ``cudagraph_unsafe``).
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args, tags=tags or None)(reference)
    if cuda is not None:
        op.register_kernel("cuda")(cuda)
    op.register_fake(fake if fake is not None else reference)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return op
