"""Qwen2-VL / Qwen2.5-VL (filled in by the qwen helper)."""

from __future__ import annotations

from var_export.families.base import ModelFamily, register


class QwenVLFamily(ModelFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    mrope = True
    vision_inputs = ("pixel_values", "image_grid_thw")
    processor_keys = ("image_grid_thw", "mm_token_type_ids")


class Qwen2VLFamily(QwenVLFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)


QWEN2_5_VL = register(QwenVLFamily())
QWEN2_VL = register(Qwen2VLFamily())
