"""The *fused* decoder export: SDPA attention at opset 23 -> the ONNX ``Attention`` op.

A thin name for :func:`var_export.export.export_decoder` with ``fused=True`` (kept for
``var_export.bench``): each layer's ``MatMul -> Softmax -> MatMul`` becomes one ``Attention``
node (opset 23; ``RotaryEmbedding`` and ``RMSNormalization`` come with it). It is the baseline
VAR is priced against (``var-export bench``) and the input of the fused VAR formulation
(``passes/fused_var.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from var_export.export import FUSED_OPSET, export_decoder

__all__ = ["FUSED_OPSET", "export_decoder_fused"]


def export_decoder_fused(
    model: Any,
    path: Path,
    *,
    dtype: str = "fp32",
    opset: int = FUSED_OPSET,
    external_data: bool | None = None,
) -> tuple[list[Path], float]:
    """``export_decoder(..., fused=True)``. Returns (external data files, seconds)."""
    return export_decoder(model, path, dtype=dtype, opset=opset, external_data=external_data, fused=True)
