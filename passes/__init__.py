"""ONNX graph passes that bake VAR into an exported decoder (onnx-ir; never imports torch)."""

from __future__ import annotations

from var_export.passes.analysis import VarAnalysis, analyze
from var_export.passes.class_masses import ClassMassesPass
from var_export.passes.finalize import FinalizePass, check_not_applied
from var_export.passes.head_selection import HeadSelectionPass
from var_export.passes.locate import LayerMatch, LocateResult, locate_layers
from var_export.passes.pipeline import LayerReport, VarReport, apply_var, load_model, save_model
from var_export.passes.redistribution import RedistributionPass
from var_export.passes.sink_detection import SinkDetectionPass

__all__ = [
    "ClassMassesPass",
    "FinalizePass",
    "HeadSelectionPass",
    "LayerMatch",
    "LayerReport",
    "LocateResult",
    "RedistributionPass",
    "SinkDetectionPass",
    "VarAnalysis",
    "VarReport",
    "analyze",
    "apply_var",
    "check_not_applied",
    "load_model",
    "locate_layers",
    "save_model",
]
