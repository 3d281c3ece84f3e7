"""Sink detection: per VAR layer, flag the tokens whose residual stream is a sink.

Adds the graph input ``visual_token_mask`` [B, T] bool, the cache input
``past_sink_mask`` [B, Lv, P] bool and the output ``present_sink_mask`` [B, Lv, T]
bool (Lv = number of VAR layers, in layer order; DESIGN.md §3). Per VAR layer ``l``
(DESIGN.md §1), on the residual stream ``x`` (B, S, D) entering the layer, in fp32:

    n    = x[..., D_sink] / sqrt(mean(x^2 over D) + 1e-6)     # (B, S, k)
    new  = max_k |n| > tau  AND  attention_mask[:, P:]        # (B, S) pads never sinks
    new  = new AND (P == 0)                                   # sink_scope == "prompt"
    sink = concat(past_sink_mask[:, j], new)                  # (B, T) -> var/L{l}/sink

``var/L{l}/sink`` is what head selection and redistribution read.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes import _ir
from passes._ir import Builder
from passes.locate import locate_layers
from var_export.errors import GraphPatternError
from var_export.settings import RMS_EPS, VarSettings

__all__ = ["SinkDetectionPass"]


class SinkDetectionPass(ir.passes.InPlacePass):
    """Insert the per-layer sink flags and the sink-mask cache input/output."""

    def __init__(self, settings: VarSettings, *, num_layers: int | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.num_layers = num_layers

    def requires(self, model: ir.Model) -> None:
        if _ir.graph_input(model.graph, _ir.ATTENTION_MASK) is None:
            raise GraphPatternError(
                f"graph input {_ir.ATTENTION_MASK!r} not found (inputs: "
                f"{[v.name for v in model.graph.inputs]}); sink detection needs it to keep "
                "padding tokens from being sinks. Export the decoder with an attention_mask input."
            )

    def ensures(self, model: ir.Model) -> None:
        assert _ir.graph_output(model.graph, _ir.PRESENT_SINK_MASK) is not None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if _ir.graph_output(graph, _ir.PRESENT_SINK_MASK) is not None:
            return ir.passes.PassResult(model, modified=False)  # already there
        matches = {m.layer: m for m in locate_layers(model).matches}
        num_layers = self.num_layers or max(matches) + 1
        var_layers = self.settings.var_layers(num_layers)
        missing = [layer for layer in var_layers if layer not in matches]
        if missing:
            raise GraphPatternError(
                f"VAR layers {missing} have no located attention (found layers "
                f"{sorted(matches)}); check --layers against the graph."
            )
        attention_mask = _ir.graph_input(graph, _ir.ATTENTION_MASK)
        assert attention_mask is not None
        batch, total = _dims(attention_mask, ("batch", "total_sequence_length"))
        past = _past_dim(graph)

        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        if visual is None:
            visual = ir.Value(
                name=_ir.VISUAL_MASK, shape=ir.Shape([batch, total]), type=ir.TensorType(ir.DataType.BOOL)
            )
            graph.inputs.append(visual)
        past_sink = ir.Value(
            name=_ir.PAST_SINK_MASK,
            shape=ir.Shape([batch, len(var_layers), past]),
            type=ir.TensorType(ir.DataType.BOOL),
        )
        graph.inputs.append(past_sink)

        b = Builder(graph, "var")
        # P = past length, from the sink cache itself.   # (1,)
        past_len = b.op("Shape", [past_sink], "past_len", {"start": 2, "end": 3})
        big = b.const("int64_max", [_ir.INT64_MAX], np.int64)
        axis1 = b.const("axis1", [1], np.int64)
        mask_bool = _ir.cast(b, attention_mask, ir.DataType.BOOL, "attention_mask_bool")
        not_pad = b.op("Slice", [mask_bool, past_len, big, axis1], "current_not_pad")  # (B, S)
        is_prefill = b.op("Equal", [past_len, b.const("zero_i64", [0], np.int64)], "is_prefill")
        dims = b.const("sink_dims", list(self.settings.sink_dims), np.int64)
        eps = b.const("rms_eps", np.float32(RMS_EPS))
        tau = b.const("tau", np.float32(self.settings.tau))

        per_layer = []
        for j, layer in enumerate(var_layers):
            lb = Builder(graph, f"var/L{layer}")
            x = _ir.cast(lb, matches[layer].residual, ir.DataType.FLOAT, "residual_f32")  # (B, S, D)
            mean_sq = _ir.reduce(lb, "ReduceMean", lb.op("Mul", [x, x], "x_sq"), [-1], "mean_sq", keepdims=True)
            rms = lb.op("Sqrt", [lb.op("Add", [mean_sq, eps], "mean_sq_eps")], "rms")  # (B, S, 1)
            picked = lb.op("Gather", [x, dims], "sink_dim_values", {"axis": -1})  # (B, S, k)
            normed = lb.op("Abs", [lb.op("Div", [picked, rms], "sink_dim_normed")], "sink_dim_abs")
            peak = _ir.reduce(lb, "ReduceMax", normed, [-1], "sink_dim_peak", keepdims=False)  # (B, S)
            new = lb.op("Greater", [peak, tau], "new_sink_raw")
            new = lb.op("And", [new, not_pad], "new_sink_unpadded")
            if self.settings.sink_scope == "prompt":
                new = lb.op("And", [new, is_prefill], "new_sink_prompt")
            index = lb.const("cache_index", np.int64(j))
            past_flags = lb.op("Gather", [past_sink, index], "past_sink", {"axis": 1})  # (B, P)
            sink = lb.op("Concat", [past_flags, new], "sink", {"axis": 1})  # (B, T)
            sink.dtype = ir.DataType.BOOL
            sink.shape = ir.Shape([batch, total])
            per_layer.append(_ir.unsqueeze(lb, sink, [1], "sink_row"))  # (B, 1, T)

        present = b.op("Concat", per_layer, "present_sink_mask", {"axis": 1})  # (B, Lv, T)
        present.name = _ir.PRESENT_SINK_MASK
        present.dtype = ir.DataType.BOOL
        present.shape = ir.Shape([batch, len(var_layers), total])
        graph.outputs.append(present)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)


def _dims(value: ir.Value, default: tuple[str, str]) -> tuple[int | str, int | str]:
    out: list[int | str] = list(default)
    if value.shape is not None and len(value.shape) == 2:
        for i in range(2):
            d = value.shape[i]
            out[i] = d if isinstance(d, int) else (d.value or default[i])
    return out[0], out[1]


def _past_dim(graph: ir.Graph) -> int | str:
    from passes.locate import PAST_KEY_RE

    for v in graph.inputs:
        if v.name and PAST_KEY_RE.match(v.name) and v.shape is not None and len(v.shape) == 4:
            d = v.shape[2]
            return d if isinstance(d, int) else (d.value or "past_sequence_length")
    return "past_sequence_length"
