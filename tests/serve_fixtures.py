"""Shared by the family serving tests (test_serve_families.py, test_triton_families.py): the
session's bundle of a family and three PNGs of different sizes for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

PROMPTS = ("What is in the picture?", "Describe the red square and the picture in words.", "Colors?")
# three image sizes per family: three different numbers of image tokens (test_serve_families asserts it)
QWEN_SIZES = ((64, 64), (48, 80), (32, 96))  # (H, W)
NEXT_SIZES = ((64, 64), (80, 48), (40, 32))  # (W, H), LLaVA-NeXT / OneVision
INTERNVL_SIZES = ((128, 128), (160, 64), (64, 64))  # (W, H): 4 + thumbnail, 2 + thumbnail, 1 tile
FAMILIES = {  # test id -> manifest family
    "qwen": "qwen2_5_vl",
    "llava-next": "llava_next",
    "llava-onevision": "llava_onevision",
    "internvl": "internvl",
}
# the default run serves these two; OneVision and InternVL export a second decoder (slow marks)
DEFAULT_FAMILIES = ("qwen", "llava-next")


def family_bundle(request: Any, name: str) -> Path:
    """The session fixture's bundle of ``name`` (conftest: tiny_qwen_bundle, tiled); no export here."""
    if name == "qwen":
        return request.getfixturevalue("tiny_qwen_bundle")
    return request.getfixturevalue("tiled")(f"tiny-{name}").bundle


def family_images(name: str, folder: Path) -> list[Path]:
    """Three PNGs of different sizes for the family ``name`` (a key of FAMILIES)."""
    if name == "qwen":
        from var_export.calibration import tiny_qwen as tq

        images = tq.synthetic_images(3, seed=7, sizes=QWEN_SIZES)
    else:
        from var_export.calibration import tiny_anyres as ta

        images = ta.synthetic_images(3, seed=7, sizes=INTERNVL_SIZES if name == "internvl" else NEXT_SIZES)
    paths = []
    for i, im in enumerate(images):
        paths.append(folder / f"{name}-{i}.png")
        im.save(paths[-1])
    return paths


def family_params() -> list[Any]:
    """pytest params over FAMILIES: the default two, then OneVision and InternVL marked slow."""
    return [name if name in DEFAULT_FAMILIES else pytest.param(name, marks=pytest.mark.slow) for name in FAMILIES]
