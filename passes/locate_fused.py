"""Locate, per decoder layer, the fused ONNX ``Attention`` op (opset 23) VAR hooks into.

Every ``Attention`` node with 4-D Q/K/V (B, H, S|T, hd) after RoPE and the GQA repeat, the
KV cache concatenated before it (no in-op cache) and no softcap. The layer index comes from
the ``past_key_values.{i}.key`` input its K reaches (``locate.nearest_input``), the residual
stream from ``locate.find_residual`` after the op, as for the unfused form.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from var_export.core.errors import GraphPatternError
from var_export.passes._ir import is_var_node
from var_export.passes.locate import PAST_KEY_RE, find_residual, nearest_input, static_dim

__all__ = ["FusedLayerMatch", "has_onnx_attention", "locate_fused_layers"]


def has_onnx_attention(model: ir.Model) -> bool:
    """Whether the graph holds ONNX ``Attention`` ops (the fused formulation's input form)."""
    return any(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in model.graph)


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


def _before_var(value: ir.Value | None) -> ir.Value | None:
    """The layer's own Q/K behind a VAR score shift (``var/`` Concat of extra columns)."""
    producer = None if value is None else value.producer()
    while producer is not None and is_var_node(producer) and producer.op_type == "Concat":
        value = producer.inputs[0]
        producer = None if value is None else value.producer()
    return value


def locate_fused_layers(model: ir.Model) -> list[FusedLayerMatch]:
    """Every ONNX ``Attention`` node with 4-D Q/K/V and no in-op KV cache, by layer."""
    found: dict[int, FusedLayerMatch] = {}
    for node in model.graph:
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or is_var_node(node):
            continue  # var/ Attention nodes are VAR's class masses
        where = f"Attention node {node.name!r}"
        q, k = _before_var(node.inputs[0]), _before_var(node.inputs[1])
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
