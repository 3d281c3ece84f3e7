"""Head selection: which (B, H, S) attention rows of a VAR layer get redistributed.

Per VAR layer ``l`` (DESIGN.md §1), with ``a`` the (B, H, S, T) probabilities and the
sink flags ``var/L{l}/sink`` (B, T) of the sink-detection pass:

    eligible  (B, 1, S, 1)  query not visual and a visual key at or before it
                            (query s sits at T-position P + s: CumSum over the visual
                            mask, then Slice of the last S positions)
    masses    (B, H, S, 4)  a @ [visual, visual sink, text sink, visual non-sink]
                            indicators (B, 1, T, 4)
    selected  (B, H, S, 1)  eligible AND the sample has a visual sink AND
                            visual_nonsink_mass > 0 AND
                            dynamic: visual_sink_mass / (image_mass + 1e-6 |V|) <= rho
                                     AND image_mass >= summ
                            static:  head in the calibrated (layer, head) list
                            hybrid:  both

Outputs per layer ``var/L{l}/selected`` and the masses ``var/L{l}/image_mass``,
``var/L{l}/visual_sink_mass``, ``var/L{l}/text_sink_mass``, ``var/L{l}/visual_nonsink_mass``
(B, H, S, 1) fp32.
In static/hybrid mode a layer without any listed head gets nothing (it stays untouched).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.builders import (
    build_eligibility,
    build_key_classes,
    build_selection,
    calibrated_heads,
    head_mask,
    heads_by_layer,
    split_columns,
    stack_columns,
)
from var_export.passes.locate import LayerMatch, locate_layers

__all__ = ["HeadSelectionPass", "heads_by_layer"]


class HeadSelectionPass(ir.passes.InPlacePass):
    """Insert the per-row selection ``var/L{l}/selected`` for the VAR layers."""

    def __init__(
        self,
        settings: VarSettings,
        heads: Iterable[tuple[int, int]] | None = None,
        *,
        num_layers: int | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.mode = settings.heads
        self.heads = calibrated_heads(self.mode, heads)
        self.num_layers = num_layers

    def requires(self, model: ir.Model) -> None:
        if _ir.graph_input(model.graph, _ir.VISUAL_MASK) is None:
            raise GraphPatternError(
                f"graph input {_ir.VISUAL_MASK!r} not found: run SinkDetectionPass before "
                "HeadSelectionPass."
            )

    def layers_to_change(self, matches: dict[int, LayerMatch]) -> list[int]:
        """VAR layers that get selection/redistribution nodes in this mode."""
        num_layers = self.num_layers or max(matches) + 1
        layers = self.settings.var_layers(num_layers)
        if self.mode == "dynamic":
            return layers
        return [layer for layer in layers if self.heads.get(layer)]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        matches = {m.layer: m for m in locate_layers(model).matches}
        values = _ir.value_map(graph)
        todo = [
            layer
            for layer in self.layers_to_change(matches)
            if _ir.layer_value_name(layer, "selected") not in values
        ]
        if not todo:
            return ir.passes.PassResult(model, modified=False)
        for layer in todo:
            if _ir.layer_value_name(layer, "sink") not in values:
                raise GraphPatternError(
                    f"layer {layer}: sink flags {_ir.layer_value_name(layer, 'sink')!r} not found; "
                    "run SinkDetectionPass (with the same settings) first."
                )
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        past_sink = _ir.graph_input(graph, _ir.PAST_SINK_MASK)
        assert visual is not None
        if past_sink is None:
            raise GraphPatternError(f"graph input {_ir.PAST_SINK_MASK!r} not found; run SinkDetectionPass first.")
        eligibility = build_eligibility(Builder(graph, "var"), visual, past_sink)
        for layer in todo:
            match = matches[layer]
            b = Builder(graph, f"var/L{layer}")
            sink = values[_ir.layer_value_name(layer, "sink")]  # (B, T) bool
            keys = build_key_classes(b, sink, eligibility)
            classes = stack_columns(
                b,
                [
                    (eligibility.visual_f, "visual"),
                    (keys.visual_sink_f, "visual_sink"),
                    (keys.text_sink_f, "text_sink"),
                    (keys.visual_nonsink_f, "visual_nonsink"),
                ],
                "class_indicators_bt4",
            )  # (B, T, 4)
            classes = _ir.unsqueeze(b, classes, [1], "class_indicators")  # (B, 1, T, 4)
            probs = _ir.cast(b, match.probs, ir.DataType.FLOAT, "probs_f32")  # (B, H, S, T)
            # The non-sink visual mass is its own column, not image - visual_sink: no cancellation
            # when nearly all visual attention sits on the sinks.
            masses = b.op("MatMul", [probs, classes], "class_masses")  # (B, H, S, 4)
            image_mass, visual_sink_mass, _, nonsink_mass = split_columns(
                b, masses, ("image_mass", "visual_sink_mass", "text_sink_mass", "visual_nonsink_mass")
            )  # (B, H, S, 1) each
            mask = None
            if self.mode != "dynamic":
                mask = head_mask(
                    layer,
                    self.heads.get(layer, []),
                    match.num_heads,
                    why_unknown=f"no static dim 1 on {match.probs.name!r}, no Q Reshape constant, "
                    "no Q projection width / past key head size",
                )
            build_selection(
                b,
                self.settings,
                eligibility,
                keys,
                image_mass=image_mass,
                visual_sink_mass=visual_sink_mass,
                visual_nonsink_mass=nonsink_mass,
                head_mask=mask,
            )
        graph.sort()
        return ir.passes.PassResult(model, modified=True)
