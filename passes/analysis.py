"""The per-layer analysis every VAR pass reads, computed once per model.

``analyze(model)`` locates the decoder layers once: the unfused form
(``locate.locate_layers``: Softmax -> probs @ V) or, when the graph holds ONNX ``Attention``
ops, the fused form (``locate_fused.locate_fused_layers``). ``apply_var`` /
``apply_fused_var`` hand the same ``VarAnalysis`` to every pass of their list; a pass run
alone, or on another model than the one analysed, locates for itself (``analysis_for``).

Locating is valid across the VAR passes: they only add ``var/`` nodes (transparent to
``locate``) and rewire the inputs of the probs @ V MatMul or the Attention node.

``VarLayerPass`` is what the VAR passes share: the constructor (settings, calibrated heads,
layer count, analysis) and the walk over the layers of the shared analysis that still need
the pass (``pending``), building each (``build_layer``) and sorting the graph once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import onnx_ir as ir

from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes._ir import Builder
from var_export.passes.builders import calibrated_heads, changed_layers
from var_export.passes.locate import locate_layers
from var_export.passes.locate_fused import has_onnx_attention, locate_fused_layers

__all__ = ["CalibratedLayerPass", "VarAnalysis", "VarLayerPass", "analysis_for", "analyze"]


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


class VarLayerPass(ir.passes.InPlacePass):
    """A VAR pass that builds ``var/L{l}/...`` values layer by layer on the shared analysis.

    ``call`` visits ``layers`` (every VAR layer), keeps those still ``pending`` (not built by
    an earlier run), builds the graph-level values they share once (``prepare``), then each
    layer (``build_layer``) under the ``var/L{l}`` prefix, and sorts the graph once.
    """

    def __init__(
        self, settings: VarSettings, *, num_layers: int | None = None, analysis: VarAnalysis | None = None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.num_layers = num_layers
        self.analysis = analysis

    def layers(self, analysis: VarAnalysis) -> list[int]:
        """The layers this pass may change: every VAR layer."""
        return self.settings.var_layers(analysis.num_layers(self.num_layers))

    def pending(self, layer: int, analysis: VarAnalysis, values: dict[str, ir.Value]) -> bool:
        """``layer`` still needs this pass (``values``: the graph's values before the pass)."""
        raise NotImplementedError

    def prepare(self, graph: ir.Graph) -> Any:  # noqa: ANN401 - whatever the pass's layers share
        """Graph-level values every pending layer reads (built once, only when one is pending)."""
        return None

    def build_layer(self, b: Builder, match: Any, values: dict[str, ir.Value], shared: Any) -> None:  # noqa: ANN401
        """Build this pass's values for one layer (``match``: its entry in the analysis)."""
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        analysis = analysis_for(model, self.analysis)
        values = _ir.value_map(graph)
        todo = [layer for layer in self.layers(analysis) if self.pending(layer, analysis, values)]
        if not todo:
            return ir.passes.PassResult(model, modified=False)
        shared = self.prepare(graph)
        for layer in todo:
            self.build_layer(Builder(graph, f"var/L{layer}"), analysis.matches[layer], values, shared)
        graph.sort()
        return ir.passes.PassResult(model, modified=True)


class CalibratedLayerPass(VarLayerPass):
    """A ``VarLayerPass`` that changes only the layers VAR changes: in static/hybrid mode those
    with a calibrated head (``heads``: the calibrated (layer, head) list; None in dynamic mode)."""

    def __init__(
        self,
        settings: VarSettings,
        heads: Iterable[tuple[int, int]] | None = None,
        *,
        num_layers: int | None = None,
        analysis: VarAnalysis | None = None,
    ) -> None:
        super().__init__(settings, num_layers=num_layers, analysis=analysis)
        self.heads = calibrated_heads(settings.heads, heads)

    def layers(self, analysis: VarAnalysis) -> list[int]:
        """The VAR layers with a calibrated head (every VAR layer in dynamic mode)."""
        return changed_layers(self.settings, self.heads, analysis.num_layers(self.num_layers))
