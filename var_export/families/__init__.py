"""Model families: one :class:`~var_export.families.base.ModelFamily` per architecture.

Importing this package registers the built-in families (torch is not imported).
"""

from __future__ import annotations

from var_export.families.base import (
    DecoderParts,
    ModelFamily,
    VisionExport,
    family_for_model_type,
    family_of,
    register,
    supported_model_types,
)
from var_export.families.internvl import INTERNVL
from var_export.families.llava import LLAVA
from var_export.families.llava_next import LLAVA_NEXT, LLAVA_ONEVISION
from var_export.families.qwen import QWEN2_5_VL, QWEN2_VL

__all__ = [
    "INTERNVL",
    "LLAVA",
    "LLAVA_NEXT",
    "LLAVA_ONEVISION",
    "QWEN2_5_VL",
    "QWEN2_VL",
    "DecoderParts",
    "ModelFamily",
    "VisionExport",
    "family_for_model_type",
    "family_of",
    "register",
    "supported_model_types",
]
