"""TensorRT lint (no TensorRT needed), profile construction, and build_engine without TensorRT."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from var_export import trt
from var_export.core.errors import BundleError, ConfigError, TensorRTUnavailableError

# ---------------------------------------------------------------- tiny graphs


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _static_model() -> onnx.ModelProto:
    """x [2,4] float -> Softmax(x * 2): everything TensorRT likes."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    return _model(
        [
            helper.make_node("Mul", ["x", "two"], ["y"], name="mul"),
            helper.make_node("Softmax", ["y"], ["z"], name="softmax", axis=-1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])],
        [two],
    )


def _nonzero_model() -> onnx.ModelProto:
    return _model(
        [helper.make_node("NonZero", ["x"], ["idx"], name="nz")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [2, None])],
    )


def _scatternd_model(node_name: str) -> onnx.ModelProto:
    idx = helper.make_tensor("idx", TensorProto.INT64, [1, 1], [0])
    upd = helper.make_tensor("upd", TensorProto.FLOAT, [1, 4], [1.0] * 4)
    return _model(
        [helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], name=node_name)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [idx, upd],
    )


def _loop_model() -> onnx.ModelProto:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "acc_in"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2]),
        ],
    )
    trip = helper.make_tensor("trip", TensorProto.INT64, [], [3])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    return _model(
        [helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="loop", body=body)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [trip, cond],
    )


# ---------------------------------------------------------------- lint


def test_lint_static_graph_is_clean():
    report = trt.lint_for_tensorrt(_static_model())
    assert report.ok, report.format()
    assert report.findings == []
    assert report.op_counts == {"Mul": 1, "Softmax": 1}
    assert report.dynamic_inputs == {}


@pytest.mark.parametrize(
    ("model", "code", "op"),
    [
        (_nonzero_model(), "data-dependent-shape", "NonZero"),
        (_loop_model(), "data-dependent-shape", "Loop"),
        (_scatternd_model("var/L2/scatter"), "var-forbidden-op", "ScatterND"),
    ],
)
def test_lint_rejects_data_dependent_and_var_forbidden_ops(model, code, op):
    report = trt.lint_for_tensorrt(model)
    assert not report.ok
    errors = [f for f in report.errors if f.code == code]
    assert errors and op in errors[0].message, report.format()
    assert errors[0].fix  # says what to do
    with pytest.raises(trt.TensorRTLintError, match=op):
        report.raise_if_errors()


def test_lint_scatternd_outside_var_nodes_is_allowed():
    # The parser has ScatterND; only the VAR nodes must avoid it (DESIGN.md §3).
    assert trt.lint_for_tensorrt(_scatternd_model("exporter/scatter")).ok


def test_lint_walks_subgraphs():
    report = trt.lint_for_tensorrt(_loop_model())
    assert report.op_counts["Identity"] == 1 and report.op_counts["Add"] == 1


