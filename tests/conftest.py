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


class _TinyTrtGraphs:
    """tiny-llava graphs for the TensorRT tests, each exported on first use (then shared):
    ``vision_encoder``, ``embed_tokens`` (fp32) and the decoders ``{naive, fused, fp16}-{novar,
    var}`` (VAR hybrid with the planted heads; fused = SDPA export, ONNX Attention, opset 23)."""

    def __init__(self, out, model):
        self.out, self.model, self.paths = out, model, {}

    def __getitem__(self, name):
        if name not in self.paths:
            form = name.split("-")[0]
            if form in ("vision_encoder", "embed_tokens"):
                self._export_small(name)
            else:
                self._export_decoders(form)
        return self.paths[name]

    def _export_small(self, name):
        from var_export import export

        path = self.out / f"{name}.onnx"
        getattr(export, f"export_{name}")(self.model, path)
        self.paths[name] = path

    def _export_decoders(self, form):
        import onnx_ir as ir

        from var_export.calibration import tiny_llava as tl
        from var_export.core.settings import VarSettings
        from var_export.export import export_decoder
        from var_export.passes.fused_var import apply_fused_var
        from var_export.passes.pipeline import apply_var, save_model

        kw = {"naive": {}, "fused": {"fused": True}, "fp16": {"dtype": "fp16"}}[form]
        base = self.out / f"{form}-novar" / "decoder_model_merged.onnx"
        base.parent.mkdir()
        export_decoder(self.model, base, **kw)
        settings = VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads="hybrid", layers="2:")
        heads = sorted(set(tl.PLANTED_IMAGE_CENTRIC_HEADS) | set(tl.PLANTED_MIXED_HEADS))
        apply = apply_fused_var if form == "fused" else apply_var
        var_model, _ = apply(ir.load(str(base)), settings, heads, num_layers=4)
        var = self.out / f"{form}-var" / "decoder_model_merged.onnx"
        var.parent.mkdir()
        save_model(var_model, var)
        self.paths[f"{form}-novar"], self.paths[f"{form}-var"] = base, var


@pytest.fixture(scope="session")
def tiny_trt_graphs(tmp_path_factory, tiny_loaded):
    """tiny-llava's graphs for the TensorRT tests (:class:`_TinyTrtGraphs`), exported once."""
    return _TinyTrtGraphs(tmp_path_factory.mktemp("tiny_trt"), tiny_loaded.model)


@pytest.fixture(scope="session")
def tiny_llama_var_decoder(tmp_path_factory):
    """A dynamo-exported LLaMA decoder (decoder contract I/O, passes_fixtures.LlamaSpec()) with
    VAR baked in (dynamic heads, sink dim 1, layers 1:), shared by the TensorRT tests."""
    import onnx_ir as ir
    from passes_fixtures import LlamaSpec, export_tiny_llama

    from var_export.core.settings import VarSettings
    from var_export.passes.pipeline import apply_var, save_model

    tmp = tmp_path_factory.mktemp("trt_llama")
    spec = LlamaSpec()
    plain = export_tiny_llama(tmp / "plain.onnx", spec)
    settings = VarSettings(sink_dims=(1,), heads="dynamic", layers="1:")
    model, _ = apply_var(ir.load(str(plain)), settings, None, num_layers=spec.layers)
    out = tmp / "decoder_model_merged.onnx"
    save_model(model, out)
    return out


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
