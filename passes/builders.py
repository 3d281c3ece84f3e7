"""Node builders shared by both VAR formulations (DESIGN.md §1).

The passes build every VAR value through these functions, each value once:

    add_sink_mask_io       inputs visual_token_mask [B, T], past_sink_mask [B, Lv, P]  per graph
    add_present_sink_mask  output present_sink_mask [B, Lv, T]                         per graph
    build_sink_inputs      which current tokens may become sinks (not padding, prompt)  per graph
    build_sink_flags       var/L{l}/sink (B, 1, T)                                     per layer
    build_key_classes      var/L{l}/key_class_code (B, 1, T, 1), key_classes (B, 1, T, W)
    build_eligibility      eligible rows (B, 1, S, 1), |V| epsilon (B, 1, 1, 1)        per graph
    split_masses           var/L{l}/class_masses (B, H, S, W) -> its three used columns
    build_selection        var/L{l}/selected (B, H, S, 1)                              per layer
    build_row_scale        var/L{l}/row_scale (B, H, S, 4): the class constants m      per layer
    head_mask              the static/hybrid (1, H, 1, 1) constant

Key classes. With ``code = 2 [k visual] + [k sink]`` every key is in exactly one class, one
column of the one-hot ``key_classes``: 0 visual sink (code 3), 1 text sink (1), 2 visual
non-sink (2), 3 the rest (0). ``probs @ key_classes`` gives every class mass directly
(the visual non-sink mass is its own column, never ``image - visual sink``), and
``row_scale @ key_classes^T`` gives the per-key redistribution weights.

The ``Builder`` never adds a node or a constant twice, so a builder a later pass calls again
returns what the earlier pass built. Per-layer values (``var/L{l}/...``) are what the passes
hand to each other (docs/ARCHITECTURE.md, "Naming inside VAR graphs").
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
    "CLASS_COLUMNS",
    "ClassMasses",
    "KeyClasses",
    "SinkInputs",
    "add_present_sink_mask",
    "add_sink_mask_io",
    "build_eligibility",
    "build_key_classes",
    "build_row_scale",
    "build_selection",
    "build_sink_flags",
    "build_sink_inputs",
    "calibrated_heads",
    "changed_layers",
    "check_var_layers",
    "head_mask",
    "heads_by_layer",
    "past_length",
    "require",
    "split_masses",
]

_F32 = {"to": ir.DataType.FLOAT}
CLASS_COLUMNS = ("visual_sink", "text_sink", "visual_nonsink", "rest")
_CLASS_CODES = (3.0, 1.0, 2.0, 0.0)  # code = 2 * visual + sink, per column of CLASS_COLUMNS


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


def changed_layers(settings: VarSettings, heads: dict[int, list[int]], num_layers: int) -> list[int]:
    """VAR layers that get class masses, selection and redistribution (static/hybrid: only
    those with a calibrated head; the others keep their attention untouched)."""
    layers = settings.var_layers(num_layers)
    if settings.heads == "dynamic":
        return layers
    return [layer for layer in layers if heads.get(layer)]


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


def require(values: dict[str, ir.Value], layer: int, names: Sequence[str], producer: str) -> list[ir.Value]:
    """The per-layer values ``var/L{layer}/<name>`` an earlier pass built, or a clear error."""
    full = [_ir.layer_value_name(layer, n) for n in names]
    absent = [n for n in full if n not in values]
    if absent:
        raise GraphPatternError(f"layer {layer}: {absent} not found; run {producer} (same settings) first.")
    return [values[n] for n in full]


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
    """(1,) int64 = P, read from the sink cache."""
    return _ir.shape(b, past_sink, 2, 3, "past_len")


def _current(b: Builder, x: ir.Value, past_len: ir.Value, name: str) -> ir.Value:
    """``x[:, P:]``: the current-token columns of a (B, T) tensor -> (B, S)."""
    big = b.const("int64_max", [_ir.INT64_MAX], np.int64)
    return b.op("Slice", [x, past_len, big, b.const("axis1", [1], np.int64)], name)


# ------------------------------------------------------------------------- sink flags


@dataclasses.dataclass
class SinkInputs:
    """Per-graph values the sink flags of every layer read."""

    past_sink: ir.Value  # (B, Lv, P) bool
    allowed: ir.Value  # (B, S) bool: current tokens that may be sinks (not padding; prompt scope: P == 0)
    settings: VarSettings


def build_sink_inputs(
    b: Builder, settings: VarSettings, attention_mask: ir.Value, past_sink: ir.Value
) -> SinkInputs:
    past_len = past_length(b, past_sink)  # (1,)
    mask_bool = _ir.cast(b, attention_mask, ir.DataType.BOOL, "attention_mask_bool")
    allowed = _current(b, mask_bool, past_len, "current_not_pad")  # (B, S)
    if settings.sink_scope == "prompt":
        is_prefill = b.op("Equal", [past_len, b.const("zero_i64", [0], np.int64)], "is_prefill")
        allowed = b.op("And", [allowed, is_prefill], "current_may_sink")
    return SinkInputs(past_sink=past_sink, allowed=allowed, settings=settings)


def _sink_threshold(b: Builder, x: ir.Value, tau: float) -> ir.Value:
    """tau^2 (mean(x^2 over D) + eps), (B, S): ``|n_d| > tau`` is ``x_d^2 >`` this."""
    tau2 = np.float32(np.float32(tau) * np.float32(tau))  # fp32 under numpy 1.x value-based casting too
    # ReduceMean with keepdims + Squeeze, not ReduceSumSquare / keepdims=0: ORT's symbolic shape
    # inference (quantization preprocess, the transformers optimizer) infers only this form
    mean_sq = _ir.reduce(b, "ReduceMean", b.op("Mul", [x, x], "x_sq"), [-1], "mean_sq", keepdims=True)
    mean_sq = _ir.squeeze(b, mean_sq, [-1], "mean_sq_bs")  # (B, S)
    scaled = b.op("Mul", [mean_sq, b.const("tau2", tau2)], "tau2_mean_sq")
    return b.op("Add", [scaled, b.const("tau2_eps", np.float32(tau2 * np.float32(RMS_EPS)))], "sink_threshold")


def build_sink_flags(b: Builder, si: SinkInputs, residual: ir.Value, cache_index: int) -> ir.Value:
    """``var/L{l}/sink`` (B, 1, T): the layer's cached flags + the sinks among the current tokens.

    ``b`` is the layer's builder (prefix ``var/L{l}``); ``cache_index`` its row j in the cache.
    A token is a sink iff ``max_d x_d^2 > tau^2 (mean(x^2) + eps)`` over the sink dims d
    (DESIGN.md §1's ``max_d |x_d / rms(x)| > tau``, without the division).
    """
    x = _ir.cast(b, residual, ir.DataType.FLOAT, "residual_f32")  # (B, S, D)
    threshold = _sink_threshold(b, x, si.settings.tau)  # (B, S)
    # max over the k sink dims as an elementwise Max of scalar Gathers, not ReduceMax without
    # keepdims: ORT's symbolic shape inference (quantization preprocess, the transformers
    # optimizer) cannot infer that one's rank.
    squares = []
    for j, d in enumerate(si.settings.sink_dims):
        picked = b.op("Gather", [x, b.const(f"sink_dim_{j}", np.int64(d))], f"sink_dim_{j}_value", {"axis": -1})
        squares.append(b.op("Mul", [picked, picked], f"sink_dim_{j}_sq"))  # (B, S)
    peak = b.op("Max", squares, "sink_dim_peak")  # (B, S)
    new = b.op("Greater", [peak, threshold], "new_sink_raw")
    new = b.op("And", [new, si.allowed], "new_sink")  # (B, S)
    new = _ir.unsqueeze(b, new, [1], "new_sink_row")  # (B, 1, S)
    index = b.const("cache_index", [cache_index], np.int64)
    past_flags = b.op("Gather", [si.past_sink, index], "past_sink", {"axis": 1})  # (B, 1, P)
    sink = b.op("Concat", [past_flags, new], "sink", {"axis": 2})  # (B, 1, T)
    sink.dtype = ir.DataType.BOOL
    return sink


# ------------------------------------------------------------------- classes, eligibility


@dataclasses.dataclass
class KeyClasses:
    code: ir.Value  # (B, 1, T, 1) fp32: 2 [visual] + [sink]
    onehot: ir.Value  # (B, 1, T, W) fp32: CLASS_COLUMNS, then W - 4 zero columns


def build_key_classes(b: Builder, sink: ir.Value, visual: ir.Value, width: int = 4) -> KeyClasses:
    """``var/L{l}/key_class_code`` and ``var/L{l}/key_classes`` (module docstring)."""
    g = Builder(b.graph, "var")  # per graph
    visual_f = g.op("Cast", [visual], "visual_f32", _F32)  # (B, T)
    visual_x2 = _ir.unsqueeze(g, g.op("Add", [visual_f, visual_f], "visual_x2_bt"), [1], "visual_x2")  # (B, 1, T)
    code = b.op("Add", [b.op("Cast", [sink], "sink_f32", _F32), visual_x2], "key_code")  # (B, 1, T)
    code = _ir.unsqueeze(b, code, [-1], "key_class_code")  # (B, 1, T, 1)
    codes = np.full(width, -1.0, np.float32)
    codes[: len(_CLASS_CODES)] = _CLASS_CODES
    onehot = b.op("Equal", [code, b.const(f"class_codes_{width}", codes)], "key_class_bool")
    return KeyClasses(code, b.op("Cast", [onehot], "key_classes", _F32))  # (B, 1, T, W)


@dataclasses.dataclass
class Eligibility:
    eligible: ir.Value  # (B, 1, S, 1) bool: query not visual, a visual key at or before it
    portion_eps: ir.Value  # (B, 1, 1, 1) fp32: PORTION_EPS |V|


def build_eligibility(b: Builder, visual: ir.Value, past_sink: ir.Value) -> Eligibility:
    """Per graph. Query s sits at T-position P + s: CumSum over the visual mask, then the last S."""
    past_len = past_length(b, past_sink)
    visual_f = b.op("Cast", [visual], "visual_f32", _F32)  # (B, T)
    seen_visual = b.op("CumSum", [visual_f, b.const("cumsum_axis", np.int64(1))], "visual_cumsum")
    seen_q = _current(b, seen_visual, past_len, "visual_cumsum_queries")  # (B, S)
    not_visual_q = b.op("Not", [_current(b, visual, past_len, "query_visual")], "query_not_visual")
    after_image = b.op("Greater", [seen_q, b.const("half", np.float32(0.5))], "query_after_visual")
    eligible = b.op("And", [after_image, not_visual_q], "eligible_bs")
    eligible = _ir.unsqueeze(b, eligible, [1, 3], "eligible")  # (B, 1, S, 1)
    num_visual = _ir.reduce(b, "ReduceSum", visual_f, [1], "num_visual", keepdims=True)  # (B, 1)
    eps = b.op("Mul", [num_visual, b.const("portion_eps", np.float32(PORTION_EPS))], "portion_eps_b")
    return Eligibility(eligible, _ir.unsqueeze(b, eps, [2, 3], "portion_eps_v"))  # (B, 1, 1, 1)


# ------------------------------------------------------------------------- row test


@dataclasses.dataclass
class ClassMasses:
    """One row's attention mass per key class, (B, H, S, 1) fp32 each."""

    visual_sink: ir.Value
    text_sink: ir.Value
    visual_nonsink: ir.Value


def split_masses(b: Builder, masses: ir.Value, width: int) -> ClassMasses:
    """(B, H, S, W) ``class_masses`` -> its visual sink, text sink and visual non-sink columns."""
    names = [f"{c}_mass" for c in CLASS_COLUMNS[:3]] + ["other_mass"]
    sizes = [1, 1, 1, width - 3]
    if _ir.opset(b.graph) >= 13:
        cols = b.ops("Split", [masses, b.const(f"split_{width}", sizes, np.int64)], names, {"axis": -1})
    else:
        cols = b.ops("Split", [masses], names, {"axis": -1, "split": sizes})
    return ClassMasses(*cols[:3])


def build_selection(
    b: Builder,
    settings: VarSettings,
    el: Eligibility,
    code: ir.Value,
    masses: ClassMasses,
    head_mask: np.ndarray | None,
) -> ir.Value:
    """``var/L{l}/selected`` (B, H, S, 1) bool (DESIGN.md §1): eligible AND a visual sink in the
    sample AND visual_nonsink_mass > 0, AND the per-row test (dynamic/hybrid), AND ``head_mask``
    (static/hybrid; None for dynamic)."""
    # a count of visual sinks (code 3), not ReduceMax: ORT's symbolic shape inference knows ReduceSum
    is_visual_sink = b.op("Greater", [code, b.const("two_and_half", np.float32(2.5))], "is_visual_sink_key")
    visual_sink_f = b.op("Cast", [is_visual_sink], "is_visual_sink_f", {"to": ir.DataType.FLOAT})  # (B, 1, T, 1)
    visual_sinks = _ir.reduce(b, "ReduceSum", visual_sink_f, [2], "visual_sink_count", keepdims=True)  # (B, 1, 1, 1)
    has_visual_sink = b.op("Greater", [visual_sinks, b.const("half", np.float32(0.5))], "has_visual_sink")
    zero = b.const("zero_f32", np.float32(0.0))
    tests = [
        b.op("And", [el.eligible, has_visual_sink], "eligible_with_sink"),  # (B, 1, S, 1)
        b.op("Greater", [masses.visual_nonsink, zero], "has_visual_nonsink"),  # (B, H, S, 1)
    ]
    if settings.heads in ("dynamic", "hybrid"):
        image_mass = b.op("Add", [masses.visual_sink, masses.visual_nonsink], "image_mass")
        denom = b.op("Add", [image_mass, el.portion_eps], "portion_denominator")
        portion = b.op("Div", [masses.visual_sink, denom], "portion")
        tests.append(b.op("LessOrEqual", [portion, b.const("rho", np.float32(settings.rho))], "portion_le_rho"))
        summ = b.const("summ", np.float32(settings.summ))
        tests.append(b.op("GreaterOrEqual", [image_mass, summ], "image_mass_ge_summ"))
    if settings.heads in ("static", "hybrid"):
        assert head_mask is not None
        tests.append(b.const("head_mask", head_mask))
    selected = tests[0]
    for i, test in enumerate(tests[1:], start=2):
        selected = b.op("And", [selected, test], "selected" if i == len(tests) else "selected_so_far")
    selected.dtype = ir.DataType.BOOL
    return selected


def build_row_scale(b: Builder, p: float, masses: ClassMasses, selected: ir.Value) -> ir.Value:
    """``var/L{l}/row_scale`` (B, H, S, 4): the constant each key class is multiplied by,
    per CLASS_COLUMNS, ``[p, p, 1 + (1 - p)(visual_sink_mass + text_sink_mass) /
    visual_nonsink_mass, 1]`` on selected rows, exactly 1 elsewhere. The ratio is inf/NaN
    where the visual non-sink mass is 0; such rows are never selected, and Where drops it."""
    sink_mass = b.op("Add", [masses.visual_sink, masses.text_sink], "sink_mass")
    ratio = b.op("Div", [sink_mass, masses.visual_nonsink], "sink_to_nonsink")  # (B, H, S, 1)
    p32, one = np.float32(p), np.float32(1.0)
    boost = b.op("Mul", [ratio, b.const("boost_column", [0, 0, one - p32, 0], np.float32)], "boost")
    scale = b.op("Add", [boost, b.const("keep_columns", [p32, p32, one, one], np.float32)], "class_scale")
    return b.op("Where", [selected, scale, b.const("one_f32", one)], "row_scale")  # (B, H, S, 4)