def test_lint_unsupported_custom_and_opset():
    model = _model(
        [
            helper.make_node("Unique", ["x"], ["u"], name="uniq"),
            helper.make_node("StringNormalizer", ["s"], ["s2"], name="strnorm"),
            helper.make_node("GroupQueryAttention", ["x"], ["g"], name="gqa", domain="com.microsoft"),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("s", TensorProto.STRING, [4]),
        ],
        [
            helper.make_tensor_value_info("u", TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info("s2", TensorProto.STRING, [4]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [4]),
        ],
        opset=24,
    )
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    report = trt.lint_for_tensorrt(model)
    codes = report.codes()
    assert {"unsupported-op", "custom-domain-op", "data-dependent-shape", "opset", "io-dtype"} <= codes
    unsupported = " ".join(f.message for f in report.errors if f.code == "unsupported-op")
    assert "StringNormalizer" in unsupported and "Unique" in unsupported
    assert [f.severity for f in report.findings if f.code == "opset"] == ["warning"]


def test_lint_reports_bool_int64_dynamic_and_external_data(tmp_path):
    w = onnx.numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
            helper.make_node("Cast", ["mask"], ["mask_f"], name="cast", to=TensorProto.FLOAT),
            helper.make_node("Cast", ["ids"], ["ids_f"], name="cast2", to=TensorProto.FLOAT),
            helper.make_node("Not", ["mask"], ["mask_out"], name="not"),
        ],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "total_sequence"]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4]),
            helper.make_tensor_value_info("mask_out", TensorProto.BOOL, ["batch", "total_sequence"]),
        ],
        [w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    report = trt.lint_for_tensorrt(path)
    assert report.ok, report.format()
    by_code = {f.code: f for f in report.findings}
    assert "mask" in by_code["bool-io"].message and "mask_out" in by_code["bool-io"].message
    assert "ids" in by_code["int64"].message
    assert "m.onnx.data" in by_code["external-data"].message
    assert set(report.dynamic_inputs) == {"x", "mask", "ids"}
    assert report.dynamic_inputs["mask"] == ["batch", "total_sequence"]


def test_lint_missing_and_corrupt_file(tmp_path):
    with pytest.raises(BundleError, match="found nothing"):
        trt.lint_for_tensorrt(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a protobuf\xff" * 10)
    with pytest.raises(BundleError, match="could not be read"):
        trt.lint_for_tensorrt(bad)


@pytest.fixture
def var_decoder(tiny_llama_var_decoder) -> Path:
    return tiny_llama_var_decoder


def test_lint_passes_on_our_var_decoder(var_decoder):
    report = trt.lint_for_tensorrt(var_decoder)
    assert report.ok, report.format()
    proto = onnx.load(str(var_decoder), load_external_data=False)
    var_ops = {n.op_type for n in proto.graph.node if n.name.startswith("var/")}
    assert var_ops and not var_ops & trt.VAR_FORBIDDEN_OPS
    assert {"visual_token_mask", "past_sink_mask"} <= set(report.dynamic_inputs)
    assert "present_sink_mask" in {f.code: f for f in report.findings}["bool-io"].message


def test_lint_rejects_our_decoder_with_a_planted_var_nonzero(var_decoder):
    proto = onnx.load(str(var_decoder), load_external_data=False)
    proto.graph.node.append(
        helper.make_node("NonZero", ["visual_token_mask"], ["var/planted/idx"], name="var/planted")
    )
    report = trt.lint_for_tensorrt(proto)
    assert [f.code for f in report.errors] == ["var-forbidden-op"]


# ---------------------------------------------------------------- profiles


def test_profiles_follow_the_decoder_contract(var_decoder):
    shapes = trt.graph_input_shapes(var_decoder)
    limits = trt.ProfileLimits.from_max(max_batch=3, max_seq=64, max_past=100)
    (profile,) = trt.make_profiles(shapes, limits)
    hidden = shapes["inputs_embeds"][2]
    assert isinstance(hidden, int)
    assert profile["inputs_embeds"] == ((1, 1, hidden), (1, 1, hidden), (3, 64, hidden))
    assert profile["attention_mask"] == ((1, 1), (1, 51), (3, 164))
    assert profile["position_ids"] == ((1, 1), (1, 1), (3, 64))
    assert profile["visual_token_mask"] == profile["attention_mask"]
    kv = profile["past_key_values.0.key"]
    assert kv[0][2] == 0 and kv[1][2] == 50 and kv[2][2] == 100 and kv[2][0] == 3
    assert kv[0][1] == kv[2][1] == shapes["past_key_values.0.key"][1]  # KV heads stay static
    lv = shapes["past_sink_mask"][1]
    assert profile["past_sink_mask"] == ((1, lv, 0), (1, lv, 50), (3, lv, 100))
    assert set(profile) == {n for n, s in shapes.items() if not all(isinstance(d, int) for d in s)}


def test_profiles_by_symbol_name_static_inputs_and_errors():
    shapes = {"pixel_values": ["batch", 3, 336, 336], "foo": ["batch_size", 7], "w": [4, 4]}
    (p,) = trt.make_profiles(shapes, trt.ProfileLimits(batch=(1, 2, 8)))
    assert p == {
        "pixel_values": ((1, 3, 336, 336), (2, 3, 336, 336), (8, 3, 336, 336)),
        "foo": ((1, 7), (2, 7), (8, 7)),
    }
    two = trt.make_profiles({"input_ids": ["b", "s"]}, [trt.ProfileLimits(), trt.ProfileLimits(sequence=(1, 8, 16))])
    assert [pr["input_ids"][2] for pr in two] == [(4, 1024), (4, 16)]
    with pytest.raises(ConfigError, match="no known role"):
        trt.make_profiles({"mystery": ["n", 4]})
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        trt.ProfileLimits(sequence=(4, 2, 8))
    with pytest.raises(ConfigError, match="--max-batch"):
        trt.ProfileLimits.from_max(max_batch=0)


# ---------------------------------------------------------------- flavours, limits, untrusted graphs


def test_profiles_from_the_bundle_manifest():
    lim = trt.ProfileLimits.for_bundle({"max_position_embeddings": 512})
    assert lim.batch == (1, 1, 4) and lim.sequence[2] == 512 and lim.past[2] == 511
    assert lim.total == (1, 256, 512)  # capped at the model's positions
    over = trt.ProfileLimits.for_bundle({"max_position_embeddings": 512}, max_batch=2, max_seq=16)
    assert over.batch[2] == 2 and over.sequence[2] == 16 and over.past[2] == 511
    assert over.total[2] == 512
    assert trt.ProfileLimits.for_bundle(None).sequence[2] == 1024
    prof = {"x": ((1, 1), (1, 4), (2, 8))}
    trt.check_shapes(prof, {"x": (2, 8)}, "e.plan")
    with pytest.raises(ConfigError, match=r"input x has shape \[3, 8\], outside"):
        trt.check_shapes(prof, {"x": (3, 8)}, "e.plan")


def _hide_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import -> ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)


def test_no_tensorrt_is_a_clear_error_and_the_hand_lint_stands_in(var_decoder, tmp_path, monkeypatch):
    _hide_tensorrt(monkeypatch)
    assert trt.available_flavours() == []
    with pytest.raises(TensorRTUnavailableError, match=r"pip install var-export\[trt\]") as info:
        trt.build_engine(var_decoder, tmp_path / "e.plan")
    assert "tensorrt_rtx" in str(info.value) and "build-trt" in str(info.value)
    assert info.value.exit_code != 0
    assert not list(tmp_path.iterdir())
    report = trt.lint_graph(var_decoder)
    assert report.authority == "var-export hand lint" and report.ok


def _fake_module(**extra):
    return types.SimpleNamespace(__version__="10.fake", Builder=object, OnnxParser=object, **extra)


def test_flavour_choice(monkeypatch):
    from var_export.trt import flavour

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_module())
    monkeypatch.setattr(flavour, "cuda_device_count", lambda: 0)
    # datacenter TensorRT without a GPU: auto falls back to RTX (when installed), forced: refused
    with pytest.raises(TensorRTUnavailableError, match="expected a CUDA GPU for tensorrt 10.fake"):
        flavour.resolve_flavour("tensorrt")
    assert flavour.resolve_flavour("tensorrt", for_build=False).name == "tensorrt"
    monkeypatch.setattr(flavour, "cuda_device_count", lambda: 1)
    chosen = flavour.resolve_flavour("auto")
    assert chosen.name == "tensorrt" and chosen.can_build and not chosen.ahead_of_time
    with pytest.raises(ConfigError, match="--trt-targets applies to TensorRT-RTX"):
        flavour.compute_capabilities(chosen, "86")
    assert flavour.compute_capabilities(chosen, None) == []
    with pytest.raises(ConfigError, match="--trt-flavor must be one of"):
        flavour.resolve_flavour("tensorrt-llm")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="0.0.1"))  # a stub
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(TensorRTUnavailableError, match="none is importable"):
        flavour.resolve_flavour("auto")


