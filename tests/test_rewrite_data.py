"""How ``rewrite_decoder`` brings dense external weights to an output in another folder:
hard link (``data="link"``), reflink or copy with progress (``data="copy"``); the source is
never modified, a failed write leaves neither stray files nor an extra link."""

from __future__ import annotations

import errno
import os

import numpy as np
import onnxruntime as ort
import pytest

from tests.fixtures.foreign.make_fixtures import GRAPHS
from tests.test_rewrite import SETTINGS, sha, with_external_data
from var_export.core.errors import OutputError
from var_export.rewrite import rewrite_decoder
from var_export.safety import check_external_data


@pytest.fixture
def dense_source(tmp_path):
    """The dynamo fixture with its weights in a dense ``model.onnx.data`` (every byte written)."""
    src = with_external_data(GRAPHS["dynamo"], tmp_path / "src")
    data = src.parent / "model.onnx.data"
    st = os.stat(data)
    assert st.st_size > 300_000 and st.st_blocks * 512 >= st.st_size  # dense, not sparse
    return src, data


def _fingerprint(path):
    st = os.stat(path)
    return sha(path), st.st_ino, st.st_mode, st.st_mtime_ns, st.st_size


def _logits(graph) -> np.ndarray:
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[1, 20, 7, 30]]), "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4)[None], "visual_token_mask": np.array([[0, 0, 1, 1]], bool),
             "past_sink_mask": np.zeros((1, 2, 0), bool)}
    for i in range(3):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, 2, 0, 16), np.float32)
    return sess.run(["logits"], feeds)[0]


def test_link_hard_links_the_dense_weights_and_leaves_the_source_alone(tmp_path, dense_source):
    src, data = dense_source
    before = _fingerprint(data)
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, data="link")
    out_data = out.parent / "var.onnx.data"
    assert result.data_how == ["link"] and result.data_files == [out_data]
    assert os.stat(out_data).st_ino == os.stat(data).st_ino and os.stat(data).st_nlink == 2
    assert _fingerprint(data) == before  # same bytes, inode, mode, mtime
    assert [r.location for r in check_external_data(out)] == ["var.onnx.data"]
    inline = tmp_path / "inline.onnx"
    rewrite_decoder(GRAPHS["dynamo"], inline, SETTINGS)
    np.testing.assert_array_equal(_logits(out), _logits(inline))  # ORT loads the linked weights
    assert sorted(p.name for p in out.parent.iterdir()) == [".var-export-owned", "var.onnx", "var.onnx.data"]


def test_copy_reports_progress_and_makes_an_independent_file(tmp_path, dense_source):
    src, data = dense_source
    before = _fingerprint(data)
    calls: list[tuple[int, int]] = []
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, data="copy", progress=lambda d, t: calls.append((d, t)))
    out_data = out.parent / "var.onnx.data"
    assert result.data_how in (["copy"], ["reflink"])
    assert os.stat(out_data).st_ino != os.stat(data).st_ino and os.stat(data).st_nlink == 1
    assert sha(out_data) == before[0] and _fingerprint(data) == before
    if result.data_how == ["copy"]:  # a reflink copies nothing, so reports nothing
        size = before[4]
        assert calls[-1] == (size, size) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_link_falls_back_to_a_copy_when_linking_fails(tmp_path, dense_source, monkeypatch, caplog):
    src, data = dense_source

    def no_link(a, b, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, data="link")
    assert result.data_how in (["copy"], ["reflink"]) and "cannot hard-link" in caplog.text
    assert sha(out.parent / "var.onnx.data") == sha(data) and os.stat(data).st_nlink == 1


def test_a_failed_write_removes_the_link(tmp_path, dense_source, monkeypatch):
    src, data = dense_source
    import onnx_ir as ir

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ir, "save", fail)
    out = tmp_path / "other" / "var.onnx"
    with pytest.raises(OutputError, match="disk is full"):  # a clear error, not a traceback
        rewrite_decoder(src, out, SETTINGS, data="link")
    assert list(out.parent.iterdir()) == [] and os.stat(data).st_nlink == 1


def test_cli_rewrite_links_a_genai_graph_and_prints_the_plan(tmp_path, capsys):
    """The CLI end to end on the genai form with external weights: --data link, the printed plan
    names the form, the unfused layers and how the weights got there."""
    from var_export.cli import main

    src = with_external_data(GRAPHS["genai"], tmp_path / "genai")
    out = tmp_path / "other" / "var.onnx"
    assert main(["rewrite", str(src), "--out", str(out), "--data", "link", "--sink-dims", "5,17",
                 "--tau", "4", "--layers", "1:", "--heads", "dynamic"]) == 0
    printed = capsys.readouterr().out
    assert "graph form: contrib" in printed and "unfused on layers [1, 2]" in printed
    assert "weights (link by link)" in printed
    assert os.stat(out.parent / "var.onnx.data").st_ino == os.stat(src.parent / "model.onnx.data").st_ino
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {"visual_token_mask", "past_sink_mask"} <= {i.name for i in sess.get_inputs()}
