"""ONNX Runtime contrib attention -> one ONNX ``Attention`` (opset 23) per layer, for the fused
VAR formulations (``passes.fused_var``: shift ``qk`` / ``mask`` / ``kernel``).

``normalize_contrib(model, layers, target="attention")`` (``passes/unfuse_contrib.py``) calls
these instead of the eager unfusers: the layer keeps one attention op, which
``locate_fused.locate_fused_layers`` finds, instead of ``MatMul -> Softmax -> MatMul``.

``com.microsoft::GroupQueryAttention`` (onnxruntime-genai)::

    q, k, v   = Split(Transpose(Reshape(packed QKV)), [H, KV, KV], axis=1)   # (B, H|KV, S, hd)
    q, k      = RotaryEmbedding(q|k, cos_cache, sin_cache, pos)             # ONNX opset 23, GQA's
                                                                            #   rotary_interleaved
    present_k = Concat(past_k, k); present_v = Concat(past_v, v)            # (B, KV, T, hd)
    out       = Attention(q, present_k, present_v, allowed, scale)          # (B, H, S, hd)
    out       = Reshape(Transpose(out)) -> (B, S, H*hd)

  ONNX Runtime's ``Attention`` reads KV < H heads itself (no repeat_kv). Per graph, built once
  and shared by every layer that reads the same ``seqlens_k``:
  ``pos = start_b + arange(S)`` (start_b = 0 on the first prompt, else ``seqlens_k + 1 - S``)
  and ``allowed`` (B, 1, S, T) bool = (j < seqlens_k + 1) & (j <= start_b + i), GQA's own mask
  (the eager form's, ``unfuse_contrib``); as there, exact where every row is unpadded.

``com.microsoft::MultiHeadAttention``::

    q, k, v   = (query, key, value) [+ bias] -> Reshape/Transpose          # (B, N, S, hd)
    present_k = Concat(past_key, k); present_v = Concat(past_value, v)     # (B, N, T, hd)
    out       = Attention(q, present_k, present_v, mask, scale) -> (B, S, N*hd)

  with the float mask (per graph, once for each combination of mask inputs) as the CPU kernel
  masks: ``attention_bias`` [+ mask_filter_value on keys where key_padding_mask == 0], then
  future keys -> float32 lowest when ``unidirectional=1`` (a fully padded left-padding row stays
  a softmax over its causal keys).

:func:`raise_default_opset` raises the default-domain opset import to 23 first (``Attention``,
``RotaryEmbedding``), refusing a graph whose nodes use attributes that opset 23 no longer has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.passes._ir import Builder
from var_export.passes.unfuse_contrib import (
    UNFUSED_PREFIX,
    Replaced,
    _arange,
    _dim,
    _finish,
    _gqa_mask,
    _heads_first,
    _kpm_dtype,
    _kv_cache,
    _positions,
    gqa_inputs,
    mha_heads_first,
    mha_inputs,
)

__all__ = [
    "ATTENTION_OPSET",
    "GraphValues",
    "default_opset",
    "gqa_to_attention",
    "mha_to_attention",
    "opset_blockers",
    "raise_default_opset",
]

ATTENTION_OPSET = 23  # ONNX Attention and RotaryEmbedding
_MIN_IR_VERSION = 10  # what torch.onnx writes at opset 23; ONNX Runtime loads it


def raise_default_opset(model: ir.Model, target: int = ATTENTION_OPSET) -> int:
    """Raise the default-domain opset import to ``target`` (in place); returns the old version.

    Ops keep their meaning across the bump unless a node uses an attribute the ``target``
    schema dropped (``ReduceMean(axes=...)`` below 18, ``Split(split=...)`` below 13, ...):
    such graphs are refused, nothing changed."""
    old = default_opset(model)
    if old >= target:
        return old
    bad = opset_blockers(model, target)
    if bad:
        raise GraphPatternError(
            f"the ONNX Attention form needs opset {target}; this graph is opset {old} and its nodes "
            f"{bad} use attributes opset {target} does not have (expected ops whose form is the same "
            "at both opsets). Use --formulation naive, or convert the graph to a newer opset first."
        )
    model.opset_imports[""] = target
    model.opset_imports.pop("ai.onnx", None)
    model.ir_version = max(model.ir_version or 0, _MIN_IR_VERSION)
    return old


def default_opset(model: ir.Model) -> int:
    """The model's default-domain opset import."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def opset_blockers(model: ir.Model, target: int = ATTENTION_OPSET) -> list[str]:
    """Default-domain nodes that would change meaning at opset ``target``: ``"Op (attr, ...)"``
    for each op whose node uses attributes the ``target`` schema does not have."""
    if default_opset(model) >= target:
        return []
    return sorted({f"{n.op_type} ({', '.join(sorted(set(n.attributes) - allowed))})"
                   for n in model.graph if (allowed := _attributes_at(n, target)) is not None
                   and set(n.attributes) - allowed})


