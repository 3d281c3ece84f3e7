"""Model presets, as data: one JSON file per preset in this folder.

A preset names the HF model (``hf_id``), its sink dimensions and the default VAR
knobs. Presets with ``"verified": false`` have sink dims that nobody has checked
against the real weights; calibration re-detects them and warns on disagreement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).resolve().parent


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any] | None:
    """The preset called ``name``, or None when there is no such preset."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())
