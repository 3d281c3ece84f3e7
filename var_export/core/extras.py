"""Optional dependency groups (pyproject extras) and the check that names the missing one.

The core install (onnx, onnx-ir, onnxruntime, numpy, pillow, tokenizers, ...) runs ``rewrite``,
``run`` (LLaVA-1.5 bundles) and ``build-trt``; ``calibrate``, ``export``, ``inspect`` and the
whole pipeline need PyTorch and transformers: ``pip install 'var-export[torch]'``.
"""

from __future__ import annotations

import importlib.util

from var_export.core.errors import MissingExtraError

EXTRAS: dict[str, tuple[str, ...]] = {
    "torch": ("torch", "transformers"),
    "trt": ("tensorrt",),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked or broken package counts as missing
        return False


def require_extra(extra: str, what: str) -> None:
    """Raise ``MissingExtraError`` naming ``var-export[extra]`` when one of its modules is missing."""
    missing = [m for m in EXTRAS[extra] if not installed(m)]
    if missing:
        raise MissingExtraError(
            f"{what} needs {' and '.join(missing)}, which this install does not have (expected the "
            f"'{extra}' extra). Install it: pip install 'var-export[{extra}]'. The core install runs "
            "`rewrite`, `run` and `build-trt` only."
        )