def _attributes_at(node: ir.Node, version: int) -> set[str] | None:
    """The attribute names of ``node``'s op at opset ``version`` (None: not an ONNX op here)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    try:
        return set(onnx.defs.get_schema(node.op_type, version, "").attributes)
    except onnx.defs.SchemaError:  # ONNX Runtime's own default-domain ops (SimplifiedLayerNormalization)
        return None


class GraphValues:
    """Values every normalised layer shares (positions, masks), built once per graph under
    ``unfused/graph/``; ``get(key, make)`` builds ``make(builder)`` the first time."""

    def __init__(self, graph: ir.Graph) -> None:
        self.b = Builder(graph, f"{UNFUSED_PREFIX}graph")
        self._made: dict[tuple[Any, ...], Any] = {}

    def get(self, key: tuple[Any, ...], make: Callable[[Builder], Any]) -> Any:
        if key not in self._made:
            self._made[key] = make(self.b)
        return self._made[key]


def _lengths(b: Builder, past_k: ir.Value, query: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(S, T) as int64 scalars: query length and past + query length."""
    s = _dim(b, query, 1, "q_len")
    return s, b.op("Add", [_dim(b, past_k, 2, "past_len"), s], "t_len")


def _gqa_values(b: Builder, seqlens_k: ir.Value, past_k: ir.Value, query: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GQA's rotary positions (B, S) int64 and its mask ``allowed`` (B, 1, S, T) bool."""
    start, qi, total = _positions(b, seqlens_k, past_k, query)  # (B, 1), (S,), (B,)
    positions = b.op("Add", [start, qi], "positions")  # (B, S)
    allowed = _gqa_mask(b, _lengths(b, past_k, query)[1], start, qi, total)  # (B, 1, S, T)
    positions.dtype, allowed.dtype = ir.DataType.INT64, ir.DataType.BOOL  # the VAR passes read the mask's type
    return positions, allowed


def _attention(b: Builder, q: ir.Value, present_k: ir.Value, present_v: ir.Value, mask: ir.Value | None,
               scale: float, heads: int, hd_v: int) -> ir.Value:
    """One ONNX Attention on 4-D inputs, output back to (B, S, heads*hd_v)."""
    out = b.op("Attention", [q, present_k, present_v, mask] if mask is not None else [q, present_k, present_v],
               "attention", {"scale": float(scale)})  # (B, H, S, hd_v)
    out.shape, out.dtype = ir.Shape([None, heads, None, hd_v]), ir.DataType.FLOAT
    ctx = b.op("Transpose", [out], "context_bshd", {"perm": [0, 2, 1, 3]})  # (B, S, H, hd_v)
    merged = b.op("Reshape", [ctx, b.const("out_shape", [0, 0, heads * hd_v], np.int64)], "output")
    ctx.dtype = merged.dtype = ir.DataType.FLOAT
    return merged  # (B, S, H*hd_v)


def _split_packed(b: Builder, graph: ir.Graph, qkv: ir.Value, heads: int, kv_heads: int,
                  hd: int) -> list[ir.Value]:
    """Packed QKV (B, S, (H + 2 KV) hd) -> q (B, H, S, hd), k and v (B, KV, S, hd)."""
    x = b.op("Reshape", [qkv, b.const("qkv_shape", [0, 0, heads + 2 * kv_heads, hd], np.int64)], "qkv_bsnh")
    x = b.op("Transpose", [x], "qkv_bnsh", {"perm": [0, 2, 1, 3]})  # (B, H + 2 KV, S, hd)
    sizes = b.const("qkv_sizes", [heads, kv_heads, kv_heads], np.int64)
    split = ir.node("Split", [x, sizes], {"axis": 1}, num_outputs=3, name=f"{b.prefix}/qkv_split")
    for out, what in zip(split.outputs, ("q", "k", "v")):
        out.name = f"{b.prefix}/{what}_bnsh"
    graph.append(split)
    return list(split.outputs)


def gqa_to_attention(graph: ir.Graph, node: ir.Node, layer: int, shared: GraphValues) -> Replaced:
    """Replace one ``GroupQueryAttention`` by an ONNX ``Attention`` (module docstring)."""
    g = gqa_inputs(node, interleaved=True)
    where, heads, kv_heads, scale, do_rotary, hd = g.where, g.heads, g.kv_heads, g.scale, g.do_rotary, g.hd
    query, key, value, past_k, past_v, seqlens_k = g.query, g.key, g.value, g.past_k, g.past_v, g.seqlens_k
    cos_cache, sin_cache, position_ids = g.cos_cache, g.sin_cache, g.position_ids
    b = Builder(graph, f"{UNFUSED_PREFIX}L{layer}")
    start = len(graph)  # nodes appended from here are this layer's new nodes
    if key is None:
        q, k, v = _split_packed(b, graph, query, heads, kv_heads, hd)
    else:
        assert value is not None
        q, k, v = _heads_first(b, query, heads, hd, "q"), _heads_first(b, key, kv_heads, hd, "k"), \
            _heads_first(b, value, kv_heads, hd, "v")
    positions, allowed = shared.get(("gqa", id(seqlens_k)), lambda g: _gqa_values(g, seqlens_k, past_k, query))
    if do_rotary:
        if cos_cache is None or sin_cache is None:
            raise GraphPatternError(f"{where}: do_rotary without cos/sin caches.")
        rot = 2 * int(cos_cache.shape[1]) if cos_cache.shape is not None and isinstance(cos_cache.shape[1], int) else hd
        pos = position_ids if position_ids is not None else positions  # (B, S) int64
        interleaved = int(node.attributes.get_int("rotary_interleaved", 0))  # 0 or 1 (GQA's schema)
        attrs = {"interleaved": interleaved, **({"rotary_embedding_dim": rot} if rot < hd else {})}
        q = b.op("RotaryEmbedding", [q, cos_cache, sin_cache, pos], "q_rot", attrs)  # (B, H, S, hd)
        k = b.op("RotaryEmbedding", [k, cos_cache, sin_cache, pos], "k_rot", attrs)  # (B, KV, S, hd)
    for x, n in ((q, heads), (k, kv_heads), (v, kv_heads)):
        x.shape, x.dtype = ir.Shape([None, n, None, hd]), ir.DataType.FLOAT  # locate_fused reads H and hd
    present_k, present_v = _kv_cache(b, past_k, past_v, k, v)  # (B, KV, T, hd)
    out = _attention(b, q, present_k, present_v, allowed, scale or 1.0 / float(np.sqrt(hd)), heads, hd)
    return _finish(graph, node, layer, start, [out, present_k, present_v], [])


def _mha_mask(b: Builder, past_k: ir.Value, query: ir.Value, attention_bias: ir.Value | None,
              key_padding: ir.Value | None, causal: bool, filler: float) -> ir.Value | None:
    """The CPU kernel's masking as one float mask (B|1, N|1, S, T), or None: attention_bias
    [+ filler where key_padding_mask == 0] [future keys -> lowest]."""
    mask, built = attention_bias, []
    if attention_bias is not None and attention_bias.dtype is None:
        attention_bias.dtype = ir.DataType.FLOAT  # MHA's attention_bias has the query's type (fp32, checked)
    if key_padding is not None:
        kpm = b.op("Reshape", [key_padding, b.const("kpm_bt", [0, -1], np.int64)], "kpm_bt")  # (B, T)
        kpm = b.op("Unsqueeze", [kpm, b.const("kpm_axes", [1, 2], np.int64)], "kpm_b11t")
        padded = b.op("Equal", [kpm, b.const("kpm_off", np.array(0, dtype=_kpm_dtype(key_padding)))], "padded_key")
        fill = b.op("Where", [padded, b.const("mask_filter", np.float32(filler)), b.const("mask_zero", np.float32(0.0))],
                    "padding_fill")  # (B, 1, 1, T)
        mask = fill if mask is None else b.op("Add", [mask, fill], "padding_masked")
        built.append(mask)
    if causal:
        s, t = _lengths(b, past_k, query)
        last = b.op("Add", [_arange(b, s, "query_index"), _dim(b, past_k, 2, "past_len")], "last_key")  # (S,)
        last = b.op("Unsqueeze", [last, b.const("last_axes", [1], np.int64)], "last_key_s1")  # (S, 1)
        future = b.op("Greater", [_arange(b, t, "key_index"), last], "future_key")  # (S, T)
        future = b.op("Unsqueeze", [future, b.const("future_axes", [0, 1], np.int64)], "future_11st")
        base = mask if mask is not None else b.const("no_bias", np.float32(0.0))
        mask = b.op("Where", [future, b.const("lowest", np.float32(np.finfo(np.float32).min)), base], "causal_masked")
        built.append(mask)
    for value in built:
        value.dtype = ir.DataType.FLOAT
    return mask


def mha_to_attention(graph: ir.Graph, node: ir.Node, layer: int, shared: GraphValues) -> Replaced:
    """Replace one ``MultiHeadAttention`` by an ONNX ``Attention`` (module docstring)."""
    m = mha_inputs(node)
    b = Builder(graph, f"{UNFUSED_PREFIX}L{layer}")
    start = len(graph)
    q, k, v = mha_heads_first(b, graph, m)  # (B, N, S, hd)
    for x, d in ((q, m.hd), (k, m.hd), (v, m.hd_v)):
        x.shape, x.dtype = ir.Shape([None, m.heads, None, d]), ir.DataType.FLOAT
    key_ = ("mha", id(m.attn_bias), id(m.key_padding), m.causal, m.filler)
    mask = shared.get(key_, lambda g: _mha_mask(g, m.past_k, m.query, m.attn_bias, m.key_padding, m.causal, m.filler))
    present_k, present_v = _kv_cache(b, m.past_k, m.past_v, k, v)  # (B, N, T, hd)
    out = _attention(b, q, present_k, present_v, mask, m.scale or 1.0 / float(np.sqrt(m.hd)), m.heads, m.hd_v)
    return _finish(graph, node, layer, start, [out, present_k, present_v], [])
