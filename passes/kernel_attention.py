"""The kernel formulation: each changed layer's ONNX ``Attention`` becomes one
``var_export::VarAttention`` node, ONNX Runtime's custom op built from
``var_export/kernels/var_attention.cc`` (var_export.kernels).

VarAttention computes the layer's attention and VAR together, in one pass over K and V per
query block (the class masses, the per-row selection and the three class constants of
DESIGN.md §1 are folded into the softmax weights; no (B, H, S, T) tensor is written). The pass
list is the fused formulation's with its middle replaced::

    analyze (locate_fused_layers, once)
    -> SinkDetectionPass       var/L{l}/sink (B, 1, T), present_sink_mask        (shared)
    -> KernelAttentionPass     Attention(Q, K, V, mask) -> VarAttention(Q, K, V, mask, -,
                               visual_token_mask, residual, var/L{l}/past_sink, var/current_may_sink)
                               whose second output is the layer's sink row: the op computes the
                               flags itself, so the layer's standard-op sink detection is removed
                               (2 VAR nodes per changed layer: the past row's Gather and the op)
    -> FinalizePass

Layers VAR leaves untouched (hybrid/static layers without a calibrated head) keep their
``Attention``. The op runs on ONNX Runtime's CPU execution provider in fp32; other runtimes
(TensorRT, CUDA) would need the same kernel as a plugin (docs/foreign-graphs.md).
"""

from __future__ import annotations

import onnx_ir as ir

from var_export.core.contract import KERNEL_DOMAIN as DOMAIN
from var_export.core.contract import KERNEL_OP as OP_TYPE
from var_export.core.contract import KERNEL_OPSET as OPSET
from var_export.core.errors import ConfigError, GraphPatternError
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.analysis import CalibratedLayerPass, VarAnalysis
from var_export.passes.builders import require
from var_export.passes.locate_fused import FusedLayerMatch

__all__ = ["KernelAttentionPass", "kernel_attention_nodes"]

ATTENTION = "attention"  # var/L{l}/attention: the VarAttention output


def kernel_attention_nodes(model: ir.Model) -> dict[int, ir.Node]:
    """The VarAttention nodes of ``model`` by layer (from their ``var/L{l}/attention`` output)."""
    found = {}
    for node in model.graph:
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            name = node.outputs[0].name or ""
            layer = name.split("/")[1][1:] if name.startswith("var/L") else None
            if layer is not None and layer.isdigit():
                found[int(layer)] = node
    return found


class KernelAttentionPass(CalibratedLayerPass):
    """Replace the Attention of every changed VAR layer by ``var_export::VarAttention``, and fold
    that layer's standard-op sink detection into it (SinkDetectionPass's nodes for it are
    removed; layers VAR leaves untouched keep theirs for ``present_sink_mask``)."""

    def _sink_sources(self, values: dict[str, ir.Value], layer: int) -> tuple[ir.Value, ir.Value]:
        """The layer's past sink row (B, 1, P) and the per-graph current tokens that may be sinks
        (B, S), as SinkDetectionPass built them."""
        may = "var/current_may_sink" if self.settings.sink_scope == "prompt" else "var/current_not_pad"
        past = _ir.layer_value_name(layer, "past_sink")
        if past not in values or may not in values:
            raise GraphPatternError(f"layer {layer}: {past!r} / {may!r} not found: run SinkDetectionPass first.")
        return values[past], values[may]

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        return _ir.layer_value_name(layer, ATTENTION) not in values

    def prepare(self, graph: ir.Graph) -> ir.Value:
        visual = _ir.graph_input(graph, _ir.VISUAL_MASK)
        if visual is None:
            raise GraphPatternError(
                f"graph input {_ir.VISUAL_MASK!r} not found: run SinkDetectionPass before KernelAttentionPass."
            )
        return visual

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = super().call(model)
        if result.modified:
            model.opset_imports[DOMAIN] = OPSET
            _drop_unused_var_nodes(model.graph)  # the standard-op sink detection the ops replaced
            for node in kernel_attention_nodes(model).values():
                if len(node.outputs) > 1 and node.outputs[1].name.endswith("/sink_flags"):
                    node.outputs[1].name = node.outputs[1].name[: -len("_flags")]  # var/L{l}/sink again
        return result

    def build_layer(self, b: Builder, match: FusedLayerMatch, values: dict[str, ir.Value], visual: ir.Value) -> None:
        (sink,) = require(values, match.layer, ["sink"], "SinkDetectionPass")
        att = match.attention
        where = f"layer {match.layer}: Attention {att.name!r}"
        q, k, v = att.inputs[0], att.inputs[1], att.inputs[2]
        assert q is not None and k is not None and v is not None  # locate_fused_layers checked Q and K
        if _ir.resolve_dtype(q) != ir.DataType.FLOAT:
            raise ConfigError(
                f"{where}: the kernel formulation runs fp32 graphs (ONNX Runtime's CPU execution "
                f"provider), found {_ir.resolve_dtype(q).name}. Use --formulation fused-qk for fp16 graphs."
            )
        if any(out.uses() or out.is_graph_output() for out in att.outputs[1:]):
            raise GraphPatternError(f"{where}: its extra outputs (the QK matmul output) are used; VarAttention has one output.")
        mask = att.inputs[3] if len(att.inputs) > 3 else None
        attrs: dict[str, object] = {
            "scale": float(match.scale),
            "is_causal": int(att.attributes.get_int("is_causal", 0)),
            "p": float(self.settings.p),
            "rho": float(self.settings.rho),
            "summ": float(self.settings.summ),
            "row_test": int(self.settings.heads != "static"),
        }
        if self.settings.heads != "dynamic":
            heads = sorted(self.heads.get(match.layer, []))
            if match.num_heads is not None and any(h >= match.num_heads for h in heads):
                raise ConfigError(f"{where}: calibrated heads {heads} exceed its {match.num_heads} query heads.")
            attrs["heads"] = heads
        name = _ir.layer_value_name(match.layer, ATTENTION)
        # the sink detection folded in: the op computes the layer's flags from its residual (only at
        # prefill under the prompt scope) and returns the row of present_sink_mask
        past_row, may_sink = self._sink_sources(values, match.layer)
        attrs.update({"sink_dims": [int(d) for d in self.settings.sink_dims], "tau": float(self.settings.tau)})
        node = ir.node(OP_TYPE, [q, k, v, mask, None, visual, match.residual, past_row, may_sink], attrs,
                       domain=DOMAIN, name=name, version=OPSET, num_outputs=2)
        out = node.outputs[0]
        out.name = name
        row = node.outputs[1]
        row.name, row.dtype, row.shape = f"{sink.name}_flags", ir.DataType.BOOL, sink.shape
        ir.convenience.replace_all_uses_with(sink, row)  # present_sink_mask reads the op's row
        old = att.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, old.shape
        b.graph.insert_after(att, node)
        ir.convenience.replace_all_uses_with(old, out)
        if old.is_graph_output():
            outputs = b.graph.outputs
            outputs[outputs.index(old)] = out
        b.graph.remove(att, safe=True)


def _drop_unused_var_nodes(graph: ir.Graph) -> int:
    """Remove ``var/`` nodes none of whose outputs is used (the graph sorted: consumers first)."""
    removed = 0
    for node in reversed(list(graph)):
        if _ir.is_var_node(node) and not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)
            removed += 1
    return removed
