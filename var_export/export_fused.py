"""The *fused* decoder export: SDPA attention at opset 23 -> the ONNX ``Attention`` op.

The fastest graph without VAR that torch.onnx produces for a LLaMA-family decoder: each layer's
``MatMul -> Softmax -> MatMul`` becomes one ``Attention`` node (opset 23; ``RotaryEmbedding`` and
``RMSNormalization`` come with it). It is the baseline VAR is priced against (``var-export bench``)
and the input of the fused VAR formulation (``passes/fused_var.py``).

Same wrapper, IO names and dynamic axes as :func:`var_export.export.export_decoder`; only the
attention implementation and the opset differ. (``export.py`` could take ``fused=True`` and do
exactly this: swap ``_eager_attention`` for :func:`_sdpa_attention` and default the opset to 23.)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from var_export import export as _export
from var_export.errors import ConfigError

log = logging.getLogger(__name__)

FUSED_OPSET = 23  # first opset with Attention / RotaryEmbedding / RMSNormalization


@contextlib.contextmanager
def _sdpa_attention(model: Any) -> Iterator[None]:
    """Force SDPA attention in the language model (torch exports it to ONNX ``Attention``)."""
    configs: list[tuple[Any, Any]] = []
    for cfg in (model.config, model.config.get_text_config(decoder=True)):
        if all(cfg is not c for c, _ in configs):
            configs.append((cfg, getattr(cfg, "_attn_implementation", None)))
    try:
        for cfg, _ in configs:
            cfg._attn_implementation = "sdpa"
        yield
    finally:
        for cfg, old in configs:
            cfg._attn_implementation = old


def export_decoder_fused(
    model: Any,
    path: Path,
    *,
    dtype: str = "fp32",
    opset: int = FUSED_OPSET,
    external_data: bool | None = None,
) -> tuple[list[Path], float]:
    """Export ``decoder_model_merged.onnx`` with SDPA attention (ONNX ``Attention`` op).

    Same contract as :func:`var_export.export.export_decoder`. Returns (external data files, seconds).
    """
    if int(opset) < FUSED_OPSET:
        raise ConfigError(
            f"the fused export needs opset >= {FUSED_OPSET} (ONNX Attention op), found {opset}. "
            "Use var_export.export.export_decoder for older opsets."
        )
    # export_decoder forces eager attention with _eager_attention; swap it for SDPA while it runs.
    original = _export._eager_attention
    _export._eager_attention = _sdpa_attention  # type: ignore[assignment]
    try:
        return _export.export_decoder(
            model, path, dtype=dtype, opset=opset, external_data=external_data
        )
    finally:
        _export._eager_attention = original  # type: ignore[assignment]
