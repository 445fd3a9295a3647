"""transfigure: a torch.compile backend and graph-rewriting compiler for transformer models."""

__version__ = "0.1.0"
