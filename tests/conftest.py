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


@pytest.fixture(scope="session")
def tiny_qwen_loaded():
    """The embedded tiny Qwen2.5-VL (built once per machine, cached), loaded once per session."""
    from var_export.models import load_llava

    return load_llava("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_qwen_graphs(tiny_qwen_loaded, tmp_path_factory):
    """The three plain graphs of tiny-qwen2.5-vl, exported once per session."""
    from var_export.export import export_graphs

    return export_graphs(tiny_qwen_loaded.model, tmp_path_factory.mktemp("tiny-qwen") / "graphs")


@pytest.fixture(scope="session")
def tiled(tmp_path_factory):
    """variant -> TiledModel for tiny-llava-next, tiny-llava-onevision, tiny-internvl: loaded once, the three
    plain graphs exported once, a hybrid VAR bundle written once (lazily, per variant)."""
    from tests.tiled_fixtures import TiledModel

    cache: dict[str, TiledModel] = {}

    def get(variant: str) -> TiledModel:
        if variant not in cache:
            cache[variant] = TiledModel(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get
