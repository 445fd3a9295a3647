"""Graph binding, the Pass protocol, the pipeline, options and reports."""

from .graph import (AttentionCall, GraphView, LinearCall, Placeholder, ResidualAdd, copy_graph_module, layer_index,
                    written_operands)
from .options import OptionError, option
from .passes import BUILTIN_PASSES, NoOptions, Pass, PassResult, SiteRecord, builtin_passes, register_pass
from .pipeline import CompilerOptions, PassError, max_relative_error, parse_compile_options, run_graph, run_pipeline
from .report import GraphReport, PassReport, Report

__all__ = [
    "AttentionCall",
    "BUILTIN_PASSES",
    "CompilerOptions",
    "GraphReport",
    "GraphView",
    "LinearCall",
    "NoOptions",
    "OptionError",
    "Pass",
    "PassError",
    "PassReport",
    "PassResult",
    "Placeholder",
    "Report",
    "ResidualAdd",
    "SiteRecord",
    "builtin_passes",
    "copy_graph_module",
    "layer_index",
    "max_relative_error",
    "written_operands",
    "option",
    "parse_compile_options",
    "register_pass",
    "run_graph",
    "run_pipeline",
]
