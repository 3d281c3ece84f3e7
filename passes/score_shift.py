"""Score shift: the fused formulation's redistribution, inside the layer's own ``Attention``.

On a selected row VAR multiplies the key classes by the row constants ``row_scale``
(``builders.build_row_scale``, as ``RedistributionPass``), so ``a' = softmax(scores + log m)``
with ``log m = log(row_scale) @ key_classes^T``: exactly 0 on rows that are not selected.
Two forms, one pass each:

``QKShiftPass``    the shift as extra Q/K columns (FLOP-neutral, no (B, H, S, T) tensor):
                   Q' = [Q, log(row_scale) / scale]                  (B, H, S, hd + 4)
                   K' = [K, class_values[..., :4]]                   (B, Hk, T, hd + 4)
                   V' = [V, 0]                                       (B, Hk, T, hd + 4)
                   out = Attention(Q', K', V')[..., :hd], scale attribute made explicit
                   (V is padded so Q, K and V share one head size, as TensorRT requires).
``MaskShiftPass``  the shift added to the mask, a float (B, H, S, T) tensor:
                   Where(mask, shift, lowest) for a bool mask, mask + shift for a float one.

``row_scale`` is fp32; on fp16 graphs the extra columns / the mask are cast to fp16.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import VarAnalysis, VarLayerPass
from var_export.passes.builders import ClassMasses, build_row_scale, require
from var_export.passes.locate_fused import FusedLayerMatch

__all__ = ["MaskShiftPass", "QKShiftPass"]

_NEEDS = ("selected", "visual_sink_mass", "text_sink_mass", "visual_nonsink_mass")


class _ScoreShiftPass(VarLayerPass):
    """Per changed layer: ``log(row_scale)`` (B, H, S, 4), then ``shift`` rewires the Attention."""

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        match = analysis.matches[layer]
        # not selected in this layer, or already shifted (in either form): nothing to do
        return _ir.layer_value_name(layer, "selected") in values and not _shifted(match)

    def build_layer(self, b: Builder, match: FusedLayerMatch, values: dict[str, ir.Value], shared: None) -> None:
        selected, *masses = require(values, match.layer, _NEEDS, "FusedClassMassesPass and HeadSelectionPass")
        row_scale = build_row_scale(b, self.settings.p, ClassMasses(*masses), selected)  # (B, H, S, 4)
        log_m = b.op("Log", [row_scale], "log_row_scale")  # (B, H, S, 4), 0 where not selected
        self.shift(b, match, log_m, values)

    def shift(self, b: Builder, match: FusedLayerMatch, log_m: ir.Value, values: dict[str, ir.Value]) -> None:
        raise NotImplementedError


def _shifted(match: FusedLayerMatch) -> bool:
    """The layer's Attention already reads a VAR query (qk form) or a VAR mask (mask form)."""
    inputs = match.attention.inputs
    for value in (inputs[0], inputs[3] if len(inputs) > 3 else None):
        producer = None if value is None else value.producer()
        if producer is not None and _ir.is_var_node(producer):
            return True
    return False


def _columns(b: Builder, x: ir.Value, start: int, end: int, name: str) -> ir.Value:
    """``x[..., start:end]`` of a 4-D tensor."""
    bounds = [b.const(f"{name}_{w}", [v], np.int64) for w, v in (("start", start), ("end", end), ("axis", 3))]
    return b.op("Slice", [x, *bounds], name)


class QKShiftPass(_ScoreShiftPass):
    """The shift as four extra Q/K columns (V zero-padded to match), output sliced back."""

    def shift(self, b: Builder, match: FusedLayerMatch, log_m: ir.Value, values: dict[str, ir.Value]) -> None:
        att, hd = match.attention, match.head_dim
        q, k, v = att.inputs[0], att.inputs[1], att.inputs[2]
        assert q is not None and k is not None and v is not None and hd is not None
        (class_values,) = require(values, match.layer, ["class_values"], "FusedClassMassesPass")
        dtype = _ir.resolve_dtype(q)  # fp32, or fp16: the extra columns in the graph's dtype
        shift_q = b.op("Mul", [log_m, b.const("inv_scale", np.float32(1.0 / match.scale))], "log_m_over_scale")
        shift_q = _ir.cast(b, shift_q, dtype, "log_m_over_scale_cast")
        q_aug = b.op("Concat", [q, shift_q], "query_var", {"axis": -1})  # (B, H, S, hd + 4)
        key_cols = _columns(b, class_values, 0, 4, "key_class_cols")  # (B, Hk, T, 4)
        key_cols = _ir.cast(b, key_cols, dtype, "key_class_cols_cast")
        k_aug = b.op("Concat", [k, key_cols], "key_var", {"axis": -1})  # (B, Hk, T, hd + 4)
        pads = b.const("value_pads", [0, 0, 0, 0, 0, 0, 0, 4], np.int64)
        v_aug = b.op("Pad", [v, pads], "value_var")  # (B, Hk, T, hd + 4), zeros appended
        for x in (q_aug, k_aug, v_aug):
            x.dtype = dtype
        out = att.outputs[0]
        uses = list(out.uses())
        for i, x in enumerate((q_aug, k_aug, v_aug)):
            att.replace_input_with(i, x)
        att.attributes["scale"] = ir.AttrFloat32("scale", match.scale)
        sliced = _columns(b, out, 0, hd, "attention_var")  # (B, H, S, hd)
        sliced.dtype, sliced.shape = out.dtype, out.shape
        out.shape = None
        for use in uses:
            use.node.replace_input_with(use.idx, sliced)


class MaskShiftPass(_ScoreShiftPass):
    """The shift added to the Attention's mask, a (B, H, S, T) float tensor."""

    def shift(self, b: Builder, match: FusedLayerMatch, log_m: ir.Value, values: dict[str, ir.Value]) -> None:
        att = match.attention
        (keys,) = require(values, match.layer, ["key_classes"], "FusedClassMassesPass")
        keys_t = b.op("Transpose", [_columns(b, keys, 0, 4, "key_classes_4")], "key_classes_t", {"perm": [0, 1, 3, 2]})
        dtype = _ir.resolve_dtype(att.inputs[0])  # the mask is in the graph's dtype (fp32 or fp16)
        shift = b.op("MatMul", [log_m, keys_t], "score_shift")  # (B, H, S, T)
        shift = _ir.cast(b, shift, dtype, "score_shift_cast")
        mask = att.inputs[3] if len(att.inputs) > 3 else None
        if mask is None:
            new_mask = shift
        elif _ir.resolve_dtype(mask) == ir.DataType.BOOL:
            lowest = b.const(f"lowest_{dtype.name.lower()}", np.finfo(dtype.numpy()).min, dtype.numpy())
            new_mask = b.op("Where", [mask, shift, lowest], "mask_var")
        else:
            new_mask = b.op("Add", [_ir.cast(b, mask, dtype, "mask_cast"), shift], "mask_var")
        new_mask.dtype = dtype
        if len(att.inputs) <= 3:
            att.resize_inputs(4)
        att.replace_input_with(3, new_mask)
