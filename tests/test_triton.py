"""Triton model repository (ORT backend) written from a bundle."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from var_export.core.errors import BundleError, ConfigError
from var_export.triton import ONNX_TO_TRITON, config_pbtxt, write_triton_repository

D = 64  # LlamaSpec().hidden


def _vision_and_embed(tmp) -> tuple:
    """Hand-written stand-ins with the contract's I/O (the decoder is a real dynamo export)."""
    w = onnx.numpy_helper.from_array(np.ones((3, D), np.float32), "w")
    vision = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("ReduceMean", ["pixel_values"], ["pooled"], axes=[2, 3], keepdims=0),
                helper.make_node("MatMul", ["pooled", "w"], ["row"]),
                helper.make_node("Unsqueeze", ["row", "one"], ["image_features"]),
            ],
            "vision",
            [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
            [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", 1, D])],
            initializer=[w, onnx.numpy_helper.from_array(np.array([1], np.int64), "one")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    table = onnx.numpy_helper.from_array(np.zeros((96, D), np.float32), "table")
    embed = helper.make_model(
        helper.make_graph(
            [helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"])],
            "embed",
            [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
            [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch", "sequence", D])],
            initializer=[table],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    paths = []
    for name, m in (("vision_encoder.onnx", vision), ("embed_tokens.onnx", embed)):
        m.ir_version = 8
        onnx.save(m, str(tmp / name))
        paths.append(tmp / name)
    return tuple(paths)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from passes_fixtures import LlamaSpec, export_tiny_llama

    from var_export.bundle import load_bundle, write_bundle
    from var_export.core.settings import VarSettings
    from var_export.passes.pipeline import apply_var, save_model

    tmp = tmp_path_factory.mktemp("triton")
    spec = LlamaSpec()
    plain = export_tiny_llama(tmp / "plain.onnx", spec)
    settings = VarSettings(sink_dims=(1,), heads="dynamic", layers="1:")
    model, report = apply_var(ir.load(str(plain)), settings, None, num_layers=spec.layers)
    (tmp / "var").mkdir()
    decoder = tmp / "var" / "decoder_model_merged.onnx"
    save_model(model, decoder, external_data="decoder_model_merged.onnx.data")  # weights outside
    vision, embed = _vision_and_embed(tmp)
    out = write_bundle(
        tmp / "bundle",
        graphs={"vision_encoder.onnx": vision, "embed_tokens.onnx": embed, "decoder_model_merged.onnx": decoder},
        manifest_fields={"model_id": "test", "fingerprint": {"t": 1}, "var": settings.to_dict(),
                         "var_layers": report.var_layers},
        calibration=None,
    )
    return load_bundle(out)


def _parse(config: str) -> tuple[str, dict[str, tuple[str, list[int]]], dict[str, tuple[str, list[int]]]]:
    name = re.search(r'^name: "([^"]+)"', config, re.M).group(1)
    sections = {}
    for kind in ("input", "output"):
        body = re.search(rf"^{kind} \[\n(.*?)\n\]", config, re.S | re.M).group(1)
        entries = re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[ ([^\]]*) \]', body)
        sections[kind] = {n: (t, [int(d) for d in dims.split(", ")]) for n, t, dims in entries}
    return name, sections["input"], sections["output"]


def _expected(path) -> tuple[dict, dict]:
    m = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in m.graph.initializer}

    def conv(vi):
        tt = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
        return ONNX_TO_TRITON[tt.elem_type], dims

    return (
        {vi.name: conv(vi) for vi in m.graph.input if vi.name not in init},
        {vi.name: conv(vi) for vi in m.graph.output},
    )


def test_repository_lists_every_graph_io_with_types(bundle, tmp_path):
    out = write_triton_repository(bundle, tmp_path / "repo", instance_kind="KIND_CPU")
    assert sorted(p.name for p in out.iterdir()) == [".var-export-owned", "decoder", "embed_tokens", "manifest.json", "vision_encoder"]
    for file_name, model_name in (
        ("decoder_model_merged.onnx", "decoder"),
        ("embed_tokens.onnx", "embed_tokens"),
        ("vision_encoder.onnx", "vision_encoder"),
    ):
        config = (out / model_name / "config.pbtxt").read_text()
        assert 'backend: "onnxruntime"' in config and "max_batch_size: 0" in config
        assert "kind: KIND_CPU" in config
        name, inputs, outputs = _parse(config)
        exp_in, exp_out = _expected(bundle.graphs[file_name])
        assert name == model_name
        assert inputs == exp_in and outputs == exp_out
        assert list(inputs) == bundle.io(file_name)["inputs"]
        assert list(outputs) == bundle.io(file_name)["outputs"]
        assert (out / model_name / "1" / "model.onnx").is_file()

    _, inputs, outputs = _parse((out / "decoder" / "config.pbtxt").read_text())
    assert inputs["attention_mask"] == ("TYPE_INT64", [-1, -1])
    assert inputs["visual_token_mask"] == ("TYPE_BOOL", [-1, -1])
    assert inputs["past_sink_mask"][0] == "TYPE_BOOL" and inputs["past_sink_mask"][1][0] == -1
    assert inputs["inputs_embeds"] == ("TYPE_FP32", [-1, -1, D])
    assert outputs["present_sink_mask"][0] == "TYPE_BOOL"
    assert outputs["logits"][0] == "TYPE_FP32"
    assert inputs["past_key_values.0.key"][1][:1] == [-1] and inputs["past_key_values.0.key"][1][3] > 0


def test_decoder_external_data_travels_and_loads(bundle, tmp_path):
    out = write_triton_repository(bundle, tmp_path / "repo", link=True)
    version = out / "decoder" / "1"
    assert (version / "decoder_model_merged.onnx.data").is_file()
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "visual_token_mask" in [i.name for i in session.get_inputs()]
    assert "instance_group" not in (out / "decoder" / "config.pbtxt").read_text()


def test_refuses_non_empty_out_and_bad_bundle(bundle, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="has files"):
        write_triton_repository(bundle, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "mine"
    with pytest.raises(ConfigError, match="instance_kind"):
        write_triton_repository(bundle, tmp_path / "r", instance_kind="GPU")
    with pytest.raises(BundleError):
        write_triton_repository(tmp_path / "not_a_bundle", tmp_path / "r2")
    assert not (tmp_path / "r2").exists()


def test_config_text_format():
    text = config_pbtxt("m", [("a", "TYPE_FP16", [-1, 4])], [("b", "TYPE_BOOL", [2])])
    assert text.splitlines()[:4] == ['name: "m"', 'backend: "onnxruntime"', "max_batch_size: 0", 'default_model_filename: "model.onnx"']
    assert '    name: "a"\n    data_type: TYPE_FP16\n    dims: [ -1, 4 ]' in text
