"""Normalise ONNX Runtime contrib graphs into the form ``locate`` reads (DESIGN.md §4).

Two foreign forms hide what VAR needs:

* ``com.microsoft::GroupQueryAttention`` (onnxruntime-genai's model builder) computes the
  attention probabilities inside one op, with the rotary embedding and the KV-cache concat.
  :func:`unfuse_group_query_attention` replaces it by standard ops that compute the same::

      q, k, v   = Split(packed QKV) -> Reshape/Transpose      # (B, H|KV, S, hd)
      pos       = start_b + arange(S)                           # start_b = 0 on the first
                                                                #   prompt, else seqlens_k + 1 - S
      q, k      = rotary(q, cos_cache[pos], sin_cache[pos])     # rotate-half (non-interleaved)
      present_k = Concat(past_k, k); present_v = Concat(past_v, v)   # (B, KV, T, hd)
      scores    = (q @ repeat_kv(present_k)^T) * scale           # (B, H, S, T)
      allowed   = (j < seqlens_k + 1) & (j <= start_b + i)        # GQA's own causal/length mask
      probs     = Softmax(Where(allowed, scores, lowest))
      out       = (probs @ repeat_kv(present_v)) -> (B, S, H*hd)

  It matches the fused op wherever GQA's KV concat is exact: every row of the batch has
  ``seqlens_k + 1 == T`` (no padding). GQA on CPU does not follow Hugging Face left padding
  (it reads ``seqlens_k`` as a right-padded length), so neither does the unfused form.

* ``com.microsoft::MultiHeadAttention`` (ONNX Runtime's transformers-optimizer fusions for
  decoders): :func:`unfuse_multi_head_attention` replaces it by::

      q, k, v   = (query, key, value) [+ bias] -> Reshape/Transpose   # (B, N, S, hd)
      present_k = Concat(past_key, k); present_v = Concat(past_value, v)   # (B, N, T, hd)
      scores    = (q @ present_k^T) * scale [+ attention_bias]          # (B, N, S, T)
                  [+ mask_filter_value where key_padding_mask == 0]     # (B, T) 0/1
      scores    = Where(j > P + i, lowest, scores)                      # unidirectional=1
      out       = (Softmax(scores) @ present_v) -> (B, S, N*hd)

  as ONNX Runtime's CPU kernel computes it (padded keys get ``mask_filter_value`` added, future
  keys the lowest float: a fully padded left-padding row is a softmax over its causal keys), so
  it follows Hugging Face left padding as the fused op does. Only the separate-Q/K/V decoder
  form with a KV cache is unfused; packed QKV / KV (ONNX Runtime's CPU kernel does not run
  them either), key/value in (B, N, L, H) layout, ``past_sequence_length``,
  ``cache_indirection``, key_padding_mask layouts other than (B, T) and a used ``qk`` output
  are refused by name. MHA has one head count for Q, K and V (no grouped KV heads).

* ``com.microsoft::SkipSimplifiedLayerNormalization`` (genai; ONNX Runtime's transformers
  optimizer) holds the residual ``Add`` that ``locate.find_residual`` looks for after the
  attention output projection. :func:`split_skip_norm` splits it into
  ``Add(input, skip[, bias])`` (its ``input_skip_bias_sum`` output) and a
  ``SimplifiedLayerNormalization`` of that sum (same epsilon; fp32 statistics as the fused op).

:func:`normalize_contrib` applies them to the given decoder layers only and returns what it
changed; :func:`restore` puts the original fused op back on layers that VAR then left
untouched (hybrid/static layers without a calibrated head), so they keep ORT's kernel.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.passes._ir import Builder, constant_array, is_var_node
from var_export.passes.locate import PAST_KEY_RE, PAST_VALUE_RE, nearest_input, resolve_dtype

__all__ = [
    "CONTRIB_DOMAIN",
    "Replaced",
    "contrib_attention_layers",
    "normalize_contrib",
    "restore",
    "split_skip_norm",
    "unfuse_group_query_attention",
    "unfuse_multi_head_attention",
]

log = logging.getLogger(__name__)

CONTRIB_DOMAIN = "com.microsoft"
UNFUSED_PREFIX = "unfused/"  # names of the nodes and values this module adds
Target = Literal["eager", "attention"]  # what normalize_contrib turns the contrib attention into
_SKIP_NORM = "SkipSimplifiedLayerNormalization"
_GQA, _MHA = "GroupQueryAttention", "MultiHeadAttention"
# Ops between the attention output and the skip norm: heads merge, output projection, bias.
_TO_PROJECTION = {"Transpose", "Reshape", "Cast", "Identity"}


@dataclasses.dataclass
class Replaced:
    """One fused node replaced by standard ops (enough to put it back)."""

    layer: int
    op_type: str
    domain: str
    name: str | None
    inputs: list[ir.Value | None]
    attributes: dict[str, ir.Attr]
    old_outputs: list[tuple[str | None, bool]]  # (name, was it used) per output
    new_outputs: list[ir.Value | None]  # what replaced each output (None: it was unused)
    new_nodes: list[ir.Node]


def _is_contrib(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain == CONTRIB_DOMAIN


def contrib_attention_layers(model: ir.Model) -> dict[int, ir.Node]:
    """``GroupQueryAttention`` / ``MultiHeadAttention`` nodes by the layer of their past key."""
    found: dict[int, ir.Node] = {}
    for node in model.graph:
        if node.domain != CONTRIB_DOMAIN or node.op_type not in (_GQA, _MHA):
            continue
        names = [v.name for v in node.inputs if v is not None and v.name]
        layers = [int(m.group(1)) for n in names if (m := PAST_KEY_RE.match(n))]
        if not layers:
            raise GraphPatternError(
                f"{node.op_type} node {node.name!r} takes no past_key_values.{{i}}.key input "
                f"(inputs {names}); expected a decoder with a KV cache, as onnxruntime-genai builds it."
            )
        if layers[0] in found:
            raise GraphPatternError(f"two attention nodes read past key {layers[0]}: {found[layers[0]].name!r}, {node.name!r}")
        found[layers[0]] = node
    return found


# ---------------------------------------------------------------------------------------------
# Shared by the attention unfusers


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _refuse_unsupported(where: str, unsupported: list[tuple[bool, str]]) -> None:
    bad = [what for cond, what in unsupported if cond]
    if bad:
        raise GraphPatternError(
            f"{where}: {', '.join(bad)} is not supported by the unfused form VAR needs. Build the "
            "model without it, or export it with eager attention (`var-export export`)."
        )


def _require_fp32(where: str, query: ir.Value) -> None:
    dtype = resolve_dtype(query)
    if dtype != ir.DataType.FLOAT:
        raise GraphPatternError(f"{where}: {dtype} graphs are not supported yet (fp32 only).")


def _static_head_dim(where: str, past_key: ir.Value, query: ir.Value | None, width_heads: int) -> int:
    """hd from the past key's static dim 3, else the query's static width / ``width_heads``."""
    shape = past_key.shape
    if shape is not None and len(shape) == 4 and isinstance(shape[3], int):
        return shape[3]
    width = query.shape[-1] if query is not None and query.shape is not None else None
    if isinstance(width, int):
        return width // width_heads
    raise GraphPatternError(
        f"{where}: head size unknown (no static dim 3 on {past_key.name!r}, no static query width). "
        "Save the graph with its value shapes (onnx shape inference) and retry."
    )


def _heads_first(b: Builder, x: ir.Value, heads: int, hd: int, name: str) -> ir.Value:
    """(B, S, N*hd) -> (B, N, S, hd)."""
    x = b.op("Reshape", [x, b.const(f"{name}_shape", [0, 0, heads, hd], np.int64)], f"{name}_bsnh")
    return b.op("Transpose", [x], f"{name}_bnsh", {"perm": [0, 2, 1, 3]})


def _dim(b: Builder, x: ir.Value, axis: int | list[int], name: str) -> ir.Value:
    """Dim ``axis`` of x as an int64 scalar (a list of axes: a 1-D shape); any opset >= 13."""
    return b.op("Gather", [b.op("Shape", [x], f"{name}_shape"), b.const(f"{name}_axis", np.asarray(axis, np.int64))],
                name, {"axis": 0})


def _arange(b: Builder, n: ir.Value, name: str) -> ir.Value:
    return b.op("Range", [b.const(f"{name}_zero", np.int64(0)), n, b.const(f"{name}_one", np.int64(1))], name)


def _kv_cache(b: Builder, past_k: ir.Value, past_v: ir.Value, k: ir.Value, v: ir.Value) -> tuple[ir.Value, ir.Value]:
    """present = Concat(past, new) along the sequence axis of (B, N, T, hd)."""
    return (b.op("Concat", [past_k, k], "present_key", {"axis": 2}),
            b.op("Concat", [past_v, v], "present_value", {"axis": 2}))


def _attend(b: Builder, q: ir.Value, k_all: ir.Value, v_all: ir.Value, scale: float, heads: int, hd: int,
            mask: Callable[[ir.Value], ir.Value]) -> tuple[ir.Value, list[ir.Value]]:
    """Softmax(mask(q k^T * scale)) v -> (B, S, heads*hd); q (B, H, S, hd), k/v (B, H, T, hd).
    Returns the output and the float values whose dtype the caller sets."""
    kt = b.op("Transpose", [k_all], "key_t", {"perm": [0, 1, 3, 2]})  # (B, H, hd, T)
    scores = b.op("Mul", [b.op("MatMul", [q, kt], "qk"), b.const("scale", np.float32(scale))], "scores")  # (B, H, S, T)
    masked = mask(scores)
    probs = b.op("Softmax", [masked], "probs", {"axis": -1})
    probs.shape = ir.Shape([None, heads, None, None])  # locate reads the head count here
    ctx = b.op("MatMul", [probs, v_all], "context")  # (B, H, S, hd)
    ctx = b.op("Transpose", [ctx], "context_bshd", {"perm": [0, 2, 1, 3]})
    out = b.op("Reshape", [ctx, b.const("out_shape", [0, 0, heads * hd], np.int64)], "output")  # (B, S, H*hd)
    return out, [scores, masked, probs, out]


def _finish(graph: ir.Graph, node: ir.Node, layer: int, start: int, outputs: list[ir.Value],
            floats: list[ir.Value]) -> Replaced:
    for value_ in floats + outputs:
        value_.dtype = ir.DataType.FLOAT
    return _swap(graph, node, layer, list(graph)[start:], list(outputs))


# ---------------------------------------------------------------------------------------------
# GroupQueryAttention -> standard ops


def _check_gqa(node: ir.Node, *, interleaved: bool = False) -> tuple[int, int, float, bool]:
    """(H, KV, scale or 0, do_rotary); refuses what the unfused form does not reproduce
    (``interleaved``: the form has an interleaved rotary, as the ONNX Attention form has)."""
    where = f"{_GQA} {node.name!r}"
    _refuse_unsupported(where, [
        (int(_attr(node, "local_window_size", -1)) != -1, "local_window_size (sliding window)"),
        (float(_attr(node, "softcap", 0.0)) != 0.0, "softcap"),
        (not interleaved and int(_attr(node, "rotary_interleaved", 0)) != 0,
         "rotary_interleaved=1 (the ONNX Attention form, --formulation fused-qk, has it)"),
        (int(_attr(node, "smooth_softmax", 0)) != 0, "smooth_softmax"),
        (any(v is not None for v in node.inputs[10:]), "attention_bias / head_sink inputs"),
        (int(_attr(node, "qk_output", 0)) != 0, "qk_output"),
    ])
    if len(node.outputs) > 3 and any(o.uses() for o in node.outputs[3:]):
        raise GraphPatternError(f"{where}: its output_qk output is used; not supported.")
    heads, kv_heads = int(_attr(node, "num_heads", 0)), int(_attr(node, "kv_num_heads", 0))
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
        raise GraphPatternError(f"{where}: num_heads {heads} / kv_num_heads {kv_heads} are not a valid GQA pair.")
    return heads, kv_heads, float(_attr(node, "scale", 0.0)), bool(int(_attr(node, "do_rotary", 0)))


def _rotary(b: Builder, x: ir.Value, cos: ir.Value, sin: ir.Value, hd: int, rot: int, name: str) -> ir.Value:
    """Rotate-half rotary on the first ``rot`` dims of x (B, N, S, hd); cos/sin (B, 1, S, rot/2)."""
    half = rot // 2
    def part(start: int, end: int, what: str) -> ir.Value:
        bounds = [b.const(f"{name}_{what}_{k}", [v], np.int64) for k, v in (("start", start), ("end", end), ("axis", -1))]
        return b.op("Slice", [x, *bounds], f"{name}_{what}")
    x1, x2 = part(0, half, "x1"), part(half, rot, "x2")  # (B, N, S, rot/2) each
    out1 = b.op("Sub", [b.op("Mul", [x1, cos], f"{name}_x1cos"), b.op("Mul", [x2, sin], f"{name}_x2sin")], f"{name}_r1")
    out2 = b.op("Add", [b.op("Mul", [x2, cos], f"{name}_x2cos"), b.op("Mul", [x1, sin], f"{name}_x1sin")], f"{name}_r2")
    parts = [out1, out2] + ([part(rot, hd, "pass")] if rot < hd else [])
    return b.op("Concat", parts, f"{name}_rot", {"axis": -1})  # (B, N, S, hd)


def _repeat_kv(b: Builder, x: ir.Value, heads: int, kv_heads: int, hd: int, name: str) -> ir.Value:
    """(B, KV, T, hd) -> (B, H, T, hd), each KV head repeated H/KV times (as HF repeat_kv)."""
    if heads == kv_heads:
        return x
    x = b.op("Unsqueeze", [x, b.const(f"{name}_axes", [2], np.int64)], f"{name}_b_kv_1")  # (B, KV, 1, T, hd)
    x = b.op("Expand", [x, b.const(f"{name}_rep", [1, 1, heads // kv_heads, 1, 1], np.int64)], f"{name}_expand")
    return b.op("Reshape", [x, b.const(f"{name}_shape", [0, heads, -1, hd], np.int64)], name)  # (B, H, T, hd)


def _positions(b: Builder, seqlens_k: ir.Value, past_key: ir.Value, q: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """GQA's positions: (start (B, 1) int64, i (S,) int64, S scalar int64)."""
    i64 = {"to": ir.DataType.INT64}
    total = b.op("Add", [b.op("Cast", [seqlens_k], "seqlens_i64", i64), b.const("one_i64", np.int64(1))], "total_len")  # (B,)
    s = _dim(b, q, 1, "q_len")  # S
    first = b.op("Equal", [_dim(b, past_key, 2, "past_len"), b.const("zero_i64", np.int64(0))], "first_prompt")
    start = b.op("Where", [first, b.const("zero_start", np.int64(0)), b.op("Sub", [total, s], "past_seqlen")], "start")  # (B,)
    start = b.op("Unsqueeze", [start, b.const("start_axes", [1], np.int64)], "start_b1")  # (B, 1)
    return start, _arange(b, s, "query_index"), total


