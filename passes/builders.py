"""Node builders shared by both VAR formulations (DESIGN.md §1).

The unfused passes (``sink_detection``, ``head_selection``, ``redistribution``) and the fused
formulation (``fused_var``) build the same values through these functions, so the sink flags,
eligibility, the per-row test and the head mask are written once:

    add_sink_mask_io       inputs visual_token_mask [B, T], past_sink_mask [B, Lv, P]  per graph
    add_present_sink_mask  output present_sink_mask [B, Lv, T]                         per graph
    build_sink_inputs      P, padding and prefill flags, tau / sink-dim constants      per graph
    build_sink_flags       var/L{l}/sink (B, T)                                        per layer
    build_eligibility      visual fp32, not visual, eligible rows, |V|                 per graph
    build_key_classes      visual sink / text sink / visual non-sink keys (B, T)       per layer
    build_selection        var/L{l}/selected (B, H, S, 1) from the class masses        per layer
    build_visual_boost     m_vis - 1 = (1 - p)(sink masses) / visual_nonsink_mass      per layer
    head_mask              the static/hybrid (1, H, 1, 1) constant

Every value is named ``<builder prefix>/<name>``; the per-layer ones (``var/L{l}/...``) are
what the passes hand to each other (docs/ARCHITECTURE.md, "Naming inside VAR graphs").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from var_export.core.errors import ConfigError, GraphPatternError
from var_export.core.settings import PORTION_EPS, RMS_EPS, VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.locate import PAST_KEY_RE

__all__ = [
    "Eligibility",
    "KeyClasses",
    "SinkInputs",
    "add_present_sink_mask",
    "add_sink_mask_io",
    "build_eligibility",
    "build_key_classes",
    "build_selection",
    "build_sink_flags",
    "build_sink_inputs",
    "build_visual_boost",
    "calibrated_heads",
    "check_var_layers",
    "head_mask",
    "heads_by_layer",
    "past_length",
    "split_columns",
    "stack_columns",
]

_F32 = {"to": ir.DataType.FLOAT}


# ---------------------------------------------------------------------------------- heads


def heads_by_layer(heads: Iterable[tuple[int, int]] | None) -> dict[int, list[int]]:
    """``[(layer, head), ...]`` -> ``{layer: sorted heads}``."""
    out: dict[int, set[int]] = {}
    for layer, head in heads or ():
        out.setdefault(int(layer), set()).add(int(head))
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def calibrated_heads(mode: str, heads: Iterable[tuple[int, int]] | None) -> dict[int, list[int]]:
    """The calibrated heads by layer for ``static``/``hybrid`` (``{}`` for dynamic)."""
    if mode == "dynamic":
        return {}
    if heads is None:
        raise ConfigError(
            f"head mode {mode!r} needs the calibrated head list, [(layer, head), ...] from "
            "calibration.json 'heads'; found none. Calibrate first or use --heads dynamic."
        )
    return heads_by_layer(heads)


def head_mask(layer: int, wanted: Sequence[int], num_heads: int | None, *, why_unknown: str) -> np.ndarray:
    """(1, H, 1, 1) bool: True on the calibrated heads of ``layer``.

    ``why_unknown`` says where the head count was looked for when it is None.
    """
    if num_heads is None:
        raise GraphPatternError(
            f"layer {layer}: the number of query heads cannot be read from the graph "
            f"({why_unknown}); a static/hybrid head mask needs it. Run shape inference or use "
            "--heads dynamic."
        )
    bad = [h for h in wanted if not 0 <= h < num_heads]
    if bad:
        raise ConfigError(
            f"layer {layer}: heads {bad} are out of range for {num_heads} query heads "
            "(expected 0..H-1). The calibration belongs to another model?"
        )
    mask = np.zeros((1, num_heads, 1, 1), dtype=np.bool_)
    mask[0, list(wanted)] = True
    return mask


def check_var_layers(var_layers: Iterable[int], found: Iterable[int], what: str) -> None:
    """Every VAR layer must have a located attention (``what``: what was looked for)."""
    found = sorted(found)
    missing = [layer for layer in var_layers if layer not in found]
    if missing:
        raise GraphPatternError(
            f"VAR layers {missing} have no located {what} (found layers {found}); "
            "check --layers against the graph."
        )


# ---------------------------------------------------------------------------- graph IO


def _dims(value: ir.Value, default: tuple[str, str]) -> tuple[int | str, int | str]:
    out: list[int | str] = list(default)
    if value.shape is not None and len(value.shape) == 2:
        for i in range(2):
            d = value.shape[i]
            out[i] = d if isinstance(d, int) else (d.value or default[i])
    return out[0], out[1]


def _past_dim(graph: ir.Graph) -> int | str:
    for v in graph.inputs:
        if v.name and PAST_KEY_RE.match(v.name) and v.shape is not None and len(v.shape) == 4:
            d = v.shape[2]
            return d if isinstance(d, int) else (d.value or "past_sequence_length")
    return "past_sequence_length"


@dataclasses.dataclass
class SinkMaskIO:
    visual: ir.Value  # visual_token_mask (B, T) bool
    past_sink: ir.Value  # past_sink_mask (B, Lv, P) bool
    batch: int | str  # dim names / sizes of attention_mask
    total: int | str


def add_sink_mask_io(graph: ir.Graph, attention_mask: ir.Value, num_var_layers: int) -> SinkMaskIO:
    """Add ``visual_token_mask`` (unless there) and ``past_sink_mask`` to the graph inputs."""
    batch, total = _dims(attention_mask, ("batch", "total_sequence_length"))
    visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
    if visual is None:
        visual = ir.Value(
            name=_ir.VISUAL_MASK, shape=ir.Shape([batch, total]), type=ir.TensorType(ir.DataType.BOOL)
        )
        graph.inputs.append(visual)
    past_sink = ir.Value(
        name=_ir.PAST_SINK_MASK,
        shape=ir.Shape([batch, num_var_layers, _past_dim(graph)]),
        type=ir.TensorType(ir.DataType.BOOL),
    )
    graph.inputs.append(past_sink)
    return SinkMaskIO(visual, past_sink, batch, total)


def add_present_sink_mask(graph: ir.Graph, rows: Sequence[ir.Value], io: SinkMaskIO) -> None:
    """Concat the per-layer (B, 1, T) sink rows into the output ``present_sink_mask``."""
    present = Builder(graph, "var").op("Concat", list(rows), "present_sink_mask", {"axis": 1})
    present.name = _ir.PRESENT_SINK_MASK
    present.dtype = ir.DataType.BOOL
    present.shape = ir.Shape([io.batch, len(rows), io.total])  # (B, Lv, T)
    graph.outputs.append(present)


def past_length(b: Builder, past_sink: ir.Value) -> ir.Value:
    """``var/past_len`` (1,) int64 = P, read from the sink cache (reused when already built)."""
    return _ir.shared(b, "past_len") or _ir.shape(b, past_sink, 2, 3, "past_len")


# ------------------------------------------------------------------------- sink flags


@dataclasses.dataclass
class SinkInputs:
    """Per-graph values the sink flags of every layer read."""

    past_sink: ir.Value  # (B, Lv, P) bool
    not_pad: ir.Value  # (B, S) bool: current tokens that are not padding
    is_prefill: ir.Value  # (1,) bool: P == 0
    rms_eps: ir.Value  # () fp32
    tau: ir.Value  # () fp32
    settings: VarSettings


def build_sink_inputs(
    b: Builder, settings: VarSettings, attention_mask: ir.Value, past_sink: ir.Value
) -> SinkInputs:
    past_len = past_length(b, past_sink)  # (1,)
    big = b.const("int64_max", [_ir.INT64_MAX], np.int64)
    axis1 = b.const("axis1", [1], np.int64)
    mask_bool = _ir.cast(b, attention_mask, ir.DataType.BOOL, "attention_mask_bool")
    not_pad = b.op("Slice", [mask_bool, past_len, big, axis1], "current_not_pad")  # (B, S)
    is_prefill = b.op("Equal", [past_len, b.const("zero_i64", [0], np.int64)], "is_prefill")
    return SinkInputs(
        past_sink=past_sink,
        not_pad=not_pad,
        is_prefill=is_prefill,
        rms_eps=b.const("rms_eps", np.float32(RMS_EPS)),
        tau=b.const("tau", np.float32(settings.tau)),
        settings=settings,
    )


def build_sink_flags(
    b: Builder, si: SinkInputs, residual: ir.Value, cache_index: int, io: SinkMaskIO
) -> ir.Value:
    """``var/L{l}/sink`` (B, T): the layer's past flags + the sinks among the current tokens.

    ``b`` is the layer's builder (prefix ``var/L{l}``); ``cache_index`` its row j in the cache.
    """
    x = _ir.cast(b, residual, ir.DataType.FLOAT, "residual_f32")  # (B, S, D)
    mean_sq = _ir.reduce(b, "ReduceMean", b.op("Mul", [x, x], "x_sq"), [-1], "mean_sq", keepdims=True)
    rms = b.op("Sqrt", [b.op("Add", [mean_sq, si.rms_eps], "mean_sq_eps")], "rms")  # (B, S, 1)
    # max over the k sink dims as an elementwise Max of scalar Gathers (no ReduceMax without
    # keepdims: ORT's symbolic shape inference, used by quantization preprocess and the
    # transformers optimizer, cannot infer its rank). max(|x_d|) / rms == max(|x_d| / rms).
    picked = [
        b.op("Abs", [b.op("Gather", [x, b.const(f"sink_dim_{j}", np.int64(d))], f"sink_dim_{j}_value",
                          {"axis": -1})], f"sink_dim_{j}_abs")  # (B, S)
        for j, d in enumerate(si.settings.sink_dims)
    ]
    rms_bs = _ir.squeeze(b, rms, [-1], "rms_squeezed")  # (B, S)
    peak = b.op("Div", [b.op("Max", picked, "sink_dim_max"), rms_bs], "sink_dim_peak")  # (B, S)
    new = b.op("Greater", [peak, si.tau], "new_sink_raw")
    new = b.op("And", [new, si.not_pad], "new_sink_unpadded")
    if si.settings.sink_scope == "prompt":
        new = b.op("And", [new, si.is_prefill], "new_sink_prompt")
    index = b.const("cache_index", np.int64(cache_index))
    past_flags = b.op("Gather", [si.past_sink, index], "past_sink", {"axis": 1})  # (B, P)
    sink = b.op("Concat", [past_flags, new], "sink", {"axis": 1})  # (B, T)
    sink.dtype = ir.DataType.BOOL
    sink.shape = ir.Shape([io.batch, io.total])
    return sink


# ------------------------------------------------------------------- eligibility, classes


@dataclasses.dataclass
class Eligibility:
    """Per-graph query/key facts every layer's row test reads."""

    visual: ir.Value  # (B, T) bool
    visual_f: ir.Value  # (B, T) fp32
    not_visual: ir.Value  # (B, T) bool
    eligible: ir.Value  # (B, 1, S, 1) bool: query not visual, a visual key at or before it
    num_visual: ir.Value  # (B, 1, 1, 1) fp32: |V|


