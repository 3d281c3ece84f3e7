"""Real TensorRT engines for tiny-llava, built ahead of time with TensorRT-RTX (no GPU needed).

Every graph the tool ships is parsed by TensorRT's own ONNX parser, which must agree with the
hand lint, and built into an engine: naive VAR (with its vision and embedding engines and the
engine manifest), no-VAR, the fused baseline (ONNX Attention, fp32: needs decomposable
attention), the fused VAR formulation, fp16. Small profiles and one target keep each build to
seconds. Runs where the dev extra is installed (tensorrt-rtx-cu12); skipped elsewhere.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from var_export import trt

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the dev extra) is not installed")

SMALL = trt.BuildConfig(flavour="tensorrt-rtx", targets="86", max_batch=2, max_seq=32, max_past=32)

DECODERS = ["naive-novar", "naive-var", "fused-novar", "fused-var", "fp16-novar", "fp16-var"]


@pytest.fixture(scope="module")
def rtx():
    return trt.resolve_flavour("tensorrt-rtx")


@pytest.mark.parametrize("graph", [*DECODERS, "vision_encoder", "embed_tokens"])
def test_parser_and_hand_lint_agree(tiny_trt_graphs, rtx, graph):
    path = tiny_trt_graphs[graph]
    real = trt.parser_lint(rtx, path)
    hand = trt.lint_for_tensorrt(path)
    assert real.authority.startswith("tensorrt_rtx") and hand.authority.endswith("hand lint")
    assert real.ok == hand.ok, f"{real.format()}\n{hand.format()}"
    # the parser stops at the first failing node; the hand lint names every one
    assert real.error_nodes() <= hand.error_nodes(), f"{real.format()}\n{hand.format()}"
    assert real.ok, real.format()  # every formulation the tool ships parses (fused: one head size)

@pytest.mark.parametrize("graph", ["naive-novar", "fused-novar", "fused-var", "fp16-var"])
def test_decoder_engine_builds(tiny_trt_graphs, tmp_path, graph):
    engines = trt.build_engines(tiny_trt_graphs[graph], tmp_path / "d.plan", SMALL)
    entry = engines.manifest["engines"]["decoder_model_merged.onnx"]
    assert engines.decoder == tmp_path / "d.plan" and engines.decoder.stat().st_size > 1_000_000
    assert entry["sha256"] == hashlib.sha256(engines.decoder.read_bytes()).hexdigest()
    assert engines.manifest["precision"] == ("fp16" if graph.startswith("fp16") else "fp32")
    if graph.startswith("fused"):
        assert entry["attention_decomposable"] >= 4  # fp32 Attention has no dedicated kernel
    names = {i["name"] for i in entry["io"]["inputs"]}
    assert ("visual_token_mask" in names) == graph.endswith("-var")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.engines.json", "d.plan"]


@pytest.fixture(scope="module")
def var_bundle(tiny_trt_graphs, tiny_loaded, tmp_path_factory):
    from var_export.bundle import write_bundle
    from var_export.calibration import tiny_llava as tl
    from var_export.core.settings import VarSettings

    graphs = {
        "vision_encoder.onnx": tiny_trt_graphs["vision_encoder"],
        "embed_tokens.onnx": tiny_trt_graphs["embed_tokens"],
        "decoder_model_merged.onnx": tiny_trt_graphs["naive-var"],
    }
    fields = {"model_id": "tiny-llava", "fingerprint": {"test": 1}, "dtype": "fp32",
              "var": VarSettings(sink_dims=tuple(tl.TINY_SINK_DIMS), heads="dynamic").to_dict(), "var_layers": [2, 3],
              "max_position_embeddings": 48}
    return write_bundle(tmp_path_factory.mktemp("trt_bundle") / "b", graphs=graphs,
                        manifest_fields=fields, calibration=None, processor=tiny_loaded.processor)


def test_bundle_engines_and_manifest(var_bundle, tmp_path):
    from var_export.bundle import sha256_file

    config = trt.BuildConfig(flavour="tensorrt-rtx", targets="86,89", max_batch=2)
    engines = trt.build_engines(var_bundle, tmp_path / "engine.plan", config)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "engine.embed_tokens.plan", "engine.engines.json", "engine.plan", "engine.vision_encoder.plan"]
    m = json.loads((tmp_path / "engine.engines.json").read_text())
    assert m == engines.manifest
    assert m["flavour"] == "tensorrt-rtx" and m["tensorrt_version"].startswith("1.")
    assert m["targets"] == ["SM86", "SM89"] and m["strongly_typed"] and m["precision"] == "fp32"
    assert m["var_layers"] == [2, 3] and (tmp_path / m["bundle"]).resolve() == var_bundle.resolve()
    for name, entry in m["engines"].items():
        assert entry["sha256"] == sha256_file(tmp_path / entry["file"])
        assert entry["source_sha256"] == sha256_file(var_bundle / name)
    # profiles from the manifest: T up to max_position_embeddings (48)
    dec = m["engines"]["decoder_model_merged.onnx"]["profiles"][0]
    assert dec["attention_mask"][2] == [2, 48] and dec["inputs_embeds"][2][:2] == [2, 48]
    assert dec["past_key_values.0.key"][2][2] == 47
    assert m["engines"]["vision_encoder.onnx"]["profiles"][0]["pixel_values"][2][0] == 2

    # a rebuild replaces the files it wrote; a file it did not write is never replaced
    trt.build_engines(var_bundle, tmp_path / "engine.plan", config)
    (tmp_path / "mine.embed_tokens.plan").write_bytes(b"user data")
    with pytest.raises(trt.build.ConfigError, match="not written by var-export"):
        trt.build_engines(var_bundle, tmp_path / "mine.plan", config)
    assert (tmp_path / "mine.embed_tokens.plan").read_bytes() == b"user data"
    assert not (tmp_path / "mine.plan").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_build_trt_on_a_bundle(var_bundle, tmp_path, capsys):
    from var_export.cli import main

    assert main(["build-trt", str(var_bundle), "--lint-only"]) == 0
    out = capsys.readouterr().err
    assert "tensorrt_rtx" in out and "ONNX parser" in out and out.count("TensorRT lint of") == 3
    plan = tmp_path / "e.plan"
    rc = main(["-q", "build-trt", str(var_bundle), "--out", str(plan), "--trt-targets", "120",
               "--max-batch", "1", "--max-seq", "16", "--max-past", "16"])
    assert rc == 0
    m = json.loads((tmp_path / "e.engines.json").read_text())
    assert m["targets"] == ["SM120"] and m["limits"]["batch"] == [1, 1, 1]
    assert main(["-q", "build-trt", str(var_bundle), "--out", str(plan), "--trt-targets", "77"]) == 2
    assert "unknown compute capability" in capsys.readouterr().err