def _gqa_mask(b: Builder, t_len: ir.Value, start: ir.Value, qi: ir.Value, total: ir.Value) -> ir.Value:
    """GQA's own mask (B, 1, S, T): key j < total_b and j <= start_b + i; ``t_len``: T."""
    j = _arange(b, t_len, "key_index")  # (T,)
    last = b.op("Add", [start, qi], "last_key")  # (B, S)
    last = b.op("Unsqueeze", [last, b.const("last_axes", [1, 3], np.int64)], "last_key_b1s1")  # (B, 1, S, 1)
    causal = b.op("LessOrEqual", [j, last], "causal")  # (B, 1, S, T)
    total = b.op("Unsqueeze", [total, b.const("tot_axes", [1, 2, 3], np.int64)], "total_b111")  # (B, 1, 1, 1)
    return b.op("And", [causal, b.op("Less", [j, total], "in_length")], "allowed")


@dataclasses.dataclass
class GqaInputs:
    """One ``GroupQueryAttention`` node's inputs and attributes, checked (``_check_gqa``)."""

    where: str
    heads: int
    kv_heads: int
    scale: float  # 0.0: the node has none (1/sqrt(hd))
    do_rotary: bool
    query: ir.Value  # packed QKV (B, S, (H + 2 KV) hd) when key is None
    key: ir.Value | None
    value: ir.Value | None
    past_k: ir.Value
    past_v: ir.Value
    seqlens_k: ir.Value
    cos_cache: ir.Value | None
    sin_cache: ir.Value | None
    position_ids: ir.Value | None
    hd: int


