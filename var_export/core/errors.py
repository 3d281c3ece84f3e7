"""The exception family of var-export.

Every error a user can cause is a ``VarExportError``: its message says what was
expected, what was found and what to do. The CLI turns it into one line on stderr
and a non-zero exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class VarExportError(Exception):
    """Base class: a user-facing error with an actionable message."""

    exit_code = 2


class ConfigError(VarExportError):
    """A knob, preset or command-line value is out of range or unknown."""


class ModelLoadError(VarExportError):
    """A model (preset, hub id, local directory) cannot be resolved or loaded."""


class DataError(VarExportError):
    """Calibration or runtime input data (images, prompts) is missing or unreadable."""


class CalibrationError(VarExportError):
    """A calibration file is invalid or belongs to another model."""


class GraphPatternError(VarExportError):
    """A graph pass did not find what it looks for (attention, residual stream, ...)."""


class AlreadyAppliedError(VarExportError):
    """VAR has already been baked into this graph."""


class UnsafeInputError(VarExportError):
    """An input would make us read outside its folder or execute untrusted code."""


class BundleError(VarExportError):
    """A bundle directory is incomplete, corrupt or inconsistent with its manifest."""


class GraphCheckError(VarExportError):
    """A graph var-export produced fails strict shape inference or an ONNX Runtime load."""


class OutputError(VarExportError):
    """An output cannot be written or replaced (not ours, unwritable, disk full, ...)."""


class InputValidationError(DataError):
    """A tensor or value handed to the runtime API has the wrong shape, dtype or range."""


class TensorRTUnavailableError(VarExportError):
    """TensorRT or a CUDA GPU is not available on this machine."""

    exit_code = 3


class ExportError(VarExportError):
    """torch.onnx could not export a graph, or the model is not LLaVA-shaped."""


class TensorRTLintError(VarExportError):
    """The graph would not parse/build in TensorRT; the message lists every error finding.

    ``report`` is a :class:`var_export.trt.LintReport` (its ``source`` and its ``errors``, each
    with ``code``, ``message`` and ``fix``).
    """

    def __init__(self, report: Any) -> None:
        self.report = report
        lines = "; ".join(f"[{f.code}] {f.message} -> {f.fix}" for f in report.errors)
        super().__init__(
            f"expected a graph the TensorRT ONNX parser accepts; {report.source} has "
            f"{len(report.errors)} blocking problem(s) ({getattr(report, 'authority', 'hand lint')}): {lines}"
        )


class MissingExtraError(VarExportError):
    """A command needs an optional dependency group (e.g. ``var-export[torch]``) not installed."""


class TensorRTBuildError(VarExportError):
    """TensorRT parsed a graph but its builder (or engine loading) failed; the message carries
    TensorRT's own error lines."""


class ServeError(VarExportError):
    """The Triton server cannot be found, started or reached (var-export serve / triton)."""


class RequestCancelled(VarExportError):
    """A served request's client went away (disconnect, cancellation) or the server stopped."""