def build_eligibility(b: Builder, visual: ir.Value, past_sink: ir.Value) -> Eligibility:
    """Query s sits at T-position P + s: CumSum over the visual mask, then the last S."""
    past_len = past_length(b, past_sink)
    big = b.const("sel_int64_max", [_ir.INT64_MAX], np.int64)
    axis1 = b.const("sel_axis1", [1], np.int64)
    visual_f = b.op("Cast", [visual], "visual_f32", _F32)  # (B, T)
    not_visual = b.op("Not", [visual], "not_visual")  # (B, T)
    seen_visual = b.op("CumSum", [visual_f, b.const("cumsum_axis", np.int64(1))], "visual_cumsum")
    seen_q = b.op("Slice", [seen_visual, past_len, big, axis1], "visual_cumsum_queries")  # (B, S)
    not_visual_q = b.op("Slice", [not_visual, past_len, big, axis1], "query_not_visual")  # (B, S)
    after_image = b.op("Greater", [seen_q, b.const("half", np.float32(0.5))], "query_after_visual")
    eligible = b.op("And", [after_image, not_visual_q], "eligible_bs")
    eligible = _ir.unsqueeze(b, eligible, [1, 3], "eligible")  # (B, 1, S, 1)
    num_visual = _ir.reduce(b, "ReduceSum", visual_f, [1], "num_visual_bt", keepdims=True)  # (B, 1)
    num_visual = _ir.unsqueeze(b, num_visual, [2, 3], "num_visual")  # (B, 1, 1, 1)
    return Eligibility(visual, visual_f, not_visual, eligible, num_visual)