def gqa_inputs(node: ir.Node, *, interleaved: bool = False) -> GqaInputs:
    """The checked inputs of one ``GroupQueryAttention`` (both normalised forms start here)."""
    heads, kv_heads, scale, do_rotary = _check_gqa(node, interleaved=interleaved)
    where = f"{_GQA} {node.name!r}"
    ins = list(node.inputs) + [None] * (12 - len(node.inputs))
    query, key, value, past_k, past_v, seqlens_k = ins[:6]
    if past_k is None or past_v is None or seqlens_k is None or query is None:
        raise GraphPatternError(f"{where}: expected query, past_key, past_value and seqlens_k inputs.")
    _require_fp32(where, query)
    hd = _static_head_dim(where, past_k, query, heads + 2 * kv_heads if key is None else heads)
    return GqaInputs(where, heads, kv_heads, scale, do_rotary, query, key, value, past_k, past_v, seqlens_k,
                     ins[7], ins[8], ins[9], hd)


def unfuse_group_query_attention(graph: ir.Graph, node: ir.Node, layer: int) -> Replaced:
    """Replace one ``GroupQueryAttention`` by standard ops (module docstring)."""
    g = gqa_inputs(node)
    where, heads, kv_heads, do_rotary, hd = g.where, g.heads, g.kv_heads, g.do_rotary, g.hd
    query, key, value, past_k, past_v, seqlens_k = g.query, g.key, g.value, g.past_k, g.past_v, g.seqlens_k
    cos_cache, sin_cache, position_ids = g.cos_cache, g.sin_cache, g.position_ids
    scale = g.scale or 1.0 / float(np.sqrt(hd))
    b = Builder(graph, f"{UNFUSED_PREFIX}L{layer}")
    start = len(graph)  # nodes appended from here are this layer's new nodes
    if key is None:  # packed QKV (B, S, (H + 2 KV) hd)
        sizes = b.const("qkv_sizes", [heads * hd, kv_heads * hd, kv_heads * hd], np.int64)
        split = ir.node("Split", [query, sizes], {"axis": -1}, num_outputs=3, name=f"{b.prefix}/qkv_split")
        for out, what in zip(split.outputs, ("q", "k", "v")):
            out.name = f"{b.prefix}/{what}_packed"
        graph.append(split)
        query, key, value = split.outputs
    assert key is not None and value is not None
    q = _heads_first(b, query, heads, hd, "q")  # (B, H, S, hd)
    k = _heads_first(b, key, kv_heads, hd, "k")  # (B, KV, S, hd)
    v = _heads_first(b, value, kv_heads, hd, "v")
    pos_start, qi, total = _positions(b, seqlens_k, past_k, query)
    if do_rotary:
        if cos_cache is None or sin_cache is None:
            raise GraphPatternError(f"{where}: do_rotary without cos/sin caches.")
        rot = 2 * int(cos_cache.shape[1]) if cos_cache.shape is not None and isinstance(cos_cache.shape[1], int) else hd
        pos = position_ids if position_ids is not None else b.op("Add", [pos_start, qi], "positions")  # (B, S)
        cos = b.op("Unsqueeze", [b.op("Gather", [cos_cache, pos], "cos_bs"), b.const("cs_axes", [1], np.int64)], "cos")
        sin = b.op("Unsqueeze", [b.op("Gather", [sin_cache, pos], "sin_bs"), b.const("sn_axes", [1], np.int64)], "sin")
        q = _rotary(b, q, cos, sin, hd, rot, "q")
        k = _rotary(b, k, cos, sin, hd, rot, "k")
    present_k, present_v = _kv_cache(b, past_k, past_v, k, v)  # (B, KV, T, hd)
    k_all = _repeat_kv(b, present_k, heads, kv_heads, hd, "key_heads")  # (B, H, T, hd)
    v_all = _repeat_kv(b, present_v, heads, kv_heads, hd, "value_heads")
    allowed = _gqa_mask(b, _dim(b, present_k, 2, "t_len"), pos_start, qi, total)  # (B, 1, S, T)
    lowest = b.const("lowest", np.float32(np.finfo(np.float32).min))
    out, floats = _attend(b, q, k_all, v_all, scale, heads, hd,
                          lambda scores: b.op("Where", [allowed, scores, lowest], "masked_scores"))
    return _finish(graph, node, layer, start, [out, present_k, present_v], floats)


