"""Inspect what transfigure does to a model's graph: sites, per-pass code, diffs, pictures."""

import sys

from custom_pass import ExpandSilu

import transfigure
from transfigure.models import example_inputs, tiny_model


def main(out_dir: str = "transfigure_dump") -> None:
    model = tiny_model("qwen3")
    # Built-in passes are enabled by keyword the same way, e.g. linearize={"feature_map": "elu"}.
    report = transfigure.inspect(model, passes=[ExpandSilu()], kwargs=example_inputs("qwen3"))
    print(report)  # the compact table: passes, sites (linear with FQN and shape, SDPA with layer)
    graph = report.graphs[0]
    print(f"\n{len(graph.inventory['linear'])} linear sites, {len(graph.inventory['attention'])} attention sites")
    print(graph.original_code[:600], "...")
    print(f"\nfull dump (code, diffs, region pictures, summary.json): {report.save(out_dir)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
