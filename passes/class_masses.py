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

from collections.abc import Iterable

import onnx_ir as ir

from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import VarAnalysis, analysis_for
from var_export.passes.builders import build_key_classes, calibrated_heads, changed_layers, require

__all__ = ["ClassMassesPass"]


class ClassMassesPass(ir.passes.InPlacePass):
    """Insert ``var/L{l}/key_classes`` and ``var/L{l}/class_masses`` (unfused attention)."""

    def __init__(
        self,
        settings: VarSettings,
        heads: Iterable[tuple[int, int]] | None = None,
        *,
        num_layers: int | None = None,
        analysis: VarAnalysis | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.heads = calibrated_heads(settings.heads, heads)
        self.num_layers = num_layers
        self.analysis = analysis

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        analysis = analysis_for(model, self.analysis)
        values = _ir.value_map(graph)
        todo = [
            layer
            for layer in changed_layers(self.settings, self.heads, analysis.num_layers(self.num_layers))
            if _ir.layer_value_name(layer, "class_masses") not in values
        ]
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        for layer in todo:
            (sink,) = require(values, layer, ["sink"], "SinkDetectionPass")
            assert visual is not None  # added with the sink flags
            b = Builder(graph, f"var/L{layer}")
            keys = build_key_classes(b, sink, visual)  # (B, 1, T, 4)
            probs = _ir.cast(b, analysis.matches[layer].probs, ir.DataType.FLOAT, "probs_f32")  # (B, H, S, T)
            masses = b.op("MatMul", [probs, keys.onehot], "class_masses")  # (B, H, S, 4)
            masses.dtype, masses.shape = ir.DataType.FLOAT, ir.Shape([None, None, None, 4])
        if todo:
            graph.sort()
        return ir.passes.PassResult(model, modified=bool(todo))