# ---------------------------------------------------------------------------------------------
# MultiHeadAttention -> standard ops

# input indices of com.microsoft::MultiHeadAttention (ONNX Runtime docs/ContribOperators.md)
_MHA_QUERY, _MHA_KEY, _MHA_VALUE, _MHA_BIAS, _MHA_KEY_PADDING, _MHA_ATTN_BIAS = range(6)
_MHA_PAST_KEY, _MHA_PAST_VALUE, _MHA_PAST_LEN, _MHA_CACHE_INDIRECTION = range(6, 10)


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _check_mha(node: ir.Node) -> tuple[int, float, bool, float]:
    """(N, scale or 0, unidirectional, mask_filter_value); refuses what is not reproduced."""
    where = f"{_MHA} {node.name!r}"
    ins = list(node.inputs) + [None] * (10 - len(node.inputs))
    key, value, mask = ins[_MHA_KEY], ins[_MHA_VALUE], ins[_MHA_KEY_PADDING]
    _refuse_unsupported(where, [
        (key is None and value is None, "packed QKV (query (B, S, N, 3, H))"),
        (key is not None and value is None, "packed KV (key (B, L, N, 2, H))"),
        (_rank(key) == 4 or _rank(value) == 4, "key/value in (B, N, L, H) layout"),
        (ins[_MHA_PAST_LEN] is not None, "the past_sequence_length input"),
        (ins[_MHA_CACHE_INDIRECTION] is not None, "cache_indirection (beam search)"),
        (_rank(mask) not in (None, 2), f"key_padding_mask of rank {_rank(mask)} (only (B, T) 0/1 masks are)"),
    ])
    if ins[_MHA_PAST_KEY] is None or ins[_MHA_PAST_VALUE] is None:
        raise GraphPatternError(f"{where}: expected past_key and past_value inputs (a decoder with a KV cache); "
                                f"found {[v.name if v is not None else None for v in ins[6:8]]}.")
    if len(node.outputs) > 3 and any(o.uses() or o.is_graph_output() for o in node.outputs[3:]):
        raise GraphPatternError(f"{where}: its qk output is used; not supported.")
    heads = int(_attr(node, "num_heads", 0))
    if heads <= 0:
        raise GraphPatternError(f"{where}: num_heads {heads}; expected a positive head count.")
    causal = int(_attr(node, "unidirectional", 0))
    if causal not in (0, 1):
        raise GraphPatternError(f"{where}: unidirectional={causal}; expected 0 or 1.")
    return heads, float(_attr(node, "scale", 0.0)), bool(causal), float(_attr(node, "mask_filter_value", -10000.0))


