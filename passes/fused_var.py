"""VAR on graphs with the fused ONNX ``Attention`` op (opset 23), keeping attention fused.

On a selected row VAR multiplies three key classes by row constants m (DESIGN.md §1), so
``a' = softmax(scores + log m)``. The fused formulation is a list of small passes, sharing
sink detection, head selection and the row constants with the unfused one (``apply_var``):

    analyze (locate_fused_layers, once)
    -> SinkDetectionPass       var/L{l}/sink                                  (shared)
    -> FusedClassMassesPass    class masses from a second Attention whose value is the
                               one-hot key classes padded to the head size
    -> HeadSelectionPass       var/L{l}/selected                              (shared)
    -> QKShiftPass | MaskShiftPass
                               log(row_scale) into the layer's own Attention: extra Q/K
                               columns (``qk``) or an additive mask (``mask``)
    -> FinalizePass

Rows that are not selected get exactly 0 added, so the change is exact there too. The
visual non-sink mass is a class column of its own (no ``image - visual_sink`` cancellation).
Validation is ``passes.pipeline.plan_var``, as ``apply_var``.

``shift="kernel"`` is the kernel formulation on the same analysis: SinkDetectionPass, then
``KernelAttentionPass`` (passes/kernel_attention.py) replaces each changed layer's Attention
by one ``var_export::VarAttention`` custom-op node (ONNX Runtime CPU, fp32).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import onnx_ir as ir

from var_export.core.errors import ConfigError
from var_export.core.settings import VarSettings
from var_export.passes import _ir
from var_export.passes.analysis import VarAnalysis, analyze
from var_export.passes.finalize import FinalizePass, check_not_applied
from var_export.passes.fused_class_masses import FusedClassMassesPass
from var_export.passes.head_selection import HeadSelectionPass
from var_export.passes.kernel_attention import KernelAttentionPass, kernel_attention_nodes
from var_export.passes.locate_fused import FusedLayerMatch, locate_fused_layers
from var_export.passes.pipeline import plan_var, run_passes
from var_export.passes.score_shift import MaskShiftPass, QKShiftPass
from var_export.passes.sink_detection import SinkDetectionPass

__all__ = [
    "FusedLayerMatch",
    "FusedVarReport",
    "SHIFTS",
    "apply_fused_var",
    "fused_var_passes",
    "locate_fused_layers",
]

logger = logging.getLogger(__name__)

Shift = Literal["qk", "mask", "kernel"]
SHIFT_PASSES = {"qk": QKShiftPass, "mask": MaskShiftPass}
SHIFTS: tuple[str, ...] = (*SHIFT_PASSES, "kernel")


def fused_var_passes(
    settings: VarSettings,
    heads: list[tuple[int, int]] | None,
    *,
    num_layers: int,
    shift: Shift = "qk",
    analysis: VarAnalysis | None = None,
) -> list[ir.passes.PassBase]:
    """The fused formulation's VAR passes (without FinalizePass), in order."""
    if shift not in SHIFTS:
        raise ConfigError(f"shift must be one of {SHIFTS}, found {shift!r}.")
    shared = {"num_layers": num_layers, "analysis": analysis}
    if shift == "kernel":
        return [SinkDetectionPass(settings, **shared), KernelAttentionPass(settings, heads, **shared)]
    return [
        SinkDetectionPass(settings, **shared),
        FusedClassMassesPass(settings, heads, **shared),
        HeadSelectionPass(settings, heads, **shared),
        SHIFT_PASSES[shift](settings, **shared),
    ]


@dataclasses.dataclass
class FusedVarReport:
    var_layers: list[int]  # VAR layers, in present_sink_mask order
    num_layers: int
    head_mode: str
    shift: str  # "qk", "mask" or "kernel"
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
    if shift not in SHIFTS:
        raise ConfigError(f"shift must be one of {SHIFTS}, found {shift!r}.")
    if not inplace:
        model = model.clone()
    analysis = analyze(model, fused=True)
    matches = analysis.matches
    plan = plan_var(settings, heads, matches, num_layers=num_layers, what="Attention node")
    before = model.graph.num_nodes()
    passes = fused_var_passes(settings, plan.heads, num_layers=plan.num_layers, shift=shift, analysis=analysis)
    run_passes(model, [*passes, FinalizePass(settings, plan.var_layers, plan.heads, check=check)])
    values = _ir.value_map(model.graph)
    if shift == "kernel":
        changed = sorted(set(plan.var_layers) & set(kernel_attention_nodes(model)))
    else:
        changed = [la for la in plan.var_layers if _ir.layer_value_name(la, "selected") in values]
    model.metadata_props["var_export.formulation"] = "kernel" if shift == "kernel" else f"fused-{shift}"
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