@dataclasses.dataclass
class KeyClasses:
    """The key classes of one layer, (B, T) each, as bool and as fp32 indicators."""

    visual_sink: ir.Value
    text_sink: ir.Value
    visual_nonsink: ir.Value
    visual_sink_f: ir.Value
    text_sink_f: ir.Value
    visual_nonsink_f: ir.Value


def build_key_classes(b: Builder, sink: ir.Value, el: Eligibility) -> KeyClasses:
    visual_sink = b.op("And", [sink, el.visual], "visual_sink")  # (B, T)
    text_sink = b.op("And", [sink, el.not_visual], "text_sink")  # (B, T)
    visual_nonsink = b.op("And", [el.visual, b.op("Not", [sink], "not_sink")], "visual_nonsink")
    return KeyClasses(
        visual_sink,
        text_sink,
        visual_nonsink,
        b.op("Cast", [visual_sink], "visual_sink_f32", _F32),
        b.op("Cast", [text_sink], "text_sink_f32", _F32),
        b.op("Cast", [visual_nonsink], "visual_nonsink_f32", _F32),
    )


def stack_columns(b: Builder, columns: Sequence[tuple[ir.Value, str]], name: str) -> ir.Value:
    """(B, T) indicators -> (B, T, k), in the given order."""
    cols = [_ir.unsqueeze(b, c, [-1], f"{n}_col") for c, n in columns]  # (B, T, 1)
    return b.op("Concat", cols, name, {"axis": -1})


