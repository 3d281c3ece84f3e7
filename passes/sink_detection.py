"""Sink detection: per VAR layer, flag the tokens whose residual stream is a sink.

Adds the graph input ``visual_token_mask`` [B, T] bool, the cache input
``past_sink_mask`` [B, Lv, P] bool and the output ``present_sink_mask`` [B, Lv, T]
bool (Lv = number of VAR layers, in layer order; DESIGN.md §3). Per VAR layer ``l``
(DESIGN.md §1), on the residual stream ``x`` (B, S, D) entering the layer, in fp32:

    n    = x[..., D_sink] / sqrt(mean(x^2 over D) + 1e-6)     # (B, S, k)
    new  = max_k |n| > tau  AND  attention_mask[:, P:]        # (B, S) pads never sinks
    new  = new AND (P == 0)                                   # sink_scope == "prompt"
    sink = concat(past_sink_mask[:, j], new)                  # (B, T) -> var/L{l}/sink

``var/L{l}/sink`` is what head selection and redistribution read.
"""

from __future__ import annotations

import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.builders import (
    add_present_sink_mask,
    add_sink_mask_io,
    build_sink_flags,
    build_sink_inputs,
    check_var_layers,
)
from var_export.passes.locate import locate_layers

__all__ = ["SinkDetectionPass"]


class SinkDetectionPass(ir.passes.InPlacePass):
    """Insert the per-layer sink flags and the sink-mask cache input/output."""

    def __init__(self, settings: VarSettings, *, num_layers: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.num_layers = num_layers

    def requires(self, model: ir.Model) -> None:
        if _ir.graph_input(model.graph, _ir.ATTENTION_MASK) is None:
            raise GraphPatternError(
                f"graph input {_ir.ATTENTION_MASK!r} not found (inputs: "
                f"{[v.name for v in model.graph.inputs]}); sink detection needs it to keep "
                "padding tokens from being sinks. Export the decoder with an attention_mask input."
            )

    def ensures(self, model: ir.Model) -> None:
        assert _ir.graph_output(model.graph, _ir.PRESENT_SINK_MASK) is not None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if _ir.graph_output(graph, _ir.PRESENT_SINK_MASK) is not None:
            return ir.passes.PassResult(model, modified=False)  # already there
        matches = {m.layer: m for m in locate_layers(model).matches}
        num_layers = self.num_layers or max(matches) + 1
        var_layers = self.settings.var_layers(num_layers)
        check_var_layers(var_layers, matches, "attention")
        attention_mask = _ir.graph_input(graph, _ir.ATTENTION_MASK)
        assert attention_mask is not None
        io = add_sink_mask_io(graph, attention_mask, len(var_layers))
        inputs = build_sink_inputs(Builder(graph, "var"), self.settings, attention_mask, io.past_sink)
        rows = []
        for j, layer in enumerate(var_layers):
            lb = Builder(graph, f"var/L{layer}")
            sink = build_sink_flags(lb, inputs, matches[layer].residual, j, io)  # (B, T)
            rows.append(_ir.unsqueeze(lb, sink, [1], "sink_row"))  # (B, 1, T)
        add_present_sink_mask(graph, rows, io)  # (B, Lv, T)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)
