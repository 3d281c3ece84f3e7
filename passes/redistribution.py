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

from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import VarAnalysis, analysis_for
from var_export.passes.builders import ClassMasses, build_row_scale, require

__all__ = ["RedistributionPass"]

_MASSES = ("visual_sink_mass", "text_sink_mass", "visual_nonsink_mass")


class RedistributionPass(ir.passes.InPlacePass):
    """Replace the probs-V MatMul input by the redistributed probabilities."""

    def __init__(
        self, settings: VarSettings, *, num_layers: int | None = None, analysis: VarAnalysis | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.num_layers = num_layers
        self.analysis = analysis

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        analysis = analysis_for(model, self.analysis)
        values = _ir.value_map(graph)
        modified = False
        for layer in self.settings.var_layers(analysis.num_layers(self.num_layers)):
            if _ir.layer_value_name(layer, "selected") not in values:
                continue  # not selected in this layer (or no head listed): left untouched
            match = analysis.matches[layer]
            producer = match.pv_matmul.inputs[0].producer() if match.pv_matmul.inputs[0] else None
            if producer is not None and _ir.is_var_node(producer):
                continue  # already redistributed
            selected, keys, *masses = require(
                values, layer, ["selected", "key_classes", *_MASSES], "ClassMassesPass and HeadSelectionPass"
            )
            b = Builder(graph, f"var/L{layer}")
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
            modified = True
        if modified:
            graph.sort()
        return ir.passes.PassResult(model, modified=modified)


