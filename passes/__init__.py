"""ONNX graph passes that bake VAR into an exported decoder (onnx-ir; never imports torch)."""

from __future__ import annotations

from passes.finalize import FinalizePass, check_not_applied
from passes.head_selection import HeadSelectionPass
from passes.locate import LayerMatch, LocateResult, locate_layers
from passes.pipeline import LayerReport, VarReport, apply_var, load_model, save_model
from passes.redistribution import RedistributionPass
from passes.sink_detection import SinkDetectionPass

__all__ = [
    "FinalizePass",
    "HeadSelectionPass",
    "LayerMatch",
    "LayerReport",
    "LocateResult",
    "RedistributionPass",
    "SinkDetectionPass",
    "VarReport",
    "apply_var",
    "check_not_applied",
    "load_model",
    "locate_layers",
    "save_model",
]