def _mha_mask(b: Builder, scores: ir.Value, past_k: ir.Value, present_k: ir.Value, q: ir.Value,
              attention_bias: ir.Value | None, key_padding: ir.Value | None, causal: bool, filler: float) -> ir.Value:
    """scores [+ attention_bias] [+ filler on padded keys], then [future keys -> lowest], as the
    CPU kernel does (a fully padded left-padding row is a softmax over its causal keys)."""
    if attention_bias is not None:
        scores = b.op("Add", [scores, attention_bias], "biased_scores")  # (B|1, N|1, S, T) broadcast
    if key_padding is not None:
        kpm = b.op("Reshape", [key_padding, _dim(b, present_k, [0, 2], "kpm_bt_shape")], "kpm_bt")  # (B, T): any
        kpm = b.op("Unsqueeze", [kpm, b.const("kpm_axes", [1, 2], np.int64)], "kpm_b11t")  # other layout fails here
        padded = b.op("Equal", [kpm, b.const("kpm_off", np.array(0, dtype=_kpm_dtype(key_padding)))], "padded_key")
        fill = b.op("Where", [padded, b.const("mask_filter", np.float32(filler)), b.const("mask_zero", np.float32(0.0))],
                    "padding_fill")  # (B, 1, 1, T)
        scores = b.op("Add", [scores, fill], "padding_masked")
    if causal:
        j = _arange(b, _dim(b, present_k, 2, "t_len"), "key_index")  # (T,)
        last = b.op("Add", [_arange(b, _dim(b, q, 1, "q_len"), "query_index"), _dim(b, past_k, 2, "past_len")], "last_key")
        last = b.op("Unsqueeze", [last, b.const("last_axes", [1], np.int64)], "last_key_s1")  # (S, 1)
        future = b.op("Greater", [j, last], "future_key")  # (S, T)
        lowest = b.const("lowest", np.float32(np.finfo(np.float32).min))
        scores = b.op("Where", [future, lowest, scores], "causal_masked")
    return scores