def split_columns(b: Builder, masses: ir.Value, names: Sequence[str]) -> list[ir.Value]:
    """(B, H, S, k) -> k values (B, H, S, 1), named ``names``."""
    axis3 = b.const("axis3", [3], np.int64)
    out = []
    for i, name in enumerate(names):
        start = b.const(f"{name}_start", [i], np.int64)
        end = b.const(f"{name}_end", [i + 1], np.int64)
        out.append(b.op("Slice", [masses, start, end, axis3], name))
    return out


# ------------------------------------------------------------------------- row test


@dataclasses.dataclass
class Selection:
    selected: ir.Value  # (B, H, S, 1) bool: var/L{l}/selected
    movable: ir.Value  # (B, H, S, 1) bool: visual_nonsink_mass > 0


def build_selection(
    b: Builder,
    settings: VarSettings,
    el: Eligibility,
    keys: KeyClasses,
    *,
    image_mass: ir.Value,
    visual_sink_mass: ir.Value,
    visual_nonsink_mass: ir.Value,
    head_mask: np.ndarray | None,
) -> Selection:
    """``var/L{l}/selected`` (DESIGN.md §1): eligible AND a visual sink in the sample AND
    visual_nonsink_mass > 0, AND the per-row test (dynamic/hybrid), AND ``head_mask``
    (static/hybrid; None for dynamic)."""
    zero = b.const("zero_f32", np.float32(0.0))
    movable = b.op("Greater", [visual_nonsink_mass, zero], "has_visual_nonsink")  # (B, H, S, 1)
    # a count, not ReduceMax: same test (> 0.5 on 0/1 flags) and ORT's symbolic shape inference knows ReduceSum
    any_visual_sink = _ir.reduce(b, "ReduceSum", keys.visual_sink_f, [1], "any_visual_sink_b1", keepdims=True)
    any_visual_sink = _ir.unsqueeze(b, any_visual_sink, [2, 3], "any_visual_sink_f")  # (B, 1, 1, 1)
    has_visual_sink = b.op("Greater", [any_visual_sink, b.const("half", np.float32(0.5))], "has_visual_sink")
    selected = b.op("And", [el.eligible, has_visual_sink], "eligible_with_sink")  # (B, 1, S, 1)
    selected = b.op("And", [selected, movable], "eligible_movable")  # (B, H, S, 1)
    if settings.heads in ("dynamic", "hybrid"):
        eps_v = b.op("Mul", [el.num_visual, b.const("portion_eps", np.float32(PORTION_EPS))], "portion_eps_v")
        denom = b.op("Add", [image_mass, eps_v], "portion_denominator")
        portion = b.op("Div", [visual_sink_mass, denom], "portion")
        rho = b.const("rho", np.float32(settings.rho))
        low_portion = b.op("LessOrEqual", [portion, rho], "portion_le_rho")
        summ = b.const("summ", np.float32(settings.summ))
        enough = b.op("GreaterOrEqual", [image_mass, summ], "image_mass_ge_summ")
        image_centric = b.op("And", [low_portion, enough], "image_centric")
        selected = b.op("And", [selected, image_centric], "selected_dynamic")
    if settings.heads in ("static", "hybrid"):
        assert head_mask is not None
        selected = b.op("And", [selected, b.const("head_mask", head_mask)], "selected_heads")
    selected = b.op("Identity", [selected], "selected")
    selected.dtype = ir.DataType.BOOL
    return Selection(selected, movable)


def build_visual_boost(
    b: Builder,
    p: float,
    *,
    visual_sink_mass: ir.Value,
    text_sink_mass: ir.Value,
    visual_nonsink_mass: ir.Value,
    movable: ir.Value,
) -> ir.Value:
    """m_vis - 1 = (1 - p)(visual_sink_mass + text_sink_mass) / visual_nonsink_mass, (B, H, S, 1);
    the denominator guarded to 1 where it is not > 0 (``movable``)."""
    sink_mass = b.op("Add", [visual_sink_mass, text_sink_mass], "sink_mass")
    budget = b.op("Mul", [sink_mass, b.const("one_minus_p", np.float32(1.0) - np.float32(p))], "budget")
    one = b.const("one_f32", np.float32(1.0))
    safe = b.op("Where", [movable, visual_nonsink_mass, one], "nonsink_mass_safe")
    return b.op("Div", [budget, safe], "visual_boost")
