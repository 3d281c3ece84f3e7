"""Real TensorRT engines for tiny-llava, built ahead of time with TensorRT-RTX (no GPU needed).

Every graph the tool ships is parsed by TensorRT's own ONNX parser, which must agree with the
hand lint, and built into an engine: naive VAR (with its vision and embedding engines and the
engine manifest), no-VAR, the fused baseline (ONNX Attention, fp32: needs decomposable
attention), the fused VAR formulation with either score shift (``qk``, ``mask``), fp16 naive and
fused. Small profiles and one target keep each build to seconds. Every build runs in a child
process (``BuildConfig.isolate``): a crash inside TensorRT's builder fails the test, never the
pytest process. Runs where the dev extra is installed (tensorrt-rtx-cu12); skipped elsewhere.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from var_export import trt

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the dev extra) is not installed")

SMALL = trt.BuildConfig(flavour="tensorrt-rtx", targets="86", max_batch=2, max_seq=32, max_past=32)

DECODERS = ["naive-novar", "naive-var", "fused-novar", "fused-qk", "fused-mask", "fp16-novar", "fp16-var",
            "fused16-novar", "fused16-qk", "fused16-mask"]


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


# naive-var: built with its vision and embedding engines by test_bundle_engines_and_manifest
@pytest.mark.parametrize("graph", [d for d in DECODERS if d != "naive-var"])
def test_decoder_engine_builds(tiny_trt_graphs, tmp_path, graph):
    engines = trt.build_engines(tiny_trt_graphs[graph], tmp_path / "d.plan", SMALL)
    entry = engines.manifest["engines"]["decoder_model_merged.onnx"]
    assert engines.decoder == tmp_path / "d.plan" and engines.decoder.stat().st_size > 1_000_000
    assert entry["sha256"] == hashlib.sha256(engines.decoder.read_bytes()).hexdigest()
    assert engines.manifest["precision"] == ("fp16" if "16" in graph else "fp32")
    if graph.startswith("fused"):
        # each Attention layer (4, + 1 class-mass Attention per changed layer) is marked
        assert entry["attention_decomposable"] == (4 if graph.endswith("novar") else 6)
    names = {i["name"] for i in entry["io"]["inputs"]}
    assert ("visual_token_mask" in names) == (not graph.endswith("novar"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.engines.json", "d.plan"]


def _attention_chain(path, *, share_qk: bool) -> None:
    """Two Attentions, the first's output reaching the second's mask; ``share_qk``: both read the
    same Q and K tensors (the graph TensorRT-RTX 1.7.1's builder segfaults on), else the first
    reads zero-padded Q/K (what the fused formulation writes)."""
    import numpy as np
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper as h

    d = 128
    w = d if share_qk else d + 8

    def io(name, shape, dtype=TP.FLOAT):
        return h.make_tensor_value_info(name, dtype, shape)

    inits = [onnx.numpy_helper.from_array(np.array(a, np.int64), n) for n, a in
             (("s0", [0]), ("s4", [4]), ("ax", [3]), ("pads", [0, 0, 0, 0, 0, 0, 0, w - d]))]
    inits.append(onnx.numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "lowest"))
    q1, k1 = ("q", "k") if share_qk else ("q_pad", "k_pad")
    nodes = [] if share_qk else [h.make_node("Pad", ["q", "pads"], ["q_pad"]), h.make_node("Pad", ["k", "pads"], ["k_pad"])]
    nodes += [
        h.make_node("Attention", [q1, k1, "classes", "mask"], ["masses"], scale=float(d**-0.5)),
        h.make_node("Slice", ["masses", "s0", "s4", "ax"], ["m4"]),
        h.make_node("Slice", ["k", "s0", "s4", "ax"], ["k4"]),
        h.make_node("Transpose", ["k4"], ["k4t"], perm=[0, 1, 3, 2]),
        h.make_node("MatMul", ["m4", "k4t"], ["shift"]),
        h.make_node("Where", ["mask", "shift", "lowest"], ["mask_var"]),
        h.make_node("Attention", ["q", "k", "v", "mask_var"], ["y"], scale=float(d**-0.5)),
    ]
    graph = h.make_graph(
        nodes, "attention_chain",
        [io("q", ["batch", 8, "sequence", d]), io("k", ["batch", 8, "total_sequence", d]),
         io("v", ["batch", 8, "total_sequence", d]), io("classes", ["batch", 8, "total_sequence", w]),
         io("mask", ["batch", 1, "sequence", "total_sequence"], TP.BOOL)],
        [io("y", ["batch", 8, "sequence", d])], inits,
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 23)], ir_version=10), path)


def test_a_builder_crash_is_an_error_not_a_dead_process(rtx, tmp_path):
    """The graph form TensorRT-RTX 1.7.1 segfaults on (docs/tensorrt.md) is a TensorRTBuildError
    naming the signal, nothing is written; the form the fused formulation writes builds."""
    from var_export.core.errors import TensorRTBuildError

    crash, fine = tmp_path / "crash.onnx", tmp_path / "fine.onnx"
    _attention_chain(crash, share_qk=True)
    _attention_chain(fine, share_qk=False)
    assert trt.build_engines(fine, tmp_path / "fine.plan", SMALL).decoder.stat().st_size > 0
    if rtx.version != "1.7.1.116":
        pytest.skip(f"the crash is known for TensorRT-RTX 1.7.1.116, this is {rtx.version}")
    with pytest.raises(TensorRTBuildError, match=r"crash\.onnx; its builder process was killed by SIGSEGV"):
        trt.build_engines(crash, tmp_path / "crash.plan", SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "crash.onnx", "fine.engines.json", "fine.onnx", "fine.plan"]


def test_builder_optimization_level_is_applied_and_recorded(tiny_trt_graphs, tmp_path):
    import dataclasses

    config = dataclasses.replace(SMALL, opt_level=0, isolate=False)  # in this process too
    engines = trt.build_engines(tiny_trt_graphs["embed_tokens"], tmp_path / "e.plan", config)
    assert engines.manifest["engines"]["embed_tokens.onnx"]["builder_optimization_level"] == 0
    engines = trt.build_engines(tiny_trt_graphs["embed_tokens"], tmp_path / "e.plan", SMALL)
    assert engines.manifest["engines"]["embed_tokens.onnx"]["builder_optimization_level"] == 3  # TensorRT's


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
               "--max-batch", "1", "--max-seq", "16", "--max-past", "16", "--trt-opt-level", "0"])
    assert rc == 0
    m = json.loads((tmp_path / "e.engines.json").read_text())
    assert m["targets"] == ["SM120"] and m["limits"]["batch"] == [1, 1, 1]
    assert {e["builder_optimization_level"] for e in m["engines"].values()} == {0}
    assert main(["-q", "build-trt", str(var_bundle), "--out", str(plan), "--trt-targets", "77"]) == 2
    assert "unknown compute capability" in capsys.readouterr().err
