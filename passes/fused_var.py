"""VAR on graphs with the fused ONNX ``Attention`` op (opset 23), keeping attention fused.

On a selected row VAR multiplies three key classes by three row constants m
(DESIGN.md §1), so ``a' = softmax(scores + log m)``. Per VAR layer, around its
``Attention(Q, K, V, mask)`` node (Q (B, H, S, hd), K/V (B, H, T, hd) after RoPE and
the GQA repeat; the ``present.*`` KV outputs are produced before it and never touched):

pass 1  class masses: a second ``Attention`` with the same Q, K, mask, scale and a
        3-wide value, the key-class indicators [visual, visual sink, text sink]:

            masses = Attention(Q, K, classes, mask)                 # (B, H, S, 3)

        -> image_mass, visual_sink_mass, text_sink_mass -> the row test (dynamic /
        static / hybrid, as ``passes/head_selection.py``) -> ``selected`` (B, H, S, 1)
        -> the two log row constants, 0 on rows that are not selected:

            log_m_sink = selected ? log p : 0
            log_m_vns  = selected ? log(1 + (1-p)(vsm + tsm) / (image - vsm)) : 0

pass 2  the layer's own Attention, its scores shifted by
        ``log_m_sink * [k sink] + log_m_vns * [k visual non-sink]``, in one of two forms:

        ``qk``   Q' = [Q, log_m_sink / scale, log_m_vns / scale]    (B, H, S, hd + 2)
                 K' = [K, sink_k, visual_nonsink_k]                  (B, H, T, hd + 2)
                 and the ``scale`` attribute made explicit (its default would become
                 1/sqrt(hd + 2)). FLOP-neutral; costs one copy of K per layer.
        ``mask`` the shift added to the mask: a float (B, H, S, T) mask
                 ``Where(mask, shift, lowest)`` (a bool mask) or ``mask + shift``.

Rows that are not selected get exactly 0 added, so the change is exact there too.
Sink flags and eligibility follow ``passes/sink_detection.py`` and
``passes/head_selection.py`` (same inputs, outputs and ``var/`` names).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from passes import _ir
from passes._ir import Builder
from passes.finalize import FinalizePass, check_not_applied
from passes.head_selection import heads_by_layer
from passes.locate import PAST_KEY_RE, _find_residual, _nearest_input
from passes.sink_detection import _dims, _past_dim
from var_export.errors import ConfigError, GraphPatternError, VarExportError
from var_export.settings import PORTION_EPS, RMS_EPS, VarSettings

__all__ = ["FusedLayerMatch", "FusedVarPass", "apply_fused_var", "locate_fused_layers"]

logger = logging.getLogger(__name__)

Shift = Literal["qk", "mask"]
SHIFTS: tuple[str, ...] = ("qk", "mask")


@dataclasses.dataclass
class FusedLayerMatch:
    """One decoder layer's fused attention."""

    layer: int  # decoder layer index (from the past_key_values.{i}.key that reaches K)
    attention: ir.Node  # the ONNX Attention node
    residual: ir.Value  # (B, S, D) residual stream entering the layer
    num_heads: int | None  # query heads
    head_dim: int | None  # Q/K head size
    scale: float  # effective softmax scale

    def describe(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "attention": self.attention.name,
            "residual": self.residual.name,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "scale": self.scale,
        }


