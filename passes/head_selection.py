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

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import VarAnalysis, analysis_for
from var_export.passes.builders import (
    build_eligibility,
    build_selection,
    calibrated_heads,
    changed_layers,
    head_mask,
    heads_by_layer,
    require,
    split_masses,
)
from var_export.passes.locate import static_dim

__all__ = ["HeadSelectionPass", "heads_by_layer"]


class HeadSelectionPass(ir.passes.InPlacePass):
    """Insert the per-row selection ``var/L{l}/selected`` for the changed VAR layers."""

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
        self.mode = settings.heads
        self.heads = calibrated_heads(self.mode, heads)
        self.num_layers = num_layers
        self.analysis = analysis

    def requires(self, model: ir.Model) -> None:
        for name in (_ir.VISUAL_MASK, _ir.PAST_SINK_MASK):
            if _ir.graph_input(model.graph, name) is None:
                raise GraphPatternError(
                    f"graph input {name!r} not found: run SinkDetectionPass before HeadSelectionPass."
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        analysis = analysis_for(model, self.analysis)
        values = _ir.value_map(graph)
        todo = [
            layer
            for layer in changed_layers(self.settings, self.heads, analysis.num_layers(self.num_layers))
            if _ir.layer_value_name(layer, "selected") not in values
        ]
        if not todo:
            return ir.passes.PassResult(model, modified=False)
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        past_sink = _ir.graph_input(graph, _ir.PAST_SINK_MASK)
        assert visual is not None and past_sink is not None
        eligibility = build_eligibility(Builder(graph, "var"), visual, past_sink)
        for layer in todo:
            masses, code = require(values, layer, ["class_masses", "key_class_code"], "ClassMassesPass (FusedClassMassesPass on Attention graphs)")
            b = Builder(graph, f"var/L{layer}")
            columns = split_masses(b, masses, static_dim(masses, 3) or 4)  # (B, H, S, 1) each
            mask = None if self.mode == "dynamic" else self._head_mask(layer, analysis.matches[layer])
            build_selection(b, self.settings, eligibility, code, columns, mask)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _head_mask(self, layer: int, match: object) -> np.ndarray:
        """(1, H, 1, 1) bool constant of the calibrated heads of ``layer``."""
        searched = getattr(match, "num_heads_source", "") or "no static dim 1 on the query, no q_num_heads attribute"
        return head_mask(layer, self.heads.get(layer, []), getattr(match, "num_heads", None), why_unknown=searched)
