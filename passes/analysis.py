"""The per-layer analysis every VAR pass reads, computed once per model.

``analyze(model)`` locates the decoder layers once: the unfused form
(``locate.locate_layers``: Softmax -> probs @ V) or, when the graph holds ONNX ``Attention``
ops, the fused form (``locate_fused.locate_fused_layers``). ``apply_var`` /
``apply_fused_var`` hand the same ``VarAnalysis`` to every pass of their list; a pass run
alone, or on another model than the one analysed, locates for itself (``analysis_for``).

Locating is valid across the VAR passes: they only add ``var/`` nodes (transparent to
``locate``) and rewire the inputs of the probs @ V MatMul or the Attention node.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

from var_export.passes.locate import locate_layers
from var_export.passes.locate_fused import has_onnx_attention, locate_fused_layers

__all__ = ["VarAnalysis", "analysis_for", "analyze"]


@dataclasses.dataclass
class VarAnalysis:
    """Where VAR hooks into each decoder layer of one model."""

    model: ir.Model  # the model analysed (by identity)
    matches: dict[int, Any]  # layer -> locate.LayerMatch, or locate_fused.FusedLayerMatch when fused
    fused: bool  # the layers are ONNX Attention ops
    rejected: list[tuple[str, str]]  # Softmax nodes that are not decoder attention, with the reason

    def num_layers(self, given: int | None = None) -> int:
        """The decoder's layer count: ``given``, else the highest located layer + 1."""
        return given or max(self.matches) + 1


def analyze(model: ir.Model, *, fused: bool | None = None) -> VarAnalysis:
    """Locate every decoder layer of ``model`` (``fused``: None = by the graph's ops)."""
    if fused is None:
        fused = has_onnx_attention(model)
    if fused:
        return VarAnalysis(model, {m.layer: m for m in locate_fused_layers(model)}, True, [])
    located = locate_layers(model)
    return VarAnalysis(model, {m.layer: m for m in located.matches}, False, located.rejected)


def analysis_for(model: ir.Model, given: VarAnalysis | None) -> VarAnalysis:
    """``given`` when it was computed on ``model``, else a fresh analysis."""
    if given is not None and given.model is model:
        return given
    return analyze(model, fused=None if given is None else given.fused)