def test_rtx_targets():
    from var_export.trt import flavour

    rtx = trt.Flavour("tensorrt-rtx", _fake_module(ComputeCapability=_CC), gpus=0)
    assert flavour.compute_capabilities(rtx, None) == ["SM80", "SM86", "SM89", "SM120"]
    assert flavour.compute_capabilities(rtx, "sm86, 120") == ["SM86", "SM120"]
    for bad, msg in (("77", "unknown compute capability"), ("current", "needs a GPU")):
        with pytest.raises(ConfigError, match=msg):
            flavour.compute_capabilities(rtx, bad)
    with_gpu = trt.Flavour("tensorrt-rtx", rtx.trt, gpus=1)
    assert flavour.compute_capabilities(with_gpu, None) == ["CURRENT"]


class _CC:
    __members__ = {k: k for k in ("NONE", "CURRENT", "SM75", "SM80", "SM86", "SM89", "SM120")}
    NONE, CURRENT, SM75, SM80, SM86, SM89, SM120 = __members__


def test_build_missing_graph(tmp_path):
    with pytest.raises(BundleError, match="manifest.json|bundle"):
        trt.build_engine(tmp_path, tmp_path / "e.plan")
    with pytest.raises(BundleError, match="expected a bundle directory or an .onnx file"):
        trt.build_engine(tmp_path / "nope.onnx", tmp_path / "e.plan")


