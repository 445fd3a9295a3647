"""Reports of what the compiler did: per graph, per pass, readable code before/after, diffs and sites.

A :class:`Report` prints as a compact table and ``save(dir)`` writes, for every graph and pass, the code
before and after, a unified diff, a JSON summary and a picture of the rewritten region (SVG with
matplotlib installed, Graphviz DOT otherwise).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch.fx as fx

from .passes import PassResult


@dataclasses.dataclass
class Region:
    """The part of a graph a pass changed: new nodes and their direct neighbours (names and labels)."""

    nodes: list[tuple[str, str, bool]]  # (name, label, is_new)
    edges: list[tuple[str, str]]
    removed: list[str]

    @staticmethod
    def between(before: fx.Graph, after: fx.Graph, limit: int = 120) -> "Region":
        before_names = {n.name for n in before.nodes}
        after_nodes = {n.name: n for n in after.nodes}
        new = [n for n in after.nodes if n.name not in before_names]
        keep: dict[str, fx.Node] = {}
        for node in new:
            keep[node.name] = node
            for neighbour in list(node.all_input_nodes) + list(node.users):
                keep.setdefault(neighbour.name, neighbour)
            if len(keep) > limit:
                break
        position = {name: i for i, name in enumerate(after_nodes)}
        ordered = sorted(keep.items(), key=lambda item: position.get(item[0], 0))
        nodes = [(name, _label(node), name not in before_names) for name, node in ordered]
        edges = [(p.name, n.name) for n in keep.values() for p in n.all_input_nodes if p.name in keep]
        removed = sorted(before_names - set(after_nodes))
        return Region(nodes, edges, removed)

    def to_dot(self) -> str:
        lines = ["digraph rewritten {", "  rankdir=TB; node [shape=box, fontsize=10];"]
        for name, label, is_new in self.nodes:
            style = ', style=filled, fillcolor="#ffd27f"' if is_new else ""
            lines.append(f'  "{name}" [label="{label}"{style}];')
        lines += [f'  "{a}" -> "{b}";' for a, b in self.edges]
        lines.append("}")
        return "\n".join(lines)

    def draw(self, path: Path) -> Path:
        """Write SVG and PNG pictures (matplotlib) or, without matplotlib, a ``.dot`` file; returns the path."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            import networkx as nx
        except ImportError:
            dot = path.parent / (path.name + ".dot")
            dot.write_text(self.to_dot())
            return dot
        graph = nx.DiGraph()
        for name, label, is_new in self.nodes:
            graph.add_node(name, label=label, new=is_new)
        graph.add_edges_from(self.edges)
        order = {name: i for i, (name, _, _) in enumerate(self.nodes)}
        positions = {}
        for depth, names in enumerate(nx.topological_generations(graph)):
            for column, name in enumerate(sorted(names, key=order.__getitem__)):
                positions[name] = (column, -depth)
        height = max(4.0, 0.5 * len(graph))
        figure, axes = plt.subplots(figsize=(12, min(height, 60)))
        colors = ["#ffd27f" if graph.nodes[n]["new"] else "#cfe2ff" for n in graph]
        nx.draw_networkx(
            graph,
            positions,
            ax=axes,
            labels={n: graph.nodes[n]["label"] for n in graph},
            node_color=colors,
            node_size=600,
            font_size=7,
            arrowsize=8,
        )
        axes.set_title("rewritten region (orange: added by the pass)")
        axes.axis("off")
        figure.tight_layout()
        svg = path.parent / (path.name + ".svg")
        figure.savefig(svg)
        figure.savefig(path.parent / (path.name + ".png"), dpi=80)
        plt.close(figure)
        return svg


def _label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return node.name[:40]
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.name[:28]}\n{str(target)[:28]}"


@dataclasses.dataclass
class PassReport:
    name: str
    options: dict[str, Any]
    result: PassResult
    code_before: str
    code_after: str
    region: Region | None
    verify_error: float | None
    seconds: float
    error: str | None = None

    @property
    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.code_before.splitlines(keepends=True),
                self.code_after.splitlines(keepends=True),
                fromfile=f"before/{self.name}.py",
                tofile=f"after/{self.name}.py",
            )
        )

    @property
    def changed(self) -> bool:
        return self.code_before != self.code_after

    def summary(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "matched": self.result.matched,
            "rewritten": len(self.result.rewritten),
            "skipped": len(self.result.skipped),
            "sites": [dataclasses.asdict(s) for s in self.result.sites],
            "tensors_added": [dataclasses.asdict(t) for t in self.result.tensors_added],
            "notes": self.result.notes,
            "warnings": self.result.warnings,
            "verify_max_rel_error": self.verify_error,
            "seconds": round(self.seconds, 4),
            "changed": self.changed,
        }


