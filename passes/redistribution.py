"""Redistribution: rewrite the probabilities that feed ``probs @ V`` on selected rows.

On a row selected by head selection (``var/L{l}/selected``), VAR multiplies three key
classes by three row constants (DESIGN.md §1):

    m_sink = p                                                   sinks (visual and text)
    m_vis  = 1 + (1 - p) (visual_sink_mass + text_sink_mass)
                 / visual_nonsink_mass                           visual non-sinks
    m_rest = 1                                                   everything else

    a' = where(selected, a * w, a),   w[k] = 1 + sink[k] (p - 1) + vis_nonsink[k] (m_vis - 1)

The arithmetic is fp32 (Cast in and out when the graph's probabilities are fp16);
the denominator is guarded (selection already requires it to be > 0).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.builders import build_visual_boost
from var_export.passes.locate import locate_layers

__all__ = ["RedistributionPass"]


class RedistributionPass(ir.passes.InPlacePass):
    """Replace the probs-V MatMul input by the redistributed probabilities."""

    def __init__(self, settings: VarSettings, *, num_layers: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.num_layers = num_layers

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = {m.layer: m for m in locate_layers(model).matches}
        values = _ir.value_map(graph)
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        modified = False
        num_layers = self.num_layers or max(matches) + 1
        for layer in self.settings.var_layers(num_layers):
            selected = values.get(_ir.layer_value_name(layer, "selected"))
            if selected is None:
                continue  # no head selected in this layer: left untouched
            match = matches[layer]
            producer = match.pv_matmul.inputs[0].producer() if match.pv_matmul.inputs[0] else None
            if producer is not None and _ir.is_var_node(producer):
                continue  # already redistributed
            if visual is None:
                raise GraphPatternError(f"graph input {_ir.VISUAL_MASK!r} missing; run SinkDetectionPass first.")
            need = ("sink", "image_mass", "visual_sink_mass", "text_sink_mass", "visual_nonsink_mass")
            got = {n: values.get(_ir.layer_value_name(layer, n)) for n in need}
            absent = [_ir.layer_value_name(layer, n) for n, v in got.items() if v is None]
            if absent:
                raise GraphPatternError(f"layer {layer}: {absent} not found; run HeadSelectionPass first.")
            b = Builder(graph, f"var/L{layer}")
            p = np.float32(self.settings.p)
            one = b.const("one_f32", np.float32(1.0))
            nonsink_mass = got["visual_nonsink_mass"]
            movable = b.op("Greater", [nonsink_mass, b.const("zero_f32", np.float32(0.0))], "nonsink_positive")
            boost = build_visual_boost(  # m_vis - 1, (B, H, S, 1)
                b,
                self.settings.p,
                visual_sink_mass=got["visual_sink_mass"],
                text_sink_mass=got["text_sink_mass"],
                visual_nonsink_mass=nonsink_mass,
                movable=movable,
            )
            sink_f = b.op("Cast", [got["sink"]], "sink_f32", {"to": ir.DataType.FLOAT})  # (B, T)
            not_sink = b.op("Not", [got["sink"]], "not_sink")
            vis_nonsink = b.op("And", [visual, not_sink], "visual_nonsink")
            vis_nonsink_f = b.op("Cast", [vis_nonsink], "visual_nonsink_f32", {"to": ir.DataType.FLOAT})
            sink_k = _ir.unsqueeze(b, sink_f, [1, 2], "sink_keys")  # (B, 1, 1, T)
            vis_k = _ir.unsqueeze(b, vis_nonsink_f, [1, 2], "visual_nonsink_keys")  # (B, 1, 1, T)
            sink_term = b.op("Mul", [sink_k, b.const("p_minus_one", p - np.float32(1.0))], "sink_delta")
            vis_term = b.op("Mul", [vis_k, boost], "visual_delta")  # (B, H, S, T)
            weights = b.op("Add", [b.op("Add", [vis_term, sink_term], "delta"), one], "key_weights")
            probs = _ir.cast(b, match.probs, ir.DataType.FLOAT, "probs_f32_r")
            scaled = b.op("Mul", [probs, weights], "probs_scaled")
            new_probs = b.op("Where", [selected, scaled, probs], "probs_var")  # (B, H, S, T)
            if match.probs_dtype != ir.DataType.FLOAT:
                new_probs = b.op("Cast", [new_probs], "probs_var_cast", {"to": match.probs_dtype})
            new_probs.dtype = match.probs_dtype
            new_probs.shape = match.probs.shape
            match.pv_matmul.replace_input_with(0, new_probs)
            modified = True
        if modified:
            graph.sort()
        return ir.passes.PassResult(model, modified=modified)