def _escaping_model(tmp_path: Path) -> Path:
    """x @ w where w's data is 'stored' at /etc/passwd (an untrusted graph)."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [0.0] * 4)
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", "/etc/passwd"), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [w],
    )
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_untrusted_external_data_is_refused_before_the_parser(tmp_path, monkeypatch):
    from var_export.cli import main
    from var_export.core.errors import UnsafeInputError
    from var_export.trt import build, parser

    evil = _escaping_model(tmp_path)

    def never(*a, **k):
        raise AssertionError("the parser saw an untrusted graph")

    monkeypatch.setattr(parser, "parse", never)
    monkeypatch.setattr(build, "parse", never)
    monkeypatch.setattr(parser, "_support_findings", never)
    with pytest.raises(UnsafeInputError, match="/etc/passwd"):
        trt.build_engines(evil, tmp_path / "e.plan")
    with pytest.raises(UnsafeInputError, match="/etc/passwd"):
        trt.lint_sources(evil)
    assert main(["build-trt", str(evil), "--lint-only"]) == UnsafeInputError.exit_code
    assert main(["build-trt", str(evil), "--out", str(tmp_path / "e.plan")]) != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.onnx"]


def test_cli_build_trt_hand_lint_only_and_missing_tensorrt(var_decoder, tmp_path, monkeypatch, capsys):
    from var_export.cli import main

    assert main(["build-trt", str(var_decoder), "--lint-only", "--hand-lint"]) == 0
    assert "hand lint" in capsys.readouterr().err
    bad = tmp_path / "bad.onnx"
    onnx.save(_nonzero_model(), str(bad))
    assert main(["build-trt", str(bad), "--lint-only", "--hand-lint"]) == 1
    _hide_tensorrt(monkeypatch)
    assert main(["build-trt", str(bad), "--lint-only"]) == 1  # the hand lint stands in
    code = main(["build-trt", str(var_decoder), "--out", str(tmp_path / "e.plan"), "--max-past", "64"])
    assert code == TensorRTUnavailableError.exit_code != 0
    assert not (tmp_path / "e.plan").exists()


@pytest.mark.skipif(not trt.available_flavours(), reason="no TensorRT installed")
def test_real_engine_for_a_var_decoder(var_decoder, tmp_path):
    """The LLaMA VAR decoder above, parsed by the real parser and built (small profile)."""
    report = trt.lint_graph(var_decoder)
    assert report.ok and "ONNX parser" in report.authority, report.format()
    config = trt.BuildConfig(targets="86" if "tensorrt-rtx" in trt.available_flavours() else None,
                             max_batch=2, max_seq=8, max_past=16)
    engines = trt.build_engines(var_decoder, tmp_path / "sub" / "e.plan", config)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["e.engines.json", "e.plan"]
    entry = engines.manifest["engines"]["decoder_model_merged.onnx"]
    assert entry["profiles"][0]["attention_mask"] == [[1, 1], [1, 9], [2, 24]]
    outputs = {o["name"]: o for o in entry["io"]["outputs"]}
    assert outputs["present_sink_mask"]["dtype"] == "bool" and outputs["logits"]["dtype"] == "float32"


@pytest.mark.parametrize("level", [-1, 6, 2.5, True, "0"])
def test_builder_optimization_level_out_of_range_is_refused(level):
    with pytest.raises(trt.build.ConfigError, match=r"optimization level 0\.\.5.*--trt-opt-level"):
        trt.BuildConfig(opt_level=level)


def test_cli_trt_opt_level_is_parsed_and_checked():
    import argparse

    from var_export.cli.build_trt import add_trt_args, build_config

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_trt_args(parser)
    assert build_config(parser.parse_args(["--trt-opt-level", "0"])).opt_level == 0
    assert build_config(parser.parse_args([])).opt_level is None  # TensorRT's default
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 7"):
        parser.parse_args(["--trt-opt-level", "7"])