@dataclasses.dataclass
class GraphReport:
    """Everything done to one graph Dynamo handed the backend."""

    index: int
    inventory: dict[str, list[dict[str, Any]]]
    placeholders: dict[str, int]
    passes: list[PassReport] = dataclasses.field(default_factory=list)
    original_code: str = ""
    final_code: str = ""
    verify_error: float | None = None
    lowering: str = ""
    compile_seconds: float = 0.0  # passes + lowering (the backend's whole call for this graph)
    lowering_seconds: float = 0.0
    label: str = ""  # what the graph is for, where the caller knows (the decoding loop: "prompt", "decode step")

    def sites(self, status: str | None = None):
        for report in self.passes:
            for site in report.result.sites:
                if status is None or site.status == status:
                    yield report.name, site

    def summary(self) -> dict[str, Any]:
        return {
            "graph": self.index,
            "lowering": self.lowering,
            "label": self.label,
            "placeholders": self.placeholders,
            "inventory": self.inventory,
            "passes": [p.summary() for p in self.passes],
            "verify_max_rel_error": self.verify_error,
            "compile_seconds": round(self.compile_seconds, 3),
            "lowering_seconds": round(self.lowering_seconds, 3),
        }


class Report:
    """The report of one ``inspect`` (or of every graph a backend compiled)."""

    def __init__(self, graphs: list[GraphReport] | None = None):
        self.graphs: list[GraphReport] = list(graphs or [])

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, index: int) -> GraphReport:
        return self.graphs[index]

    def pass_report(self, name: str, graph: int = 0) -> PassReport:
        for report in self.graphs[graph].passes:
            if report.name == name:
                return report
        raise KeyError(f"no pass named {name!r} ran on graph {graph}; ran: {[p.name for p in self.graphs[graph].passes]}")

    def summary(self) -> dict[str, Any]:
        return {"graphs": [g.summary() for g in self.graphs]}

    def table(self) -> str:
        lines = []
        for graph in self.graphs:
            counts = ", ".join(f"{v} {k}" for k, v in graph.placeholders.items())
            timing = (f" ({graph.lowering_seconds:.1f} s of a {graph.compile_seconds:.1f} s compile)"
                      if graph.compile_seconds else "")
            lines.append(f"graph {graph.index}: {counts}; lowering: {graph.lowering}{timing}")
            header = f"  {'pass':<18}{'matched':>8}{'rewritten':>10}{'skipped':>8}{'added MB':>10}{'max rel err':>13}{'ms':>9}"
            lines.append(header)
            lines.append("  " + "-" * (len(header) - 2))
            if not graph.passes:
                lines.append("  (no passes ran)")
            for p in graph.passes:
                added = sum(t.bytes for t in p.result.tensors_added) / 2**20
                err = "-" if p.verify_error is None else f"{p.verify_error:.2e}"
                lines.append(
                    f"  {p.name:<18}{p.result.matched:>8}{len(p.result.rewritten):>10}{len(p.result.skipped):>8}"
                    f"{added:>10.2f}{err:>13}{p.seconds * 1e3:>9.1f}"
                )
                for text in p.result.warnings:
                    lines.append(f"    warning: {text}")
                for site in p.result.skipped[:5]:
                    lines.append(f"    skipped {site.fqn or site.node}: {site.detail}")
                if len(p.result.skipped) > 5:
                    lines.append(f"    ... {len(p.result.skipped) - 5} more skipped (see report.save())")
            for kind, sites in graph.inventory.items():
                lines.append(f"  {kind} sites: {len(sites)}")
                for site in sites:
                    lines.append("    " + "  ".join(f"{k}={v}" for k, v in site.items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"<transfigure.Report graphs={len(self.graphs)} passes={[p.name for g in self.graphs for p in g.passes]}>"

    def save(self, directory: str | os.PathLike) -> Path:
        """Write code, diffs, pictures and ``summary.json`` under ``directory``; returns the directory."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        for graph in self.graphs:
            folder = root / f"graph_{graph.index:02d}"
            folder.mkdir(exist_ok=True)
            (folder / "00_original.py").write_text(graph.original_code)
            (folder / "99_final.py").write_text(graph.final_code)
            for position, p in enumerate(graph.passes, start=1):
                stem = f"{position:02d}_{_safe(p.name)}"
                (folder / f"{stem}.before.py").write_text(p.code_before)
                (folder / f"{stem}.after.py").write_text(p.code_after)
                (folder / f"{stem}.diff").write_text(p.diff)
                if p.region is not None and p.region.nodes:
                    p.region.draw(folder / f"{stem}.region")
        (root / "summary.json").write_text(json.dumps(self.summary(), indent=2, default=_jsonable))
        (root / "report.txt").write_text(self.table() + "\n")
        return root


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
