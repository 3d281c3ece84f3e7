"""Untrusted inputs: external-data locations outside the model's folder, remote code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from var_export.core.errors import ModelLoadError, UnsafeInputError
from var_export.safety import check_external_data


def _external(name: str, location: str, *, offset: int = 0, length: int = 8) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[2])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def write_graph(folder: Path, location: str, *, where: str = "initializer", **kw) -> Path:
    """A one-node graph whose weight ``w`` is stored at ``location`` (not checked on write)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = _external("w", location, **kw)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    if where == "initializer":
        nodes, inits = [helper.make_node("Identity", ["w"], ["y"])], [w]
    elif where == "constant":
        nodes, inits = [helper.make_node("Constant", [], ["y"], value=w)], []
    else:  # inside an If branch
        branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=w)], "then", [],
                                   [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)]
        inits = [cond]
    graph = helper.make_graph(nodes, "g", [], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.save would try to resolve the location
    return path


def test_relative_location_inside_the_folder_is_accepted(tmp_path):
    path = write_graph(tmp_path / "m", "weights/model.data", length=8)
    (tmp_path / "m" / "weights").mkdir()
    np.arange(2, dtype=np.float32).tofile(tmp_path / "m" / "weights" / "model.data")
    refs = check_external_data(path)
    assert [(r.location, r.size, r.tensors, r.end) for r in refs] == [("weights/model.data", 8, 1, 8)]


@pytest.mark.parametrize("location", ["/etc/passwd", "//server/share/w.bin", "C:\\Windows\\win.ini", "~/.ssh/id_rsa"])
def test_absolute_locations_are_refused(tmp_path, location):
    path = write_graph(tmp_path / "m", location)
    with pytest.raises(UnsafeInputError, match="absolute") as e:
        check_external_data(path)
    assert repr(location) in str(e.value) and "'w'" in str(e.value)


@pytest.mark.parametrize("location", ["../../etc/passwd", "../secret.bin", "a/../../x.bin", "."])
def test_locations_escaping_the_folder_are_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 8)
    path = write_graph(tmp_path / "m", location)
    with pytest.raises(UnsafeInputError, match="escapes|outside"):
        check_external_data(path)


@pytest.mark.parametrize("where", ["constant", "subgraph"])
def test_constants_and_subgraphs_are_checked_too(tmp_path, where):
    path = write_graph(tmp_path / "m", "../../etc/passwd", where=where)
    with pytest.raises(UnsafeInputError, match="escapes"):
        check_external_data(path)


def test_symlink_pointing_outside_is_refused_inside_is_fine(tmp_path):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\0" * 8)
    path = write_graph(tmp_path / "m", "w.bin")
    os.symlink(outside, tmp_path / "m" / "w.bin")
    with pytest.raises(UnsafeInputError, match="symlink"):
        check_external_data(path)
    # a symlinked folder component pointing outside is caught the same way
    path2 = write_graph(tmp_path / "m2", "sub/w.bin")
    os.symlink(tmp_path, tmp_path / "m2" / "sub")
    (tmp_path / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(UnsafeInputError, match="symlink"):
        check_external_data(path2)
    # a symlink that stays inside the folder is accepted
    path3 = write_graph(tmp_path / "m3", "link.bin")
    (tmp_path / "m3" / "real.bin").write_bytes(b"\0" * 8)
    os.symlink("real.bin", tmp_path / "m3" / "link.bin")
    assert check_external_data(path3)[0].size == 8


def test_missing_truncated_and_special_files(tmp_path):
    path = write_graph(tmp_path / "m", "w.bin", offset=4, length=8)
    with pytest.raises(ModelLoadError, match="not found"):
        check_external_data(path)
    (tmp_path / "m" / "w.bin").write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="truncated"):
        check_external_data(path)
    os.mkfifo(tmp_path / "m" / "fifo")
    path2 = write_graph(tmp_path / "m2", "../m/fifo")
    with pytest.raises(UnsafeInputError):
        check_external_data(path2)
    path3 = write_graph(tmp_path / "m3", "fifo")
    os.mkfifo(tmp_path / "m3" / "fifo")
    with pytest.raises(UnsafeInputError, match="regular file"):
        check_external_data(path3)


def test_not_an_onnx_file(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\xff\xfe not protobuf")
    with pytest.raises(ModelLoadError):
        check_external_data(bad)


def test_rewrite_refuses_before_anything_loads_the_graph(tmp_path, monkeypatch):
    """The check runs on the raw protobuf; the onnx-ir model is never built for an unsafe graph."""
    import onnx_ir as ir

    from var_export.core.settings import VarSettings
    from var_export.rewrite import rewrite_decoder

    built = []
    real = ir.serde.deserialize_model
    monkeypatch.setattr(ir.serde, "deserialize_model", lambda *a, **k: built.append(1) or real(*a, **k))
    path = write_graph(tmp_path / "m", "../../../../../../etc/passwd")
    with pytest.raises(UnsafeInputError):
        rewrite_decoder(path, tmp_path / "m" / "out.onnx", VarSettings(sink_dims=(0,)))
    assert built == []
    assert not (tmp_path / "m" / "out.onnx").exists()


def test_cli_reports_unsafe_graph_cleanly(tmp_path, capsys):
    from var_export.cli import main

    path = write_graph(tmp_path / "m", "/etc/passwd")
    code = main(["rewrite", str(path), "--out", str(tmp_path / "m" / "o.onnx"), "--sink-dims", "0"])
    assert code == UnsafeInputError.exit_code
    assert "UnsafeInputError" in capsys.readouterr().err


def test_model_code_is_not_run_without_trust_remote_code(tmp_path):
    """var_export.models: a checkpoint that ships its own code (auto_map) is refused, unrun."""
    from var_export.models import load_llava, resolve_model

    d = tmp_path / "evil"
    d.mkdir()
    marker = tmp_path / "ran"
    (d / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (d / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                     "AutoConfig": "modeling_evil.EvilConfig"},
    }))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="trust-remote-code"):
        load_llava(resolve_model(str(d)))
    assert not marker.exists()


def test_onnx_load_of_checked_graph_never_reads_external_data(tmp_path):
    """check_external_data parses the graph only (a 1 GB sparse data file is not read)."""
    folder = tmp_path / "m"
    path = write_graph(folder, "big.bin", offset=2**30 - 8, length=8)
    with open(folder / "big.bin", "wb") as f:
        f.truncate(2**30)
    before = os.stat(folder / "big.bin").st_blocks
    assert check_external_data(path)[0].size == 2**30
    assert os.stat(folder / "big.bin").st_blocks == before == 0
    assert onnx.load(str(path), load_external_data=False).graph.initializer[0].name == "w"
