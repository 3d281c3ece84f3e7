"""Sink detection: per VAR layer, flag the tokens whose residual stream is a sink.

Adds the graph input ``visual_token_mask`` [B, T] bool, the cache input
``past_sink_mask`` [B, Lv, P] bool and the output ``present_sink_mask`` [B, Lv, T]
bool (Lv = number of VAR layers, in layer order; DESIGN.md §3). Per VAR layer ``l``
(DESIGN.md §1), on the residual stream ``x`` (B, S, D) entering the layer, in fp32:

    new  = max_d x_d^2 > tau^2 (mean(x^2 over D) + 1e-6)    # d in D_sink; (B, S)
           (= max_d |x_d / rms(x)| > tau, without the division)
    new  = new AND attention_mask[:, P:]                     # pads are never sinks
    new  = new AND (P == 0)                                  # sink_scope == "prompt"
    sink = concat(past_sink_mask[:, j:j+1], new[:, None])    # (B, 1, T) -> var/L{l}/sink

``var/L{l}/sink`` is what the class-mass passes read; the rows are ``present_sink_mask``.
Both formulations run this pass: the residual comes from the shared ``VarAnalysis``.
"""

from __future__ import annotations

import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import VarLayerPass, analysis_for
from var_export.passes.builders import (
    add_present_sink_mask,
    add_sink_mask_io,
    build_sink_flags,
    build_sink_inputs,
    check_var_layers,
)

__all__ = ["SinkDetectionPass"]


class SinkDetectionPass(VarLayerPass):
    """Insert the per-layer sink flags and the sink-mask cache input/output.

    Every VAR layer at once (its own ``call``): the per-layer rows are stacked into one
    ``present_sink_mask`` output, and a graph that has it already is left as it is.
    """

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
        analysis = analysis_for(model, self.analysis)
        var_layers = self.layers(analysis)
        check_var_layers(var_layers, analysis.matches, "attention")
        attention_mask = _ir.graph_input(graph, _ir.ATTENTION_MASK)
        assert attention_mask is not None
        io = add_sink_mask_io(graph, attention_mask, len(var_layers))
        inputs = build_sink_inputs(Builder(graph, "var"), self.settings, attention_mask, io.past_sink)
        rows = [
            build_sink_flags(Builder(graph, f"var/L{layer}"), inputs, analysis.matches[layer].residual, j)
            for j, layer in enumerate(var_layers)
        ]  # (B, 1, T) each
        add_present_sink_mask(graph, rows, io)  # (B, Lv, T)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)
