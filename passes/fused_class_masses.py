"""Class masses for the fused formulation: a second ONNX ``Attention`` with the key classes
as its value, so the (B, H, S, T) probabilities are never materialised.

Per changed layer ``l``, around its ``Attention(Q, K, V, mask)`` (Q (B, H, S, hd), K/V
(B, Hk, T, hd)), from the sink flags ``var/L{l}/sink``:

    key_classes  = one-hot of 2 [k visual] + [k sink]    (B, 1, T, hd)  visual sink, text sink,
                                                         visual non-sink, rest, then hd - 4 zeros
    class_values = Expand(key_classes, shape(K))         (B, Hk, T, hd)
    class_masses = Attention(Q, K, class_values, mask)   (B, H, S, hd)  same attributes

The class indicators are padded to the head size so that Q, K and V share one head
dimension (TensorRT's attention requires it); only the first three columns are read. The
masses are fp32 on fp16 graphs too (Q, K and a float mask are cast for this Attention).
``var/L{l}/class_masses`` and ``var/L{l}/key_class_code`` are what ``HeadSelectionPass``
reads, as for the unfused ``ClassMassesPass``.
"""

from __future__ import annotations

import onnx_ir as ir

from var_export.core.errors import ConfigError, GraphPatternError
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import CalibratedLayerPass, VarAnalysis
from var_export.passes.builders import build_key_classes, require
from var_export.passes.locate_fused import FusedLayerMatch

__all__ = ["FusedClassMassesPass", "attention_attributes"]


def attention_attributes(match: FusedLayerMatch) -> dict[str, object]:
    """The layer's Attention attributes for another Attention on the same Q/K (no extra output)."""
    attrs = {name: attr.value for name, attr in match.attention.attributes.items()}
    attrs.pop("qk_matmul_output_mode", None)
    return attrs


class FusedClassMassesPass(CalibratedLayerPass):
    """Insert ``var/L{l}/class_masses`` from a second Attention per changed layer."""

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        return _ir.layer_value_name(layer, "class_masses") not in values

    def prepare(self, graph: ir.Graph) -> ir.Value | None:
        return _ir.graph_input(graph, _ir.VISUAL_MASK)

    def build_layer(
        self, b: Builder, match: FusedLayerMatch, values: dict[str, ir.Value], visual: ir.Value | None
    ) -> None:
        (sink,) = require(values, match.layer, ["sink"], "SinkDetectionPass")
        assert visual is not None  # added with the sink flags
        self._layer(b, match, sink, visual)

    def _layer(self, b: Builder, match: FusedLayerMatch, sink: ir.Value, visual: ir.Value) -> None:
        att = match.attention
        q, k = att.inputs[0], att.inputs[1]
        mask = att.inputs[3] if len(att.inputs) > 3 else None
        assert q is not None and k is not None
        if _ir.resolve_dtype(q) not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            raise ConfigError(
                f"layer {match.layer}: the fused VAR formulation is built for fp32 and fp16 graphs, found "
                f"{_ir.resolve_dtype(q)}. Use passes.pipeline.apply_var on an eager export."
            )
        if match.head_dim is None or match.head_dim < 4:
            raise GraphPatternError(
                f"layer {match.layer}: Attention {att.name!r} has no static head size >= 4 (found "
                f"{match.head_dim}); the class indicators are padded to it."
            )
        keys = build_key_classes(b, sink, visual, width=match.head_dim)  # (B, 1, T, hd)
        key_shape = b.op("Shape", [k], "key_shape", dtype=ir.DataType.INT64)  # [B, Hk, T, hd]
        class_values = b.op("Expand", [keys.onehot, key_shape], "class_values")  # (B, Hk, T, hd)
        # fp32 masses whatever the graph's dtype (fp16 graphs: Q, K and a float mask cast up)
        q32 = _ir.cast(b, q, ir.DataType.FLOAT, "query_f32")
        k32 = _ir.cast(b, k, ir.DataType.FLOAT, "key_f32")
        if mask is not None and _ir.resolve_dtype(mask) != ir.DataType.BOOL:
            mask = _ir.cast(b, mask, ir.DataType.FLOAT, "mask_f32")
        masses = b.op("Attention", [q32, k32, class_values, mask], "class_masses", attention_attributes(match))
        masses.dtype = ir.DataType.FLOAT
        masses.shape = ir.Shape([None, None, None, match.head_dim])  # (B, H, S, hd)
