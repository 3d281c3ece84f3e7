"""apply_var: compose the VAR passes with onnx-ir's pass manager; load/save helpers.

    analyze (locate, once) -> SinkDetectionPass -> ClassMassesPass -> HeadSelectionPass
    -> RedistributionPass -> FinalizePass

Every pass reads the same ``VarAnalysis`` and the values the earlier passes built.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from var_export.core.errors import ConfigError, GraphPatternError, VarExportError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes.analysis import analyze
from var_export.passes.builders import calibrated_heads, heads_by_layer
from var_export.passes.class_masses import ClassMassesPass
from var_export.passes.finalize import FinalizePass, check_not_applied
from var_export.passes.head_selection import HeadSelectionPass
from var_export.passes.locate import format_rejected
from var_export.passes.redistribution import RedistributionPass
from var_export.passes.sink_detection import SinkDetectionPass

__all__ = [
    "LayerReport",
    "VarPlan",
    "VarReport",
    "apply_var",
    "load_model",
    "plan_var",
    "run_passes",
    "save_model",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerReport:
    layer: int  # decoder layer index
    found: dict[str, Any]  # what locate found (LayerMatch.describe())
    sink_detection: bool  # sink flags computed here (every VAR layer)
    redistribution: bool  # head selection + redistribution nodes inserted
    heads: list[int] | None  # static/hybrid: the baked head list; None for dynamic


@dataclasses.dataclass
class VarReport:
    var_layers: list[int]  # VAR layers, in present_sink_mask order
    num_layers: int  # decoder layers of the graph
    head_mode: str  # dynamic | static | hybrid
    layers: list[LayerReport]
    ignored: list[str]  # Softmax nodes that are not decoder attention, with the reason
    nodes_added: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_var(
    model: ir.Model,
    settings: VarSettings,
    heads: list[tuple[int, int]] | None,
    *,
    num_layers: int | None = None,
    inplace: bool = False,
    check: bool = True,
) -> tuple[ir.Model, VarReport]:
    """Bake VAR into a decoder graph (DESIGN.md §1/§3/§4).

    ``heads`` is the calibrated (layer, head) list for ``settings.heads`` static/hybrid
    (ignored for dynamic). ``num_layers`` is the model's decoder layer count when the
    graph's located layers might not tell it (default: highest located layer + 1).
    Unless ``inplace``, the input model is left unchanged (weights are shared, not read).
    """
    check_not_applied(model)
    if not inplace:
        model = model.clone()
    analysis = analyze(model, fused=False)
    matches = analysis.matches
    plan = plan_var(settings, heads, matches, num_layers=num_layers, what="attention", rejected=analysis.rejected)
    before = model.graph.num_nodes()
    shared = {"num_layers": plan.num_layers, "analysis": analysis}
    run_passes(
        model,
        [
            SinkDetectionPass(settings, **shared),
            ClassMassesPass(settings, plan.heads, **shared),
            HeadSelectionPass(settings, plan.heads, **shared),
            RedistributionPass(settings, **shared),
            FinalizePass(settings, plan.var_layers, plan.heads, check=check),
        ],
    )

    values = _ir.value_map(model.graph)
    layer_reports = []
    for layer in plan.var_layers:
        changed = _ir.layer_value_name(layer, "probs_var") in values
        layer_reports.append(
            LayerReport(
                layer=layer,
                found=matches[layer].describe(),
                sink_detection=True,
                redistribution=changed,
                heads=None if settings.heads == "dynamic" else plan.by_layer.get(layer, []),
            )
        )
    report = VarReport(
        var_layers=plan.var_layers,
        num_layers=plan.num_layers,
        head_mode=settings.heads,
        layers=layer_reports,
        ignored=[f"{name}: {why}" for name, why in analysis.rejected],
        nodes_added=model.graph.num_nodes() - before,
    )
    return model, report


@dataclasses.dataclass
class VarPlan:
    """What ``apply_var`` / ``apply_fused_var`` will do, checked before any pass runs."""

    num_layers: int  # decoder layers of the model
    var_layers: list[int]  # VAR layers, in present_sink_mask order
    heads: list[tuple[int, int]] | None  # calibrated heads restricted to the VAR layers
    by_layer: dict[int, list[int]]  # the same by layer ({} for dynamic)


def plan_var(
    settings: VarSettings,
    heads: Iterable[tuple[int, int]] | None,
    matches: dict[int, Any],
    *,
    num_layers: int | None,
    what: str,
    rejected: Iterable[tuple[str, str]] = (),
) -> VarPlan:
    """Check settings, layers and heads against the located layers (``matches``: layer ->
    a match with a ``residual``); shared by both formulations. ``what`` names what was
    located ("attention", "Attention node"); ``rejected`` the candidates locate passed over."""
    heads = None if heads is None else [(int(la), int(h)) for la, h in heads]
    n_layers = num_layers if num_layers is not None else max(matches) + 1
    hidden = _hidden_size(matches.values())
    if hidden is not None:
        settings.check_model(n_layers, hidden)
    var_layers = settings.var_layers(n_layers)
    if not var_layers:
        raise ConfigError(f"--layers {settings.layers!r} selects no layer of {n_layers}.")
    missing = [layer for layer in var_layers if layer not in matches]
    if missing:
        rejected = list(rejected)
        ignored = f"\nIgnored Softmax nodes:{format_rejected(rejected)}" if rejected else ""
        raise GraphPatternError(
            f"VAR layers {missing} were not found in the graph (located {what} layers: "
            f"{sorted(matches)}). Check --layers.{ignored}"
        )
    by_layer = calibrated_heads(settings.heads, heads)
    if settings.heads == "dynamic" and heads:
        logger.info("head mode dynamic: the %d calibrated heads are not used", len(heads))
    stray = sorted(set(by_layer) - set(var_layers))
    if stray:
        logger.warning("heads listed for non-VAR layers %s are ignored", stray)
    kept = None if heads is None else [(la, h) for la, h in heads if la in var_layers]
    if stray:
        by_layer = heads_by_layer(kept)
    return VarPlan(num_layers=n_layers, var_layers=var_layers, heads=kept, by_layer=by_layer)


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> None:
    """Run ``passes`` in place; a VarExportError raised inside surfaces as itself."""
    try:
        ir.passes.PassManager(passes)(model)
    except (ir.passes.PassError, ir.passes.InvariantError) as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, VarExportError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from e
        raise


def _hidden_size(matches: Iterable[Any]) -> int | None:
    for m in matches:
        shape = m.residual.shape
        if shape is not None and len(shape) >= 1 and isinstance(shape[-1], int):
            return shape[-1]
    return None


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load an ONNX graph; external-data weights stay lazy (never read here)."""
    return ir.load(os.fspath(path))


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: str | None = None,
) -> None:
    """Save ``model``; weights that were external stay external (``<name>.data`` beside it).

    ``external_data`` names the data file (relative to ``path``'s folder); by default a
    model with any external tensor, or larger than 2 GB, gets ``<file name>.data``.
    """
    path = Path(path)
    if external_data is None and _has_external(model):
        external_data = path.name + ".data"
    ir.save(model, os.fspath(path), external_data=external_data)


def _has_external(model: ir.Model) -> bool:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            return True
        if tensor is not None:
            total += tensor.nbytes
    return total > 2 * 1024**3 - 64 * 1024**2