def _kpm_dtype(value: ir.Value) -> np.dtype:
    return (value.dtype or ir.DataType.INT32).numpy()


@dataclasses.dataclass
class MhaInputs:
    """One ``MultiHeadAttention`` node's inputs and attributes, checked (``_check_mha``)."""

    where: str
    heads: int
    scale: float  # 0.0: the node has none (1/sqrt(hd))
    causal: bool
    filler: float  # mask_filter_value
    query: ir.Value
    key: ir.Value
    value: ir.Value
    bias: ir.Value | None
    attn_bias: ir.Value | None
    key_padding: ir.Value | None
    past_k: ir.Value
    past_v: ir.Value
    hd: int
    hd_v: int


def mha_inputs(node: ir.Node) -> MhaInputs:
    """The checked inputs of one ``MultiHeadAttention`` (both normalised forms start here)."""
    heads, scale, causal, filler = _check_mha(node)
    where = f"{_MHA} {node.name!r}"
    ins = list(node.inputs) + [None] * (10 - len(node.inputs))
    query, key, value = ins[_MHA_QUERY], ins[_MHA_KEY], ins[_MHA_VALUE]
    past_k, past_v = ins[_MHA_PAST_KEY], ins[_MHA_PAST_VALUE]
    assert query is not None and key is not None and value is not None and past_k is not None and past_v is not None
    _require_fp32(where, query)
    hd = _static_head_dim(where, past_k, query, heads)
    hd_v = _static_head_dim(where, past_v, None, heads) if past_v.shape is not None else hd
    return MhaInputs(where, heads, scale, causal, filler, query, key, value, ins[_MHA_BIAS],
                     ins[_MHA_ATTN_BIAS], ins[_MHA_KEY_PADDING], past_k, past_v, hd, hd_v)


def mha_heads_first(b: Builder, graph: ir.Graph, m: MhaInputs) -> tuple[ir.Value, ir.Value, ir.Value]:
    """q, k, v (B, N, S|T, hd) from the node's projections, their bias added first when it has one."""
    proj = [m.query, m.key, m.value]
    if m.bias is not None:  # (D + D + D_v): the projections' biases, added before the heads split
        sizes = b.const("bias_sizes", [m.heads * m.hd, m.heads * m.hd, m.heads * m.hd_v], np.int64)
        split = ir.node("Split", [m.bias, sizes], {"axis": 0}, num_outputs=3, name=f"{b.prefix}/bias_split")
        for out, what in zip(split.outputs, "qkv"):
            out.name = f"{b.prefix}/{what}_bias"
        graph.append(split)
        proj = [b.op("Add", [x, bx], f"{what}_biased") for x, bx, what in zip(proj, split.outputs, "qkv")]
    q, k, v = (_heads_first(b, x, m.heads, d, what) for x, d, what in zip(proj, (m.hd, m.hd, m.hd_v), "qkv"))
    return q, k, v


def unfuse_multi_head_attention(graph: ir.Graph, node: ir.Node, layer: int) -> Replaced:
    """Replace one ``MultiHeadAttention`` by standard ops (module docstring)."""
    m = mha_inputs(node)
    scale = m.scale or 1.0 / float(np.sqrt(m.hd))
    b = Builder(graph, f"{UNFUSED_PREFIX}L{layer}")
    start = len(graph)
    q, k, v = mha_heads_first(b, graph, m)  # (B, N, S, hd)
    present_k, present_v = _kv_cache(b, m.past_k, m.past_v, k, v)  # (B, N, T, hd)
    out, floats = _attend(b, q, present_k, present_v, scale, m.heads, m.hd_v, lambda scores: _mha_mask(
        b, scores, m.past_k, present_k, m.query, m.attn_bias, m.key_padding, m.causal, m.filler))
    return _finish(graph, node, layer, start, [out, present_k, present_v], floats)


