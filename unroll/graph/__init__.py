"""The block graph of a layer: steps, their intermediate results, skips and norms."""

from unroll.graph.blocks import LayerGraph, build_layer_graph

__all__ = ["LayerGraph", "build_layer_graph"]
