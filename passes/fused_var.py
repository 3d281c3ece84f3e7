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
Sink flags, eligibility, the row test and the head mask are the builders of
``passes/builders.py`` that ``sink_detection`` and ``head_selection`` use too (same inputs,
outputs and ``var/`` names); validation is ``passes.pipeline.plan_var``, as ``apply_var``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from var_export.core.errors import ConfigError, GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.builders import (
    Eligibility,
    add_present_sink_mask,
    add_sink_mask_io,
    build_eligibility,
    build_key_classes,
    build_selection,
    build_sink_flags,
    build_sink_inputs,
    build_visual_boost,
    calibrated_heads,
    check_var_layers,
    head_mask,
    split_columns,
    stack_columns,
)
from var_export.passes.finalize import FinalizePass, check_not_applied
from var_export.passes.locate import PAST_KEY_RE, find_residual, nearest_input, static_dim
from var_export.passes.pipeline import plan_var, run_passes

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
                "var_export.export.export_decoder(..., fused=True)."
            )
        if q is None or q.shape is None or len(q.shape) != 4:
            raise GraphPatternError(
                f"{where}: expected a 4-D query (B, H, S, hd), found shape {q.shape if q else None}. "
                "3-D (B, S, H*hd) Attention inputs are not supported; export with var_export.export.export_decoder(..., fused=True)."
            )
        if float(node.attributes.get_float("softcap", 0.0)) != 0.0:
            raise GraphPatternError(f"{where} has softcap; the additive score shift of VAR is not exact under it.")
        hit = nearest_input(k, PAST_KEY_RE)
        if hit is None:
            raise GraphPatternError(
                f"{where}: its K reaches no graph input past_key_values.{{i}}.key (the layer index "
                "is read from it). Export the decoder with a KV cache."
            )
        layer = hit[0]
        residual = find_residual(node)
        if isinstance(residual, str):
            raise GraphPatternError(f"layer {layer}: residual stream not found: {residual}")
        head_dim = static_dim(q, 3)
        num_heads = static_dim(q, 1) or node.attributes.get_int("q_num_heads", 0) or None
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
            "exported with SDPA at opset 23 (var_export.export.export_decoder(..., fused=True)). For MatMul->Softmax->MatMul "
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
        self.settings = settings
        self.heads = calibrated_heads(settings.heads, heads)
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
        check_var_layers(var_layers, matches, "Attention node")
        io = add_sink_mask_io(graph, attention_mask, len(var_layers))
        b = Builder(graph, "var")
        inputs = build_sink_inputs(b, self.settings, attention_mask, io.past_sink)
        eligibility = build_eligibility(b, io.visual, io.past_sink)

        rows = []
        for j, layer in enumerate(var_layers):
            lb = Builder(graph, f"var/L{layer}")
            sink = build_sink_flags(lb, inputs, matches[layer].residual, j, io)  # (B, T)
            rows.append(_ir.unsqueeze(lb, sink, [1], "sink_row"))  # (B, 1, T)
            if self.settings.heads != "dynamic" and not self.heads.get(layer):
                continue  # no calibrated head here: the layer keeps its attention untouched
            self._layer(lb, eligibility, matches[layer], sink)
        add_present_sink_mask(graph, rows, io)  # (B, Lv, T)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _layer(self, b: Builder, el: Eligibility, match: FusedLayerMatch, sink: ir.Value) -> None:
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

        keys = build_key_classes(b, sink, el)  # (B, T) each
        classes = stack_columns(
            b,
            [(el.visual_f, "visual"), (keys.visual_sink_f, "visual_sink"), (keys.text_sink_f, "text_sink")],
            "class_indicators_bt3",
        )  # (B, T, 3)
        kshape = _ir.shape(b, k, 0, 3, "key_shape_bht")  # [B, H, T]
        classes = _per_head(b, classes, kshape, 3, "class_indicators")  # (B, H, T, 3)

        # pass 1: class masses per row, an attention with a 3-wide value
        masses = b.op("Attention", [q, k, classes, mask], "class_masses", attrs)  # (B, H, S, 3)
        masses.dtype = ir.DataType.FLOAT
        image_mass, visual_sink_mass, text_sink_mass = split_columns(
            b, masses, ("image_mass", "visual_sink_mass", "text_sink_mass")
        )  # (B, H, S, 1) each
        nonsink_mass = b.op("Sub", [image_mass, visual_sink_mass], "visual_nonsink_mass")
        wanted = None
        if settings.heads != "dynamic":
            wanted = head_mask(
                match.layer,
                self.heads.get(match.layer, []),
                match.num_heads,
                why_unknown="no static dim 1 on the Attention query, no q_num_heads attribute",
            )
        selection = build_selection(
            b,
            settings,
            el,
            keys,
            image_mass=image_mass,
            visual_sink_mass=visual_sink_mass,
            visual_nonsink_mass=nonsink_mass,
            head_mask=wanted,
        )
        selected = selection.selected  # (B, H, S, 1)

        # the two log row constants, 0 on rows that are not selected
        boost = build_visual_boost(
            b,
            settings.p,
            visual_sink_mass=visual_sink_mass,
            text_sink_mass=text_sink_mass,
            visual_nonsink_mass=nonsink_mass,
            movable=selection.movable,
        )  # m_vis - 1
        zero = b.const("zero_f32", np.float32(0.0))
        m_vns = b.op("Add", [boost, b.const("one", np.float32(1.0))], "m_visual_nonsink")
        log_vns = b.op("Log", [m_vns], "log_m_visual_nonsink_raw")
        log_vns = b.op("Where", [selected, log_vns, zero], "log_m_visual_nonsink")  # (B, H, S, 1)
        log_p = b.const("log_p", np.float32(math.log(settings.p)))
        log_sink = b.op("Where", [selected, log_p, zero], "log_m_sink")
        log_m = b.op("Concat", [log_sink, log_vns], "log_m", {"axis": -1})  # (B, H, S, 2)
        sink_k = b.op("Cast", [sink], "sink_keys_f32", {"to": ir.DataType.FLOAT})  # (B, T)
        vns_k = keys.visual_nonsink_f  # (B, T)

        # pass 2: the layer's own Attention with shifted scores
        if self.shift == "qk":
            inv_scale = b.const("inv_scale", np.float32(1.0 / match.scale))
            q_aug = b.op("Concat", [q, b.op("Mul", [log_m, inv_scale], "log_m_over_scale")], "query_var", {"axis": -1})
            key_cols = stack_columns(b, [(sink_k, "sink_key"), (vns_k, "vns_key")], "key_class_cols_bt2")  # (B, T, 2)
            key_cols = _per_head(b, key_cols, kshape, 2, "key_class_cols")  # (B, H, T, 2)
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
            new_mask.dtype = q.dtype
            if len(att.inputs) <= 3:
                att.resize_inputs(4)
            att.replace_input_with(3, new_mask)


