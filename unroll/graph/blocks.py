"""A layer as a networkx data-flow graph, validated before anything is lowered.

Nodes are ``(step, name)``: the step's input ``Z``, each intermediate binding (``Y = LN(Z)``,
``W_k = U_k^T Y``), each parameter and constant, and the step's output ``out``; the output of
one step is the input of the next. An edge means "is computed from"; an edge from ``Z`` straight
to ``out`` is a skip connection. Validation rejects undefined symbols, intermediate results that
feed nothing, and steps whose output does not have the shape of their input.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import sympy as sp

from unroll.derive.update import Update
from unroll.errors import UnrollError
from unroll.expr.printing import to_text
from unroll.expr.symbols import SIZES, d, m


@dataclass
class LayerGraph:
    graph: nx.DiGraph
    updates: list[Update]

    def order(self, step: str) -> list[str]:
        """Bindings of ``step`` in an order where each comes after what it uses."""
        nodes = [n for n in nx.topological_sort(self.graph) if n[0] == step]
        return [name for _, name in nodes if self.graph.nodes[(step, name)]["kind"] == "binding"]

    def skips(self) -> list[str]:
        return [u for (u, v, data) in self.graph.edges(data=True) if data.get("skip")]


def _shape(u: Update, expr: sp.Basic) -> tuple[sp.Expr, sp.Expr]:
    return tuple(sp.sympify(s).xreplace({m: u.expansion * d}) for s in expr.shape)


def build_layer_graph(updates: list[Update]) -> LayerGraph:
    g = nx.DiGraph()
    g.add_node(("input", "Z"), kind="input", shape=(d, SIZES["N"]))
    previous = ("input", "Z")
    for u in updates:
        where = f"step {u.name}"
        g.add_node((u.name, "Z"), kind="input", shape=(d, SIZES["N"]))
        g.add_edge(previous, (u.name, "Z"))
        bound = {s.name for s, _ in u.where}
        params = {p.name for p in u.params}
        for p in u.params:
            g.add_node((u.name, p.name), kind="param", shape=(p.rows, p.cols))
        for c in u.constants:
            g.add_node((u.name, c), kind="constant")
        for s, e in u.where:
            g.add_node((u.name, s.name), kind="binding", expr=e, shape=_shape(u, s) if s.is_Matrix else ())
        g.add_node((u.name, "out"), kind="output", expr=u.out, shape=_shape(u, u.out))
        skip_coeff, _ = u.skip_and_increment()
        for target, e in [*((s.name, e) for s, e in u.where), ("out", u.out)]:
            for atom in e.atoms(sp.Symbol, sp.MatrixSymbol):
                name = atom.name
                if name in SIZES:
                    continue
                if name != "Z" and name not in bound and name not in params and name not in u.constants:
                    raise UnrollError(
                        f"{name} in {to_text(e)} is neither the input, a parameter, a constant nor defined",
                        field=where,
                    )
                g.add_edge((u.name, name), (u.name, target))
        if skip_coeff != 0:
            g.edges[(u.name, "Z"), (u.name, "out")]["skip"] = True
        for s, _ in u.where:
            if not nx.has_path(g, (u.name, s.name), (u.name, "out")):
                raise UnrollError(f"the intermediate result {s.name} feeds nothing", field=where)
        in_shape, out_shape = (d, SIZES["N"]), g.nodes[(u.name, "out")]["shape"]
        if tuple(out_shape) != in_shape:
            raise UnrollError(
                f"the step outputs a {out_shape[0]} x {out_shape[1]} matrix but layers carry d x N tokens; "
                "decode the sparse code (decode: decoupled or tied) or use a square dictionary",
                field=where,
            )
        previous = (u.name, "out")
    g.add_node(("output", "Z"), kind="output", shape=(d, SIZES["N"]))
    g.add_edge(previous, ("output", "Z"))
    if not nx.is_directed_acyclic_graph(g):
        raise UnrollError("the layer's data flow has a cycle")
    dangling = [n for n in g if g.nodes[n]["kind"] in ("param", "constant") and g.out_degree(n) == 0]
    if dangling:
        raise UnrollError(f"unused parameters or constants: {', '.join(f'{a}.{b}' for a, b in dangling)}")
    return LayerGraph(g, list(updates))