def _static(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or len(value.shape) <= axis:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def locate_fused_layers(model: ir.Model) -> list[FusedLayerMatch]:
    """Every ONNX ``Attention`` node with 4-D Q/K/V and no in-op KV cache, by layer."""
    found: dict[int, FusedLayerMatch] = {}
    for node in model.graph:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
            continue
        where = f"Attention node {node.name!r}"
        q, k = node.inputs[0], node.inputs[1]
        if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
            raise GraphPatternError(
                f"{where} takes past_key/past_value inputs (the KV cache inside the op); expected "
                "the cache concatenated before it, as torch.onnx exports SDPA. Re-export with "
                "var_export.export_fused."
            )
        if q is None or q.shape is None or len(q.shape) != 4:
            raise GraphPatternError(
                f"{where}: expected a 4-D query (B, H, S, hd), found shape {q.shape if q else None}. "
                "3-D (B, S, H*hd) Attention inputs are not supported; export with var_export.export_fused."
            )
        if float(node.attributes.get_float("softcap", 0.0)) != 0.0:
            raise GraphPatternError(f"{where} has softcap; the additive score shift of VAR is not exact under it.")
        hit = _nearest_input(k, PAST_KEY_RE)
        if hit is None:
            raise GraphPatternError(
                f"{where}: its K reaches no graph input past_key_values.{{i}}.key (the layer index "
                "is read from it). Export the decoder with a KV cache."
            )
        layer = hit[0]
        residual = _find_residual(node)
        if isinstance(residual, str):
            raise GraphPatternError(f"layer {layer}: residual stream not found: {residual}")
        head_dim = _static(q, 3)
        num_heads = _static(q, 1) or node.attributes.get_int("q_num_heads", 0) or None
        scale = node.attributes.get_float("scale", 0.0)
        if not scale:
            if head_dim is None:
                raise GraphPatternError(
                    f"{where}: no scale attribute and no static head size; cannot make the scale explicit."
                )
            scale = 1.0 / math.sqrt(head_dim)
        if layer in found:
            raise GraphPatternError(
                f"two Attention nodes ({found[layer].attention.name!r}, {node.name!r}) read keys "
                f"from layer {layer}; expected one attention per layer."
            )
        found[layer] = FusedLayerMatch(layer, node, residual[1], num_heads, head_dim, float(scale))
    if not found:
        raise GraphPatternError(
            f"no ONNX Attention node found in graph {model.graph.name!r}; expected a decoder "
            "exported with SDPA at opset 23 (var_export.export_fused). For MatMul->Softmax->MatMul "
            "graphs use passes.pipeline.apply_var."
        )
    return [found[i] for i in sorted(found)]


class FusedVarPass(ir.passes.InPlacePass):
    """Sink detection, class masses (pass 1), row test and score shift (pass 2) on Attention ops."""

    def __init__(
        self,
        settings: VarSettings,
        heads: Iterable[tuple[int, int]] | None = None,
        *,
        num_layers: int | None = None,
        shift: Shift = "qk",
    ) -> None:
        super().__init__()
        if shift not in SHIFTS:
            raise ConfigError(f"shift must be one of {SHIFTS}, found {shift!r}.")
        if settings.heads in ("static", "hybrid") and heads is None:
            raise ConfigError(
                f"head mode {settings.heads!r} needs the calibrated (layer, head) list, found none. "
                "Pass calibration.json (its 'heads') or use --heads dynamic."
            )
        self.settings = settings
        self.heads = heads_by_layer(heads) if settings.heads != "dynamic" else {}
        self.num_layers = num_layers
        self.shift = shift

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if _ir.graph_output(graph, _ir.PRESENT_SINK_MASK) is not None:
            return ir.passes.PassResult(model, modified=False)  # already applied
        attention_mask = _ir.graph_input(graph, _ir.ATTENTION_MASK)
        if attention_mask is None:
            raise GraphPatternError(
                f"graph input {_ir.ATTENTION_MASK!r} not found; sink detection needs it."
            )
        matches = {m.layer: m for m in locate_fused_layers(model)}
        num_layers = self.num_layers or max(matches) + 1
        var_layers = self.settings.var_layers(num_layers)
        missing = [layer for layer in var_layers if layer not in matches]
        if missing:
            raise GraphPatternError(
                f"VAR layers {missing} have no Attention node (found layers {sorted(matches)})."
            )
        batch, total = _dims(attention_mask, ("batch", "total_sequence_length"))
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        if visual is None:
            visual = ir.Value(
                name=_ir.VISUAL_MASK, shape=ir.Shape([batch, total]), type=ir.TensorType(ir.DataType.BOOL)
            )
            graph.inputs.append(visual)
        past_sink = ir.Value(
            name=_ir.PAST_SINK_MASK,
            shape=ir.Shape([batch, len(var_layers), _past_dim(graph)]),
            type=ir.TensorType(ir.DataType.BOOL),
        )
        graph.inputs.append(past_sink)
        shared = _Shared.build(Builder(graph, "var"), self.settings, attention_mask, visual, past_sink)

        rows = []
        for j, layer in enumerate(var_layers):
            b = Builder(graph, f"var/L{layer}")
            sink = _sink_flags(b, shared, matches[layer].residual, j, batch, total)  # (B, T)
            rows.append(_ir.unsqueeze(b, sink, [1], "sink_row"))  # (B, 1, T)
            if self.settings.heads != "dynamic" and not self.heads.get(layer):
                continue  # no calibrated head here: the layer keeps its attention untouched
            self._layer(b, shared, matches[layer], sink)

        present = Builder(graph, "var").op("Concat", rows, "present_sink_mask", {"axis": 1})
        present.name = _ir.PRESENT_SINK_MASK
        present.dtype = ir.DataType.BOOL
        present.shape = ir.Shape([batch, len(var_layers), total])
        graph.outputs.append(present)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _layer(self, b: Builder, sh: _Shared, match: FusedLayerMatch, sink: ir.Value) -> None:
        att = match.attention
        q, k, v = att.inputs[0], att.inputs[1], att.inputs[2]
        mask = att.inputs[3] if len(att.inputs) > 3 else None
        assert q is not None and k is not None and v is not None
        attrs = {name: attr.value for name, attr in att.attributes.items()}
        attrs["scale"] = match.scale
        attrs.pop("qk_matmul_output_mode", None)
        settings = self.settings
        if q.dtype not in (None, ir.DataType.FLOAT):
            raise ConfigError(
                f"layer {match.layer}: the fused VAR formulation is built for fp32 graphs, found "
                f"{q.dtype}. Use passes.pipeline.apply_var on an eager export."
            )

        # key classes, (B, T) each
        visual_sink = b.op("And", [sink, sh.visual], "visual_sink")
        text_sink = b.op("And", [sink, sh.not_visual], "text_sink")
        visual_nonsink = b.op("And", [sh.visual, b.op("Not", [sink], "not_sink")], "visual_nonsink")
        f32 = {"to": ir.DataType.FLOAT}
        cols = [
            _ir.unsqueeze(b, b.op("Cast", [x], f"{n}_f32", f32) if x is not sh.visual_f else x, [-1], f"{n}_col")
            for x, n in ((sh.visual_f, "visual"), (visual_sink, "visual_sink"), (text_sink, "text_sink"))
        ]
        classes = b.op("Concat", cols, "class_indicators_bt3", {"axis": -1})  # (B, T, 3)
        kshape = b.op("Shape", [k], "key_shape_bht", {"start": 0, "end": 3})  # [B, H, T]
        classes = b.op(
            "Expand",
            [_ir.unsqueeze(b, classes, [1], "class_indicators_b1t3"),
             b.op("Concat", [kshape, b.const("three", [3], np.int64)], "classes_shape", {"axis": 0})],
            "class_indicators",
        )  # (B, H, T, 3)

        # pass 1: class masses per row, an attention with a 3-wide value
        masses = b.op("Attention", [q, k, classes, mask], "class_masses", attrs)  # (B, H, S, 3)
        masses.dtype = ir.DataType.FLOAT
        image_mass, visual_sink_mass, text_sink_mass = (
            b.op("Slice", [masses, b.const(f"{n}_start", [i], np.int64), b.const(f"{n}_end", [i + 1], np.int64),
                           b.const(f"{n}_axis", [3], np.int64)], n)
            for i, n in enumerate(("image_mass", "visual_sink_mass", "text_sink_mass"))
        )  # (B, H, S, 1) each
        nonsink_mass = b.op("Sub", [image_mass, visual_sink_mass], "visual_nonsink_mass")
        zero = b.const("zero_f32", np.float32(0.0))
        movable = b.op("Greater", [nonsink_mass, zero], "has_visual_nonsink")
        any_visual_sink = _ir.reduce(
            b, "ReduceMax", b.op("Cast", [visual_sink], "visual_sink_any_f32", f32), [1], "any_visual_sink_b1", keepdims=True
        )
        any_visual_sink = _ir.unsqueeze(b, any_visual_sink, [2, 3], "any_visual_sink_f")  # (B, 1, 1, 1)
        has_visual_sink = b.op("Greater", [any_visual_sink, b.const("half", np.float32(0.5))], "has_visual_sink")
        selected = b.op("And", [sh.eligible, has_visual_sink], "eligible_with_sink")  # (B, 1, S, 1)
        selected = b.op("And", [selected, movable], "eligible_movable")  # (B, H, S, 1)
        if settings.heads in ("dynamic", "hybrid"):
            eps_v = b.op("Mul", [sh.num_visual, b.const("portion_eps", np.float32(PORTION_EPS))], "portion_eps_v")
            portion = b.op("Div", [visual_sink_mass, b.op("Add", [image_mass, eps_v], "portion_denominator")], "portion")
            low = b.op("LessOrEqual", [portion, b.const("rho", np.float32(settings.rho))], "portion_le_rho")
            enough = b.op("GreaterOrEqual", [image_mass, b.const("summ", np.float32(settings.summ))], "image_mass_ge_summ")
            selected = b.op("And", [selected, b.op("And", [low, enough], "image_centric")], "selected_dynamic")
        if settings.heads in ("static", "hybrid"):
            if match.num_heads is None:
                raise GraphPatternError(
                    f"layer {match.layer}: the number of query heads is not static on the Attention "
                    "query; a static/hybrid head mask needs it. Use --heads dynamic."
                )
            wanted = self.heads.get(match.layer, [])
            bad = [h for h in wanted if not 0 <= h < match.num_heads]
            if bad:
                raise ConfigError(
                    f"layer {match.layer}: heads {bad} are out of range for {match.num_heads} query heads."
                )
            head_mask = np.zeros((1, match.num_heads, 1, 1), dtype=np.bool_)
            head_mask[0, wanted] = True
            selected = b.op("And", [selected, b.const("head_mask", head_mask)], "selected_heads")
        selected = b.op("Identity", [selected], "selected")  # (B, H, S, 1)

        # the two log row constants, 0 on rows that are not selected
        budget = b.op(
            "Mul",
            [b.op("Add", [visual_sink_mass, text_sink_mass], "sink_mass"), b.const("one_minus_p", np.float32(1.0 - settings.p))],
            "budget",
        )
        safe = b.op("Where", [movable, nonsink_mass, b.const("one_f32", np.float32(1.0))], "nonsink_mass_safe")
        log_vns = b.op("Log", [b.op("Add", [b.op("Div", [budget, safe], "visual_boost"), b.const("one", np.float32(1.0))], "m_visual_nonsink")], "log_m_visual_nonsink_raw")
        log_vns = b.op("Where", [selected, log_vns, zero], "log_m_visual_nonsink")  # (B, H, S, 1)
        log_sink = b.op("Where", [selected, b.const("log_p", np.float32(math.log(settings.p))), zero], "log_m_sink")
        log_m = b.op("Concat", [log_sink, log_vns], "log_m", {"axis": -1})  # (B, H, S, 2)
        sink_k = b.op("Cast", [sink], "sink_keys_f32", f32)
        vns_k = b.op("Cast", [visual_nonsink], "visual_nonsink_keys_f32", f32)

        # pass 2: the layer's own Attention with shifted scores
        if self.shift == "qk":
            q_aug = b.op("Concat", [q, b.op("Mul", [log_m, b.const("inv_scale", np.float32(1.0 / match.scale))], "log_m_over_scale")], "query_var", {"axis": -1})
            key_cols = b.op(
                "Concat",
                [_ir.unsqueeze(b, sink_k, [-1], "sink_key_col"), _ir.unsqueeze(b, vns_k, [-1], "vns_key_col")],
                "key_class_cols_bt2",
                {"axis": -1},
            )  # (B, T, 2)
            key_cols = b.op(
                "Expand",
                [_ir.unsqueeze(b, key_cols, [1], "key_class_cols_b1t2"),
                 b.op("Concat", [kshape, b.const("two", [2], np.int64)], "key_cols_shape", {"axis": 0})],
                "key_class_cols",
            )  # (B, H, T, 2)
            k_aug = b.op("Concat", [k, key_cols], "key_var", {"axis": -1})  # (B, H, T, hd + 2)
            for x in (q_aug, k_aug):
                x.dtype = q.dtype
            att.replace_input_with(0, q_aug)
            att.replace_input_with(1, k_aug)
            att.attributes["scale"] = ir.AttrFloat32("scale", match.scale)
        else:
            key_rows = b.op(
                "Concat",
                [_ir.unsqueeze(b, sink_k, [1], "sink_key_row"), _ir.unsqueeze(b, vns_k, [1], "vns_key_row")],
                "key_class_rows_b2t",
                {"axis": 1},
            )  # (B, 2, T)
            key_rows = _ir.unsqueeze(b, key_rows, [1], "key_class_rows")  # (B, 1, 2, T)
            shift = b.op("MatMul", [log_m, key_rows], "score_shift")  # (B, H, S, T)
            if mask is None:
                new_mask = shift
            elif mask.dtype == ir.DataType.BOOL:
                lowest = b.const("lowest_f32", np.float32(np.finfo(np.float32).min))
                new_mask = b.op("Where", [mask, shift, lowest], "mask_var")
            else:
                new_mask = b.op("Add", [_ir.cast(b, mask, ir.DataType.FLOAT, "mask_f32"), shift], "mask_var")
            if q.dtype not in (None, ir.DataType.FLOAT):
                new_mask = b.op("Cast", [new_mask], "mask_var_cast", {"to": q.dtype})
            new_mask.dtype = q.dtype
            if len(att.inputs) > 3:
                att.replace_input_with(3, new_mask)
            else:
                att.resize_inputs(4)
                att.replace_input_with(3, new_mask)


@dataclasses.dataclass
class _Shared:
    """Values every VAR layer reads (built once)."""

    visual: ir.Value  # (B, T) bool
    visual_f: ir.Value  # (B, T) fp32
    not_visual: ir.Value  # (B, T) bool
    eligible: ir.Value  # (B, 1, S, 1) bool
    num_visual: ir.Value  # (B, 1, 1, 1) fp32
    not_pad: ir.Value  # (B, S) bool, current queries
    is_prefill: ir.Value  # (1,) bool
    past_sink: ir.Value  # (B, Lv, P) bool
    settings: VarSettings

    @classmethod
    def build(
        cls, b: Builder, settings: VarSettings, attention_mask: ir.Value, visual: ir.Value, past_sink: ir.Value
    ) -> _Shared:
        past_len = b.op("Shape", [past_sink], "past_len", {"start": 2, "end": 3})  # (1,) = P
        big = b.const("int64_max", [_ir.INT64_MAX], np.int64)
        axis1 = b.const("axis1", [1], np.int64)
        mask_bool = _ir.cast(b, attention_mask, ir.DataType.BOOL, "attention_mask_bool")
        not_pad = b.op("Slice", [mask_bool, past_len, big, axis1], "current_not_pad")  # (B, S)
        is_prefill = b.op("Equal", [past_len, b.const("zero_i64", [0], np.int64)], "is_prefill")
        visual_f = b.op("Cast", [visual], "visual_f32", {"to": ir.DataType.FLOAT})  # (B, T)
        not_visual = b.op("Not", [visual], "not_visual")
        seen = b.op("CumSum", [visual_f, b.const("cumsum_axis", np.int64(1))], "visual_cumsum")
        seen_q = b.op("Slice", [seen, past_len, big, axis1], "visual_cumsum_queries")  # (B, S)
        not_visual_q = b.op("Slice", [not_visual, past_len, big, axis1], "query_not_visual")
        after = b.op("Greater", [seen_q, b.const("half", np.float32(0.5))], "query_after_visual")
        eligible = _ir.unsqueeze(b, b.op("And", [after, not_visual_q], "eligible_bs"), [1, 3], "eligible")
        num_visual = _ir.reduce(b, "ReduceSum", visual_f, [1], "num_visual_bt", keepdims=True)  # (B, 1)
        num_visual = _ir.unsqueeze(b, num_visual, [2, 3], "num_visual")  # (B, 1, 1, 1)
        return cls(visual, visual_f, not_visual, eligible, num_visual, not_pad, is_prefill, past_sink, settings)


def _sink_flags(b: Builder, sh: _Shared, residual: ir.Value, j: int, batch: Any, total: Any) -> ir.Value:
    """``var/L{l}/sink`` (B, T): past flags + new sinks of the current tokens (sink_detection.py)."""
    s = sh.settings
    x = _ir.cast(b, residual, ir.DataType.FLOAT, "residual_f32")  # (B, S, D)
    mean_sq = _ir.reduce(b, "ReduceMean", b.op("Mul", [x, x], "x_sq"), [-1], "mean_sq", keepdims=True)
    rms = b.op("Sqrt", [b.op("Add", [mean_sq, b.const("rms_eps", np.float32(RMS_EPS))], "mean_sq_eps")], "rms")
    picked = b.op("Gather", [x, b.const("sink_dims", list(s.sink_dims), np.int64)], "sink_dim_values", {"axis": -1})
    normed = b.op("Abs", [b.op("Div", [picked, rms], "sink_dim_normed")], "sink_dim_abs")  # (B, S, k)
    peak = _ir.reduce(b, "ReduceMax", normed, [-1], "sink_dim_peak", keepdims=False)  # (B, S)
    new = b.op("Greater", [peak, b.const("tau", np.float32(s.tau))], "new_sink_raw")
    new = b.op("And", [new, sh.not_pad], "new_sink_unpadded")
    if s.sink_scope == "prompt":
        new = b.op("And", [new, sh.is_prefill], "new_sink_prompt")
    past_flags = b.op("Gather", [sh.past_sink, b.const("cache_index", np.int64(j))], "past_sink", {"axis": 1})
    sink = b.op("Concat", [past_flags, new], "sink", {"axis": 1})  # (B, T)
    sink.dtype = ir.DataType.BOOL
    sink.shape = ir.Shape([batch, total])
    return sink


@dataclasses.dataclass
class FusedVarReport:
    var_layers: list[int]  # VAR layers, in present_sink_mask order
    num_layers: int
    head_mode: str
    shift: str  # "qk" or "mask"
    changed_layers: list[int]  # layers whose attention got the score shift
    layers: list[dict[str, object]]  # what locate found per VAR layer
    nodes_added: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_fused_var(
    model: ir.Model,
    settings: VarSettings,
    heads: list[tuple[int, int]] | None,
    *,
    num_layers: int | None = None,
    shift: Shift = "qk",
    inplace: bool = False,
    check: bool = True,
) -> tuple[ir.Model, FusedVarReport]:
    """Bake VAR into a decoder with ONNX ``Attention`` ops (same contract as ``apply_var``)."""
    check_not_applied(model)
    if not inplace:
        model = model.clone()
    matches = {m.layer: m for m in locate_fused_layers(model)}
    n_layers = num_layers if num_layers is not None else max(matches) + 1
    hidden = next((_static(m.residual, 2) for m in matches.values() if _static(m.residual, 2)), None)
    if hidden is not None:
        settings.check_model(n_layers, hidden)
    var_layers = settings.var_layers(n_layers)
    if settings.heads != "dynamic" and heads is not None:
        heads = [(la, h) for la, h in heads if la in var_layers]
    before = model.graph.num_nodes()
    manager = ir.passes.PassManager(
        [
            FusedVarPass(settings, heads, num_layers=n_layers, shift=shift),
            FinalizePass(settings, var_layers, heads, check=check),
        ]
    )
    try:
        manager(model)
    except (ir.passes.PassError, ir.passes.InvariantError) as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, VarExportError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from e
        raise
    values = _ir.value_map(model.graph)
    changed = [la for la in var_layers if _ir.layer_value_name(la, "selected") in values]
    model.metadata_props["var_export.formulation"] = f"fused-{shift}"
    report = FusedVarReport(
        var_layers=var_layers,
        num_layers=n_layers,
        head_mode=settings.heads,
        shift=shift,
        changed_layers=changed,
        layers=[matches[la].describe() for la in var_layers],
        nodes_added=model.graph.num_nodes() - before,
    )
    return model, report
