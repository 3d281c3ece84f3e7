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

import numpy as np
import onnx_ir as ir

from passes import _ir
from passes._ir import Builder
from passes.locate import LayerMatch, locate_layers
from var_export.errors import ConfigError, GraphPatternError
from var_export.settings import PORTION_EPS, VarSettings

__all__ = ["HeadSelectionPass", "heads_by_layer"]


def heads_by_layer(heads: Iterable[tuple[int, int]] | None) -> dict[int, list[int]]:
    out: dict[int, set[int]] = {}
    for layer, head in heads or ():
        out.setdefault(int(layer), set()).add(int(head))
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


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
        if self.mode in ("static", "hybrid") and heads is None:
            raise ConfigError(
                f"head mode {self.mode!r} needs the calibrated (layer, head) list, found none. "
                "Pass calibration.json (its 'heads') or use --heads dynamic."
            )
        self.heads = heads_by_layer(heads)
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
        b = Builder(graph, "var")
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        assert visual is not None
        eligible, visual_f, not_visual, num_visual = self._shared(b, visual, values)
        for layer in todo:
            self._layer(graph, matches[layer], values, visual, visual_f, not_visual, eligible, num_visual)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _shared(
        self, b: Builder, visual: ir.Value, values: dict[str, ir.Value]
    ) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
        past_sink = _ir.graph_input(b.graph, _ir.PAST_SINK_MASK)
        if past_sink is None:
            raise GraphPatternError(f"graph input {_ir.PAST_SINK_MASK!r} not found; run SinkDetectionPass first.")
        past_len = values.get("var/past_len") or b.op("Shape", [past_sink], "past_len", {"start": 2, "end": 3})
        big = b.const("sel_int64_max", [_ir.INT64_MAX], np.int64)
        axis1 = b.const("sel_axis1", [1], np.int64)
        visual_f = b.op("Cast", [visual], "visual_f32", {"to": ir.DataType.FLOAT})  # (B, T)
        not_visual = b.op("Not", [visual], "not_visual")  # (B, T)
        seen_visual = b.op("CumSum", [visual_f, b.const("cumsum_axis", np.int64(1))], "visual_cumsum")
        seen_q = b.op("Slice", [seen_visual, past_len, big, axis1], "visual_cumsum_queries")  # (B, S)
        not_visual_q = b.op("Slice", [not_visual, past_len, big, axis1], "query_not_visual")  # (B, S)
        after_image = b.op("Greater", [seen_q, b.const("half", np.float32(0.5))], "query_after_visual")
        eligible = b.op("And", [after_image, not_visual_q], "eligible_bs")
        eligible = _ir.unsqueeze(b, eligible, [1, 3], "eligible")  # (B, 1, S, 1)
        num_visual = _ir.reduce(b, "ReduceSum", visual_f, [1], "num_visual_bt", keepdims=True)  # (B, 1)
        num_visual = _ir.unsqueeze(b, num_visual, [2, 3], "num_visual")  # (B, 1, 1, 1)
        return eligible, visual_f, not_visual, num_visual

    def _layer(
        self,
        graph: ir.Graph,
        match: LayerMatch,
        values: dict[str, ir.Value],
        visual: ir.Value,
        visual_f: ir.Value,
        not_visual: ir.Value,
        eligible: ir.Value,
        num_visual: ir.Value,
    ) -> None:
        layer = match.layer
        b = Builder(graph, f"var/L{layer}")
        sink = values[_ir.layer_value_name(layer, "sink")]  # (B, T) bool
        visual_sink = b.op("And", [sink, visual], "visual_sink")  # (B, T)
        text_sink = b.op("And", [sink, not_visual], "text_sink")  # (B, T)
        visual_sink_f = b.op("Cast", [visual_sink], "visual_sink_f32", {"to": ir.DataType.FLOAT})
        text_sink_f = b.op("Cast", [text_sink], "text_sink_f32", {"to": ir.DataType.FLOAT})
        visual_nonsink = b.op("And", [visual, b.op("Not", [sink], "not_sink")], "visual_nonsink")
        visual_nonsink_f = b.op("Cast", [visual_nonsink], "visual_nonsink_f32", {"to": ir.DataType.FLOAT})
        indicators = (
            (visual_f, "visual"),
            (visual_sink_f, "visual_sink"),
            (text_sink_f, "text_sink"),
            (visual_nonsink_f, "visual_nonsink"),
        )
        columns = [_ir.unsqueeze(b, c, [-1], f"{n}_col") for c, n in indicators]  # (B, T, 1)
        classes = b.op("Concat", columns, "class_indicators_bt4", {"axis": -1})  # (B, T, 4)
        classes = _ir.unsqueeze(b, classes, [1], "class_indicators")  # (B, 1, T, 4)
        probs = _ir.cast(b, match.probs, ir.DataType.FLOAT, "probs_f32")  # (B, H, S, T)
        # The non-sink visual mass is its own column, not image - visual_sink: no cancellation
        # when nearly all visual attention sits on the sinks.
        masses = b.op("MatMul", [probs, classes], "class_masses")  # (B, H, S, 4)
        axis3 = b.const("axis3", [3], np.int64)

        def column(i: int, name: str) -> ir.Value:
            start = b.const(f"{name}_start", [i], np.int64)
            end = b.const(f"{name}_end", [i + 1], np.int64)
            return b.op("Slice", [masses, start, end, axis3], name)  # (B, H, S, 1)

        image_mass = column(0, "image_mass")
        visual_sink_mass = column(1, "visual_sink_mass")
        column(2, "text_sink_mass")
        nonsink_mass = column(3, "visual_nonsink_mass")
        zero = b.const("zero_f32", np.float32(0.0))
        can_move = b.op("Greater", [nonsink_mass, zero], "has_visual_nonsink")  # (B, H, S, 1)
        any_visual_sink = _ir.reduce(b, "ReduceMax", visual_sink_f, [1], "any_visual_sink_b1", keepdims=True)
        any_visual_sink = _ir.unsqueeze(b, any_visual_sink, [2, 3], "any_visual_sink_f")  # (B, 1, 1, 1)
        has_visual_sink = b.op("Greater", [any_visual_sink, b.const("half", np.float32(0.5))], "has_visual_sink")
        selected = b.op("And", [eligible, has_visual_sink], "eligible_with_sink")  # (B, 1, S, 1)
        selected = b.op("And", [selected, can_move], "eligible_movable")  # (B, H, S, 1)
        if self.mode in ("dynamic", "hybrid"):
            eps_v = b.op("Mul", [num_visual, b.const("portion_eps", np.float32(PORTION_EPS))], "portion_eps_v")
            denom = b.op("Add", [image_mass, eps_v], "portion_denominator")
            portion = b.op("Div", [visual_sink_mass, denom], "portion")
            low_portion = b.op("LessOrEqual", [portion, b.const("rho", np.float32(self.settings.rho))], "portion_le_rho")
            enough = b.op("GreaterOrEqual", [image_mass, b.const("summ", np.float32(self.settings.summ))], "image_mass_ge_summ")
            image_centric = b.op("And", [low_portion, enough], "image_centric")
            selected = b.op("And", [selected, image_centric], "selected_dynamic")
        if self.mode in ("static", "hybrid"):
            num_heads = match.num_heads
            wanted = self.heads.get(layer, [])
            if num_heads is None:
                raise GraphPatternError(
                    f"layer {layer}: the number of query heads cannot be read from the graph "
                    f"(no static dim 1 on {match.probs.name!r}, no Q Reshape constant); a "
                    "static/hybrid head mask needs it. Run shape inference or use --heads dynamic."
                )
            bad = [h for h in wanted if not 0 <= h < num_heads]
            if bad:
                raise ConfigError(
                    f"layer {layer}: heads {bad} are out of range for {num_heads} query heads "
                    "(expected 0..H-1). The calibration belongs to another model?"
                )
            mask = np.zeros((1, num_heads, 1, 1), dtype=np.bool_)
            mask[0, wanted] = True
            selected = b.op("And", [selected, b.const("head_mask", mask)], "selected_heads")
        out = b.op("Identity", [selected], "selected")
        out.dtype = ir.DataType.BOOL
