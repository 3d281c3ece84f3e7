"""Shared fixtures: the embedded tiny-llava is built once per machine (cached) and loaded once per session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_llava_path():
    from var_export.calibration.tiny_llava import tiny_llava_dir

    return tiny_llava_dir()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llava_path):
    from var_export.models import load_llava, resolve_model

    return load_llava(resolve_model("tiny-llava"))
