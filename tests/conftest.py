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
def tiny_var_bundle(tmp_path_factory, tiny_llava_path):
    """A tiny-llava VAR bundle (hybrid, the planted heads, layers 2:) with its processor, and an
    image: what the serving tests generate from. Built once per session."""
    import onnx_ir as ir
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from var_export.bundle import write_bundle
    from var_export.calibration.tiny_llava import (
        PLANTED_IMAGE_CENTRIC_HEADS,
        PLANTED_MIXED_HEADS,
        TINY_SINK_DIMS,
        synthetic_images,
    )
    from var_export.core.contract import DECODER
    from var_export.core.settings import VarSettings
    from var_export.export import export_graphs
    from var_export.hf_layout import hf_config_files
    from var_export.passes.pipeline import apply_var, save_model

    heads = sorted(PLANTED_IMAGE_CENTRIC_HEADS + PLANTED_MIXED_HEADS)
    settings = VarSettings(sink_dims=TINY_SINK_DIMS, heads="hybrid", layers="2:")
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    tmp = tmp_path_factory.mktemp("tiny_var_bundle")
    exported = export_graphs(model, tmp / "graphs")
    var_model, report = apply_var(ir.load(str(exported.decoder)), settings, heads, num_layers=exported.num_layers)
    (tmp / "var").mkdir()
    save_model(var_model, tmp / "var" / DECODER)
    bundle = write_bundle(
        tmp / "bundle", graphs={**exported.paths, DECODER: tmp / "var" / DECODER}, processor=processor,
        calibration=None, extra_files=hf_config_files(model.config, tmp / "hf"),
        manifest_fields={"model_id": "tiny-llava", "fingerprint": {"test": 1}, "opset": exported.opset,
                         "var": settings.to_dict(), "var_layers": report.var_layers, "head_mode": "hybrid",
                         "heads": [list(h) for h in heads]},
    )
    images = []
    for i, im in enumerate(synthetic_images(3, seed=7)):
        images.append(tmp / f"image{i}.png")
        im.save(images[-1])
    return {"bundle": bundle, "images": images}
