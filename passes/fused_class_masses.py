"""Class masses for the fused formulation: a second ONNX ``Attention`` with the key classes
as its value, so the (B, H, S, T) probabilities are never materialised.

Per changed layer ``l``, around its ``Attention(Q, K, V, mask)`` (Q (B, H, S, hd), K/V
(B, Hk, T, hd)), from the sink flags ``var/L{l}/sink``, with W = ``padded_head_size(hd)``:

    key_classes  = one-hot of 2 [k visual] + [k sink]    (B, 1, T, W)   visual sink, text sink,
                                                         visual non-sink, rest, then W - 4 zeros
    query_padded = [Q, 0]   key_padded = [K, 0]          (B, H|Hk, S|T, W)  W - hd zero columns
    class_values = Expand(key_classes, shape(key_padded)) (B, Hk, T, W)
    class_masses = Attention(query_padded, key_padded, class_values, mask)   (B, H, S, W)
                   same attributes, the layer's scale made explicit

The zero columns leave every score unchanged. They make Q, K and V share one head size (TensorRT's
attention requires it) that is a multiple of 8 (TensorRT-RTX's fp16 attention requires it), and
they give this Attention other Q/K tensors than the layer's own: TensorRT-RTX 1.7's builder
segfaults when one Attention's output reaches another's mask and both read the same Q or K
tensor (docs/tensorrt.md). The Attention runs in the graph's dtype (TensorRT-RTX 1.7 cannot build
an fp32 Attention on fp16 Q/K casts inside an fp16 network); the masses are cast to fp32 after it,
so on fp16 graphs they carry fp16 rounding (relative 2^-11). Only the first three columns are
read. ``var/L{l}/class_masses`` and ``var/L{l}/key_class_code`` are what ``HeadSelectionPass``
reads, as for the unfused ``ClassMassesPass``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from var_export.core.errors import ConfigError, GraphPatternError
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import CalibratedLayerPass, VarAnalysis
from var_export.passes.builders import build_key_classes, require
from var_export.passes.locate_fused import FusedLayerMatch

__all__ = ["FusedClassMassesPass", "additive_mask", "attention_attributes", "padded_head_size"]

_CLASSES = 4  # key class columns (builders.CLASS_COLUMNS)
_ALIGN = 8  # TensorRT-RTX's fp16 attention needs a head size that is a multiple of 8


def padded_head_size(head_dim: int) -> int:
    """The head size of VAR's Attention inputs: ``head_dim`` + the 4 class columns, rounded up
    to a multiple of 8 (128 -> 136), for the class masses and the ``qk`` score shift alike."""
    return -(-(head_dim + _CLASSES) // _ALIGN) * _ALIGN


def attention_attributes(match: FusedLayerMatch) -> dict[str, object]:
    """The layer's Attention attributes for another Attention on the same scores (no extra
    output; the scale explicit, as the head size of its inputs differs)."""
    attrs = {name: attr.value for name, attr in match.attention.attributes.items()}
    attrs.pop("qk_matmul_output_mode", None)
    attrs["scale"] = float(match.scale)
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
        if match.head_dim is None:
            raise GraphPatternError(
                f"layer {match.layer}: Attention {att.name!r} has no static head size (dim 3 of its "
                "query); the class indicators are padded beyond it. Export with static head sizes."
            )
        dtype = _ir.resolve_dtype(q)
        width = padded_head_size(match.head_dim)
        keys = build_key_classes(b, sink, visual, width=width)  # (B, 1, T, W) fp32
        pads = b.const(f"pads_{width - match.head_dim}", [0, 0, 0, 0, 0, 0, 0, width - match.head_dim], np.int64)
        q_pad = b.op("Pad", [q, pads], "query_padded")  # (B, H, S, W), zeros appended
        k_pad = b.op("Pad", [k, pads], "key_padded")  # (B, Hk, T, W)
        q_pad.dtype = k_pad.dtype = dtype
        key_shape = b.op("Shape", [k_pad], "key_shape", dtype=ir.DataType.INT64)  # [B, Hk, T, W]
        class_values = b.op("Expand", [keys.onehot, key_shape], "class_values")  # (B, Hk, T, W) fp32
        class_values.dtype = ir.DataType.FLOAT
        values = _ir.cast(b, class_values, dtype, "class_values_cast")  # exact: 0 and 1
        if mask is not None and _ir.resolve_dtype(mask) == ir.DataType.BOOL:
            mask = additive_mask(b.graph, mask, dtype)  # (module doc)
        # in the graph's dtype (module doc), the masses cast to fp32 after it
        name = "class_masses" if dtype == ir.DataType.FLOAT else f"class_masses_{dtype.name.lower()}"
        raw = b.op("Attention", [q_pad, k_pad, values, mask], name, attention_attributes(match))
        raw.dtype, raw.shape = dtype, ir.Shape([None, None, None, width])
        masses = _ir.cast(b, raw, ir.DataType.FLOAT, "class_masses")
        masses.shape = ir.Shape([None, None, None, width])  # (B, H, S, W)


def additive_mask(graph: ir.Graph, mask: ir.Value, dtype: ir.DataType) -> ir.Value:
    """A bool Attention mask as the additive float mask it stands for, per graph: 0 where True,
    the dtype's lowest value where False (as ``MaskShiftPass`` writes its masks)."""
    b = Builder(graph, "var")
    np_dtype = dtype.numpy()
    zero = b.const(f"zero_{dtype.name.lower()}", np.zeros((), np_dtype))
    lowest = b.const(f"lowest_{dtype.name.lower()}", np.array(np.finfo(np_dtype).min, np_dtype))
    additive = b.op("Where", [mask, zero, lowest], f"attention_mask_additive_{dtype.name.lower()}")
    additive.dtype = dtype
    return additive
