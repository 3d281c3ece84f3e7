"""Bundle directory: manifest, SHA-256 verification, atomic writes (DESIGN.md §3)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from var_export.bundle import (
    CALIBRATION,
    DECODER,
    EMBED_TOKENS,
    MANIFEST,
    SCHEMA_VERSION,
    TOOL_PACKAGES,
    VISION_ENCODER,
    load_bundle,
    write_bundle,
)
from var_export.core.errors import BundleError, OutputError, UnsafeInputError

FIELDS = {
    "model_id": "test/tiny",
    "fingerprint": "abc123",
    "var": {"sink_dims": [1, 2], "tau": 20.0, "rho": 0.5, "summ": 0.2, "p": 0.6, "heads": "hybrid"},
    "var_layers": [2, 3],
    "head_mode": "hybrid",
}


def _graph(
    path: Path, inputs: list[str], outputs: list[str], *, external: str | None = None
) -> Path:
    """A tiny graph: each output = Add(first input, weight). Weight in `external` if given."""
    weight = numpy_helper.from_array(np.arange(64, dtype=np.float32), "weight")
    nodes = [helper.make_node("Add", [inputs[0], "weight"], [o]) for o in outputs]
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, [64]) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [64]) for o in outputs],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    if external:
        onnx.save_model(
            model, str(path), save_as_external_data=True, location=external, size_threshold=0
        )
    else:
        onnx.save_model(model, str(path))
    return path


@pytest.fixture
def graphs(tmp_path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    return {
        VISION_ENCODER: _graph(src / VISION_ENCODER, ["pixel_values"], ["image_features"]),
        EMBED_TOKENS: _graph(src / EMBED_TOKENS, ["input_ids"], ["inputs_embeds"]),
        DECODER: _graph(
            src / DECODER,
            ["inputs_embeds", "attention_mask", "past_key_values.0.key"],
            ["logits", "present.0.key"],
            external=DECODER + ".data",
        ),
    }


class FakeProcessor:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_pretrained(self, directory: str) -> None:
        Path(directory, "tokenizer.json").write_text('{"model": "fake"}')
        if self.fail:
            raise RuntimeError("disk full (simulated)")
        Path(directory, "processor_config.json").write_text("{}")


def _write(out: Path, graphs, **kw) -> Path:
    kw.setdefault("calibration", {"heads": [[2, 1]], "schema_version": 1})
    kw.setdefault("processor", FakeProcessor())
    return write_bundle(out, graphs=graphs, manifest_fields=FIELDS, **kw)


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith((f".{name}.", ".var-export-tmp-"))]


def test_roundtrip(tmp_path, graphs):
    extra = tmp_path / "README.txt"
    extra.write_text("hello")
    out = _write(tmp_path / "bundle", graphs, extra_files=[extra])
    bundle = load_bundle(out)
    m = bundle.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["model_id"] == "test/tiny" and m["fingerprint"] == "abc123"
    assert m["var"] == FIELDS["var"] and bundle.var_layers == [2, 3] and m["head_mode"] == "hybrid"
    assert m["opset"] == 18
    assert set(m["tool_versions"]) == set(TOOL_PACKAGES)
    assert m["created"].endswith("+00:00")
    assert set(m["files"]) == {
        VISION_ENCODER,
        EMBED_TOKENS,
        DECODER,
        DECODER + ".data",
        CALIBRATION,
        "tokenizer.json",
        "processor_config.json",
        "README.txt",
    }
    for name, entry in m["files"].items():  # hashes are the real ones
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert m["io"][DECODER] == {
        "inputs": ["inputs_embeds", "attention_mask", "past_key_values.0.key"],
        "outputs": ["logits", "present.0.key"],
    }
    assert bundle.decoder == out / DECODER and bundle.vision_encoder == out / VISION_ENCODER
    assert bundle.calibration() == {"heads": [[2, 1]], "schema_version": 1}
    # the external-data graph still loads its weights from inside the bundle
    w = onnx.load(str(bundle.decoder)).graph.initializer[0]
    assert numpy_helper.to_array(w)[5] == 5.0
    assert _leftovers(tmp_path, "bundle") == []


def test_no_var_bundle(tmp_path, graphs):
    fields = dict(FIELDS, var=None, var_layers=[], head_mode=None)
    out = write_bundle(tmp_path / "b", graphs=graphs, manifest_fields=fields, calibration=None)
    bundle = load_bundle(out)
    assert bundle.var is None and bundle.var_layers == [] and bundle.calibration() is None


@pytest.mark.parametrize("victim", [DECODER, DECODER + ".data", "tokenizer.json"])
def test_tamper_is_detected(tmp_path, graphs, victim):
    out = _write(tmp_path / "bundle", graphs)
    f = out / victim
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"SHA-256 of {victim}.*Re-export"):
        load_bundle(out)
    load_bundle(out, verify=False)  # size-only check passes


def test_missing_and_resized_file(tmp_path, graphs):
    out = _write(tmp_path / "bundle", graphs)
    original = (out / CALIBRATION).read_text()
    (out / CALIBRATION).unlink()
    (out / CALIBRATION).write_text("{}")
    with pytest.raises(BundleError, match=rf"{CALIBRATION} has 2 bytes"):
        load_bundle(out)
    (out / CALIBRATION).write_text(original)
    (out / (DECODER + ".data")).unlink()
    with pytest.raises(BundleError, match=rf"missing {DECODER}\.data.*Re-export"):
        load_bundle(out)
    (out / MANIFEST).unlink()
    with pytest.raises(BundleError, match="no manifest.json"):
        load_bundle(out)


def test_manifest_paths_outside_bundle_are_refused(tmp_path, graphs):
    out = _write(tmp_path / "bundle", graphs)
    m = json.loads((out / MANIFEST).read_text())
    m["files"]["../secret"] = {"sha256": "0", "bytes": 1}
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UnsafeInputError, match="outside the bundle"):
        load_bundle(out)


def test_failure_mid_write_leaves_nothing(tmp_path, graphs):
    with pytest.raises(RuntimeError, match="disk full"):
        _write(tmp_path / "bundle", graphs, processor=FakeProcessor(fail=True))
    assert not (tmp_path / "bundle").exists()
    assert _leftovers(tmp_path, "bundle") == []


def test_failure_keeps_previous_bundle_and_success_replaces_it(tmp_path, graphs):
    out = _write(tmp_path / "bundle", graphs)
    before = (out / MANIFEST).read_text()
    with pytest.raises(RuntimeError):
        _write(out, graphs, processor=FakeProcessor(fail=True))
    assert (out / MANIFEST).read_text() == before
    load_bundle(out)
    _write(out, graphs, calibration=None)
    assert not (out / CALIBRATION).exists()
    load_bundle(out)
    (out / "notes.txt").write_text("the user's own file")  # no longer provably ours: refused
    with pytest.raises(OutputError, match="notes.txt"):
        _write(out, graphs)
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert _leftovers(tmp_path, "bundle") == []


def test_refuses_to_replace_a_non_bundle_directory(tmp_path, graphs):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="no .var-export-owned marker"):
        _write(home, graphs)
    assert (home / "thesis.tex").read_text() == "precious"
    (home / MANIFEST).write_text('{"name": "app"}')  # a manifest.json alone proves nothing
    with pytest.raises(OutputError, match="thesis.tex|manifest.json"):
        _write(home, graphs)
    assert sorted(p.name for p in home.iterdir()) == [MANIFEST, "thesis.tex"]


def test_bad_arguments(tmp_path, graphs):
    with pytest.raises(BundleError, match="missing"):
        write_bundle(
            tmp_path / "b",
            graphs={DECODER: graphs[DECODER]},
            manifest_fields=FIELDS,
            calibration=None,
        )
    with pytest.raises(BundleError, match="fingerprint"):
        write_bundle(
            tmp_path / "b", graphs=graphs, manifest_fields={"model_id": "x"}, calibration=None
        )
    evil = _graph(tmp_path / "evil.onnx", ["x"], ["y"], external="w.data")
    m = onnx.load(str(evil), load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../../etc/passwd"
    onnx.save_model(m, str(evil))
    with pytest.raises(UnsafeInputError, match="outside the bundle"):
        write_bundle(
            tmp_path / "b",
            graphs=dict(graphs, **{DECODER: evil}),
            manifest_fields=FIELDS,
            calibration=None,
        )
    assert not (tmp_path / "b").exists() and _leftovers(tmp_path, "b") == []
