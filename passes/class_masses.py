"""Class masses: each attention row's mass on each key class, for the layers VAR changes.

Per changed layer ``l`` (every VAR layer in dynamic mode; static/hybrid: those with a
calibrated head), from the sink flags ``var/L{l}/sink`` of the sink-detection pass:

    code        = 2 [k visual] + [k sink]                       (B, 1, T, 1)  key_class_code
    key_classes = code == (3, 1, 2, 0)                          (B, 1, T, 4)  visual sink,
                                                                text sink, visual non-sink, rest
    masses      = probs_f32 @ key_classes                       (B, H, S, 4)  class_masses

``probs_f32`` is the layer's (B, H, S, T) probabilities in fp32 (one Cast on fp16 graphs,
which redistribution reuses). The visual non-sink mass is its own column: no
``image - visual_sink`` cancellation when nearly all visual attention sits on the sinks.
"""

from __future__ import annotations

import onnx_ir as ir

from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import CalibratedLayerPass, VarAnalysis
from var_export.passes.builders import build_key_classes, require
from var_export.passes.locate import LayerMatch

__all__ = ["ClassMassesPass"]


class ClassMassesPass(CalibratedLayerPass):
    """Insert ``var/L{l}/key_classes`` and ``var/L{l}/class_masses`` (unfused attention)."""

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        return _ir.layer_value_name(layer, "class_masses") not in values

    def prepare(self, graph: ir.Graph) -> ir.Value | None:
        return _ir.graph_input(graph, _ir.VISUAL_MASK)

    def build_layer(self, b: Builder, match: LayerMatch, values: dict[str, ir.Value], visual: ir.Value | None) -> None:
        (sink,) = require(values, match.layer, ["sink"], "SinkDetectionPass")
        assert visual is not None  # added with the sink flags
        keys = build_key_classes(b, sink, visual)  # (B, 1, T, 4)
        probs = _ir.cast(b, match.probs, ir.DataType.FLOAT, "probs_f32")  # (B, H, S, T)
        masses = b.op("MatMul", [probs, keys.onehot], "class_masses")  # (B, H, S, 4)
        masses.dtype, masses.shape = ir.DataType.FLOAT, ir.Shape([None, None, None, 4])
