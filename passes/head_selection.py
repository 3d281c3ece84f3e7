"""Head selection: which (B, H, S) attention rows of a VAR layer get redistributed.

Per changed layer ``l`` (DESIGN.md §1), from the class-mass pass's ``var/L{l}/class_masses``
(B, H, S, W) and ``var/L{l}/key_class_code`` (B, 1, T, 1), for either formulation:

    eligible  (B, 1, S, 1)  query not visual and a visual key at or before it
                            (query s sits at T-position P + s: CumSum over the visual
                            mask, then Slice of the last S positions)        per graph
    selected  (B, H, S, 1)  eligible AND the sample has a visual sink (max code == 3) AND
                            visual_nonsink_mass > 0 AND
                            dynamic: visual_sink_mass / (image_mass + 1e-6 |V|) <= rho
                                     AND image_mass >= summ
                                     (image_mass = visual_sink_mass + visual_nonsink_mass)
                            static:  head in the calibrated (layer, head) list
                            hybrid:  both

Outputs per layer ``var/L{l}/selected`` and the mass columns ``var/L{l}/visual_sink_mass``,
``var/L{l}/text_sink_mass``, ``var/L{l}/visual_nonsink_mass`` (B, H, S, 1) fp32 that
redistribution and the score shift read. In static/hybrid mode a layer without any listed
head gets nothing (it stays untouched).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import CalibratedLayerPass, VarAnalysis
from var_export.passes.builders import (
    Eligibility,
    build_eligibility,
    build_selection,
    head_mask,
    heads_by_layer,
    require,
    split_masses,
)
from var_export.passes.locate import LayerMatch, static_dim
from var_export.passes.locate_fused import FusedLayerMatch

__all__ = ["HeadSelectionPass", "heads_by_layer"]


class HeadSelectionPass(CalibratedLayerPass):
    """Insert the per-row selection ``var/L{l}/selected`` for the changed VAR layers."""

    def requires(self, model: ir.Model) -> None:
        for name in (_ir.VISUAL_MASK, _ir.PAST_SINK_MASK):
            if _ir.graph_input(model.graph, name) is None:
                raise GraphPatternError(
                    f"graph input {name!r} not found: run SinkDetectionPass before HeadSelectionPass."
                )

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        return _ir.layer_value_name(layer, "selected") not in values

    def prepare(self, graph: ir.Graph) -> Eligibility:
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        past_sink = _ir.graph_input(graph, _ir.PAST_SINK_MASK)
        assert visual is not None and past_sink is not None
        return build_eligibility(Builder(graph, "var"), visual, past_sink)

    def build_layer(
        self, b: Builder, match: LayerMatch | FusedLayerMatch, values: dict[str, ir.Value], eligibility: Eligibility
    ) -> None:
        layer = match.layer
        masses, code = require(values, layer, ["class_masses", "key_class_code"], "ClassMassesPass (FusedClassMassesPass on Attention graphs)")
        columns = split_masses(b, masses, static_dim(masses, 3) or 4)  # (B, H, S, 1) each
        mask = None if self.settings.heads == "dynamic" else self._head_mask(layer, match)
        build_selection(b, self.settings, eligibility, code, columns, mask)

    def _head_mask(self, layer: int, match: object) -> np.ndarray:
        """(1, H, 1, 1) bool constant of the calibrated heads of ``layer``."""
        searched = getattr(match, "num_heads_source", "") or "no static dim 1 on the query, no q_num_heads attribute"
        return head_mask(layer, self.heads.get(layer, []), getattr(match, "num_heads", None), why_unknown=searched)