def _swap(graph: ir.Graph, node: ir.Node, layer: int, new_nodes: list[ir.Node],
          new_outputs: list[ir.Value | None]) -> Replaced:
    """Point every use of ``node``'s outputs at ``new_outputs`` (names kept), drop ``node``."""
    record = Replaced(
        layer=layer, op_type=node.op_type, domain=node.domain, name=node.name,
        inputs=list(node.inputs), attributes=dict(node.attributes),
        old_outputs=[(o.name, bool(o.uses()) or o.is_graph_output()) for o in node.outputs],
        new_outputs=[], new_nodes=new_nodes,
    )
    for i, old in enumerate(node.outputs):
        new = new_outputs[i] if i < len(new_outputs) else None
        used = bool(old.uses()) or old.is_graph_output()
        if used and new is None:
            raise GraphPatternError(f"{node.op_type} {node.name!r}: its output {i} ({old.name!r}) is used; not supported.")
        record.new_outputs.append(new if used else None)
        if used:
            _move(graph, old, new)
    graph.remove(node, safe=True)
    graph.sort()
    return record


def _move(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """All uses (graph outputs included) of ``old`` go to ``new``, which takes ``old``'s name."""
    name = old.name
    if old.shape is not None:
        new.shape = old.shape
    if old.dtype is not None:
        new.dtype = old.dtype
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    old.name = None
    new.name = name


_UNFUSERS: dict[str, tuple[Callable[[ir.Node], object], Callable[[ir.Graph, ir.Node, int], Replaced]]] = {
    _GQA: (_check_gqa, unfuse_group_query_attention),
    _MHA: (_check_mha, unfuse_multi_head_attention),
}


# ---------------------------------------------------------------------------------------------
# SkipSimplifiedLayerNormalization -> Add + SimplifiedLayerNormalization


def split_skip_norm(graph: ir.Graph, node: ir.Node, layer: int) -> Replaced:
    """``SkipSimplifiedLayerNormalization(input, skip, gamma[, bias])`` -> ``sum = input + skip
    (+ bias)`` and ``SimplifiedLayerNormalization(sum, gamma)``; its outputs 0 and 3 keep their
    names (1 and 2, mean and inverse std, must be unused)."""
    x, skip, gamma = node.inputs[0], node.inputs[1], node.inputs[2]
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:3]):
        raise GraphPatternError(f"{_SKIP_NORM} {node.name!r}: its mean / inv_std_var outputs are used; not supported.")
    assert x is not None and skip is not None and gamma is not None
    b = Builder(graph, f"{UNFUSED_PREFIX}L{layer}/skip_norm")
    start = len(graph)
    total = b.op("Add", [x, skip], "sum")  # the residual Add locate looks for: input is the stream
    if bias is not None:
        total = b.op("Add", [total, bias], "sum_bias")
    eps = float(_attr(node, "epsilon", 1e-5))
    normed = b.op("SimplifiedLayerNormalization", [total, gamma], "output",
                  {"axis": -1, "epsilon": eps, "stash_type": 1})
    for v in (total, normed):
        v.dtype = resolve_dtype(x)
    new_nodes = list(graph)[start:]
    outputs: list[ir.Value | None] = [normed, None, None, total]
    return _swap(graph, node, layer, new_nodes, outputs)


def _skip_norm_after(attention_out: ir.Value) -> ir.Node | None:
    """From an attention output forward over heads merge, output projection and bias to a
    ``SkipSimplifiedLayerNormalization`` whose ``skip`` (or ``input``) it is."""
    value, projected = attention_out, False
    for _ in range(8):
        consumers = [n for n in value.consumers() if not is_var_node(n)]
        if len(consumers) != 1:
            return None
        node = consumers[0]
        if _is_contrib(node, _SKIP_NORM) and projected:
            return node
        if not projected and node.op_type in _TO_PROJECTION:
            value = node.outputs[0]
        elif not projected and node.op_type in ("MatMul", "Gemm"):
            projected, value = True, node.outputs[0]
        elif projected and node.op_type in ("Add", "Cast") and (node.op_type == "Cast" or constant_array(node.inputs[1]) is not None
                                                               or node.inputs[1] is not None and node.inputs[1].is_initializer()):
            value = node.outputs[0]
        else:
            return None
    return None


