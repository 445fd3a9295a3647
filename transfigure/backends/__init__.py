"""The torch.compile entry points: ``backend="transfigure"`` (Inductor) and ``"transfigure_eager"``."""

from .backend import Backend, backend, transfigure, transfigure_eager
from .inspect import inspect

__all__ = ["Backend", "backend", "inspect", "transfigure", "transfigure_eager"]
