"""Never write a graph that does not load: strict ONNX shape inference + an ONNX Runtime load.

:func:`verify_graph` runs on every graph var-export writes (bundle graphs, rewrite outputs)
*before* it replaces anything. It reads weights (ONNX Runtime must), so callers that write huge
graphs can opt out explicitly (``verify=False``), never silently.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from var_export.core.errors import GraphCheckError

__all__ = ["verify_graph"]

log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


def verify_graph(path: str | os.PathLike[str], *, ort_load: bool = True) -> None:
    """Raise ``GraphCheckError`` unless ``path`` passes strict ONNX shape inference (with data
    propagation) and, with ``ort_load``, loads in an ONNX Runtime CPU session."""
    import onnx

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=".var-export-verify-", dir=path.parent) as tmp:
        try:
            onnx.shape_inference.infer_shapes_path(
                os.fspath(path), os.fspath(Path(tmp) / "inferred.onnx"), check_type=True,
                strict_mode=True, data_prop=True,
            )
        except Exception as exc:  # onnx raises InferenceError / ValidationError / RuntimeError
            raise GraphCheckError(
                f"{path.name} fails strict ONNX shape inference ({_first_line(exc)}); it was not "
                "written. This is a var-export bug for this graph: report it with the command line."
            ) from exc
    if not ort_load:
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    from var_export import kernels

    options = kernels.session_options(path, options)  # VarAttention when the graph has it
    try:
        ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's Fail / InvalidGraph / RuntimeException
        raise GraphCheckError(
            f"{path.name} does not load in ONNX Runtime ({_first_line(exc)}); it was not written. "
            "This is a var-export bug for this graph: report it with the command line."
        ) from exc
    log.debug("verified %s (strict shape inference, ONNX Runtime load)", path)