def _softmax_attention_outputs(model: ir.Model) -> dict[int, ir.Value]:
    """Plain attention (Softmax -> MatMul(probs, V)) outputs by the layer of their V."""
    found: dict[int, ir.Value] = {}
    for node in model.graph:
        if node.op_type != "MatMul" or is_var_node(node) or node.inputs[0] is None:
            continue
        producer = node.inputs[0].producer()
        for _ in range(4):  # through the sdpa guard Where(IsNaN) / Cast
            if producer is None or producer.op_type in ("Softmax",):
                break
            producer = producer.inputs[-1].producer() if producer.op_type == "Where" else (
                producer.inputs[0].producer() if producer.op_type in ("Cast", "Identity") and producer.inputs[0] else None)
        if producer is None or producer.op_type != "Softmax":
            continue
        hit = nearest_input(node.inputs[1], PAST_VALUE_RE)
        if hit is not None:
            found.setdefault(hit[0], node.outputs[0])
    return found


def normalize_contrib(model: ir.Model, layers: Iterable[int], *, target: Target = "eager") -> list[Replaced]:
    """Replace GroupQueryAttention / MultiHeadAttention and split the post-attention
    SkipSimplifiedLayerNormalization on ``layers`` (in place); returns the replacements (for
    :func:`restore`). Every fused node of ``layers`` is checked before any is replaced.

    ``target``: ``"eager"`` — standard ops ending in ``MatMul -> Softmax -> MatMul`` (the naive
    formulation, ``passes.pipeline.apply_var``); ``"attention"`` — one ONNX ``Attention`` per layer
    (the fused formulations, ``passes.fused_var``; ``passes/contrib_attention.py``), the default
    opset raised to 23 where lower."""
    graph = model.graph
    layers = sorted(set(layers))
    fused = {layer: node for layer, node in contrib_attention_layers(model).items() if layer in layers}
    for node in fused.values():  # refuses an unsupported attribute / input by name
        if target == "attention" and node.op_type == _GQA:
            _check_gqa(node, interleaved=True)
        else:
            _UNFUSERS[node.op_type][0](node)
    if target == "attention":
        from var_export.passes import contrib_attention as ca  # it builds on this module's helpers

        if fused:
            ca.raise_default_opset(model)
        shared = ca.GraphValues(graph)
        to_attention = {_GQA: ca.gqa_to_attention, _MHA: ca.mha_to_attention}
        done = [to_attention[node.op_type](graph, node, layer, shared) for layer, node in sorted(fused.items())]
    elif target == "eager":
        done = [_UNFUSERS[node.op_type][1](graph, node, layer) for layer, node in sorted(fused.items())]
    else:
        raise ValueError(f"target must be 'eager' or 'attention', found {target!r}")
    outputs = _softmax_attention_outputs(model)
    for layer in layers:
        unfused = next((r for r in done if r.layer == layer and r.op_type in _UNFUSERS), None)
        out = unfused.new_outputs[0] if unfused is not None else outputs.get(layer)
        if out is None:
            continue
        skip = _skip_norm_after(out)
        if skip is not None:
            done.append(split_skip_norm(graph, skip, layer))
    if done:
        log.info("normalised contrib ops: %s", [(r.layer, r.op_type) for r in done])
    return done


def restore(model: ir.Model, replaced: Iterable[Replaced]) -> int:
    """Put the original fused node back for each record (its new nodes must be unused by
    anything but themselves and the record's outputs); returns how many were restored."""
    graph = model.graph
    count = 0
    for rec in sorted(replaced, key=lambda r: r.op_type in _UNFUSERS):  # norms first
        node = ir.Node(rec.domain, rec.op_type, rec.inputs, attributes=list(rec.attributes.values()),
                       num_outputs=len(rec.old_outputs), name=rec.name)
        anchor = next((v.producer() for v in rec.new_outputs if v is not None), None)
        assert anchor is not None
        graph.insert_before(anchor, node)
        for out, (name, _used), new in zip(node.outputs, rec.old_outputs, rec.new_outputs):
            if new is not None:
                _move(graph, new, out)
            elif name:
                out.name = name
        for dead in reversed(rec.new_nodes):
            if dead.graph is graph and not any(o.uses() or o.is_graph_output() for o in dead.outputs):
                graph.remove(dead, safe=True)
        count += 1
    _drop_dead_unfused(graph)  # per-graph values (unfused/graph/) no remaining layer reads
    for name, init in list(graph.initializers.items()):  # the restored layers' constants
        if name.startswith(UNFUSED_PREFIX) and not init.uses():
            del graph.initializers[name]
    graph.sort()
    return count


def _drop_dead_unfused(graph: ir.Graph) -> None:
    """Remove ``unfused/`` nodes whose outputs nothing reads, until none is left."""
    while True:
        dead = [n for n in graph if n.name and n.name.startswith(UNFUSED_PREFIX)
                and not any(o.uses() or o.is_graph_output() for o in n.outputs)]
        if not dead:
            return
        for node in dead:
            graph.remove(node, safe=True)