def _per_head(b: Builder, columns: ir.Value, kshape: ir.Value, width: int, name: str) -> ir.Value:
    """(B, T, width) key columns -> (B, H, T, width), H from the key's shape ``kshape`` [B, H, T]."""
    target = b.op("Concat", [kshape, b.const(f"{name}_width", [width], np.int64)], f"{name}_shape", {"axis": 0})
    return b.op("Expand", [_ir.unsqueeze(b, columns, [1], f"{name}_b1"), target], name)


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
    plan = plan_var(settings, heads, matches, num_layers=num_layers, what="Attention node")
    before = model.graph.num_nodes()
    run_passes(
        model,
        [
            FusedVarPass(settings, plan.heads, num_layers=plan.num_layers, shift=shift),
            FinalizePass(settings, plan.var_layers, plan.heads, check=check),
        ],
    )
    values = _ir.value_map(model.graph)
    changed = [la for la in plan.var_layers if _ir.layer_value_name(la, "selected") in values]
    model.metadata_props["var_export.formulation"] = f"fused-{shift}"
    report = FusedVarReport(
        var_layers=plan.var_layers,
        num_layers=plan.num_layers,
        head_mode=settings.heads,
        shift=shift,
        changed_layers=changed,
        layers=[matches[la].describe() for la in plan.var_layers],
        nodes_added=model.graph.num_nodes() - before,
    )
    return model, report
