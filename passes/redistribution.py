"""Redistribution: rewrite the probabilities that feed ``probs @ V`` on selected rows.

On a row selected by head selection (``var/L{l}/selected``), VAR multiplies the key classes
by row constants (DESIGN.md §1), per column of ``var/L{l}/key_classes``:

    row_scale = [p, p, m_vis, 1]           visual sink, text sink, visual non-sink, rest
    m_vis     = 1 + (1 - p) (visual_sink_mass + text_sink_mass) / visual_nonsink_mass
    row_scale = 1 on rows that are not selected                          (B, H, S, 4)

    weights   = row_scale @ key_classes^T                               (B, H, S, T)
    a'        = probs * weights                                         (B, H, S, T)

Two passes over (B, H, S, T) (the MatMul that writes the weights and the Mul); rows that are
not selected are multiplied by exactly 1. Masses, selection and ``row_scale`` are fp32; on
fp16 graphs the (B, H, S, 4) ``row_scale`` and the key classes are cast to fp16 so that the
weights and the product stay in the probabilities' dtype (no fp32 (B, H, S, T) round trip).
"""

from __future__ import annotations

import onnx_ir as ir

from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import VarAnalysis, VarLayerPass
from var_export.passes.builders import ClassMasses, build_row_scale, require
from var_export.passes.locate import LayerMatch

__all__ = ["RedistributionPass"]

_MASSES = ("visual_sink_mass", "text_sink_mass", "visual_nonsink_mass")


class RedistributionPass(VarLayerPass):
    """Replace the probs-V MatMul input by the redistributed probabilities."""

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        if _ir.layer_value_name(layer, "selected") not in values:
            return False  # not selected in this layer (or no head listed): left untouched
        pv_input = analysis.matches[layer].pv_matmul.inputs[0]
        producer = pv_input.producer() if pv_input else None
        return producer is None or not _ir.is_var_node(producer)  # else already redistributed

    def build_layer(self, b: Builder, match: LayerMatch, values: dict[str, ir.Value], shared: None) -> None:
        selected, keys, *masses = require(
            values, match.layer, ["selected", "key_classes", *_MASSES], "ClassMassesPass and HeadSelectionPass"
        )
        row_scale = build_row_scale(b, self.settings.p, ClassMasses(*masses), selected)  # (B, H, S, 4)
        dtype = match.probs_dtype  # the weights are applied in the probabilities' own dtype
        row_scale = _ir.cast(b, row_scale, dtype, "row_scale_cast")
        keys = _ir.cast(b, keys, dtype, "key_classes_cast")
        keys_t = b.op("Transpose", [keys], "key_classes_t", {"perm": [0, 1, 3, 2]})  # (B, 1, 4, T)
        weights = b.op("MatMul", [row_scale, keys_t], "key_weights")  # (B, H, S, T)
        new_probs = b.op("Mul", [match.probs, weights], "probs_var")  # (B, H, S, T)
        new_probs.dtype = dtype
        new_probs.shape = match.probs.shape
        match.pv_matmul.replace_input_with(0, new_probs)


