"""How ``rewrite_decoder`` brings dense external weights to an output in another folder: by
default a reflink, else a hard link (same filesystem), else a copy with progress; ``data="link"``
prefers the hard link, ``data="copy"`` never links. The source is never modified, a failed write
leaves neither stray files nor an extra link, a hard-linked input rewrites again, a hard-linked
output runs in ONNX Runtime and passes var-export's own checks, and the rewrite's memory does
not grow with the weights (a dense 128 MB file, measured in a subprocess)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import var_export.rewrite as rw
from tests.fixtures.foreign.make_fixtures import GRAPHS
from tests.test_rewrite import SETTINGS, sha, with_external_data
from var_export.core.errors import ConfigError, OutputError
from var_export.rewrite import rewrite_decoder
from var_export.safety import check_external_data

ROOT = Path(__file__).resolve().parents[1]
BIG = 128 << 20  # the dense data file of the scale tests


@pytest.fixture
def dense_source(tmp_path):
    """The dynamo fixture with its weights in a dense ``model.onnx.data`` (every byte written)."""
    src = with_external_data(GRAPHS["dynamo"], tmp_path / "src")
    data = src.parent / "model.onnx.data"
    st = os.stat(data)
    assert st.st_size > 300_000 and st.st_blocks * 512 >= st.st_size  # dense, not sparse
    return src, data


@pytest.fixture(scope="module")
def dense_big(tmp_path_factory):
    """The dynamo fixture with its data file padded to 128 MB of random bytes, every block
    written (not sparse). Module-wide: tests count its links relative to what they found."""
    src = with_external_data(GRAPHS["dynamo"], tmp_path_factory.mktemp("dense") / "src")
    data = src.parent / "model.onnx.data"
    rng = np.random.default_rng(0)
    size = data.stat().st_size
    with open(data, "ab") as f:
        while size < BIG:
            n = min(16 << 20, BIG - size)
            f.write(rng.bytes(n))
            size += n
        f.flush()
        os.fsync(f.fileno())
    st = os.stat(data)
    assert st.st_size == BIG and st.st_blocks * 512 >= st.st_size  # dense, not sparse
    return src, data


@pytest.fixture
def no_reflink(monkeypatch):
    """The filesystem has no reflinks (as ext4): the default is then decided by the hard link."""
    monkeypatch.setattr(rw, "_reflink", lambda src, dst: "no reflink: not supported (test)")


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
    assert "hard link (the input's inode; no byte copied)" in printed and "`--data copy`" in printed
    assert os.stat(out.parent / "var.onnx.data").st_ino == os.stat(src.parent / "model.onnx.data").st_ino
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {"visual_token_mask", "past_sink_mask"} <= {i.name for i in sess.get_inputs()}


# ------------------------------------------------------------------------------ the default for another folder


def test_default_hard_links_a_dense_file_into_another_folder(tmp_path, dense_big, no_reflink):
    src, data = dense_big
    before, links = _fingerprint(data), os.stat(data).st_nlink
    calls: list[tuple[int, int]] = []
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, progress=lambda d, t: calls.append((d, t)))
    out_data = out.parent / "var.onnx.data"
    assert result.data_mode == "auto" and result.data_how == ["link"]
    assert result.data_files == [out_data] and result.data_sources == [data]
    assert os.stat(out_data).st_ino == os.stat(data).st_ino and os.stat(data).st_nlink == links + 1
    assert calls == [] and _fingerprint(data) == before  # nothing copied, the input untouched
    text = result.describe()
    assert f"weights {data} -> {out_data}: hard link (the input's inode" in text
    assert "no reflink: not supported (test)" in text and rw.HARD_LINK_NOTE in text
    inline = tmp_path / "inline.onnx"
    rewrite_decoder(GRAPHS["dynamo"], inline, SETTINGS)
    np.testing.assert_array_equal(_logits(out), _logits(inline))  # ORT runs the linked weights


def test_default_prefers_a_reflink_over_a_hard_link(tmp_path, dense_source, monkeypatch):
    src, data = dense_source

    def fake_reflink(a, b):  # a filesystem with reflinks: a standalone clone
        shutil.copyfile(a, b)

    def no_link(*a, **k):
        raise AssertionError("hard-linked although a reflink was possible")

    monkeypatch.setattr(rw, "_reflink", fake_reflink)
    monkeypatch.setattr(os, "link", no_link)
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS)
    assert result.data_how == ["reflink"] and result.data_why == [""]
    assert os.stat(out.parent / "var.onnx.data").st_ino != os.stat(data).st_ino and os.stat(data).st_nlink == 1
    assert rw.HARD_LINK_NOTE not in result.describe() and "reflink (copy-on-write clone" in result.describe()


def test_default_copies_with_progress_across_filesystems(tmp_path, dense_big, no_reflink, monkeypatch):
    src, data = dense_big
    links = os.stat(data).st_nlink
    monkeypatch.setattr(rw, "_same_filesystem", lambda a, b: False)  # the output on another disk
    calls: list[tuple[int, int]] = []
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, progress=lambda d, t: calls.append((d, t)))
    out_data = out.parent / "var.onnx.data"
    assert result.data_mode == "auto" and result.data_how == ["copy"]
    assert result.data_why == ["no reflink: not supported (test); no hard link: another filesystem"]
    assert os.stat(out_data).st_ino != os.stat(data).st_ino and os.stat(data).st_nlink == links
    assert sha(out_data) == sha(data)
    assert len(calls) >= 2 and calls[-1] == (BIG, BIG)  # 64 MB steps
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and {t for _, t in calls} == {BIG}
    assert rw.HARD_LINK_NOTE not in result.describe()


def test_cli_default_falls_back_to_a_copy_on_exdev_with_a_progress_bar(tmp_path, dense_big, no_reflink,
                                                                         monkeypatch, capsys):
    from var_export.cli import main

    src, data = dense_big
    links = os.stat(data).st_nlink

    def exdev(a, b, **kw):  # same st_dev, but the kernel refuses (bind mounts)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", exdev)
    out = tmp_path / "other" / "var.onnx"
    assert main(["rewrite", str(src), "--out", str(out), "--sink-dims", "5,17", "--tau", "4",
                 "--layers", "1:", "--heads", "dynamic"]) == 0
    captured = capsys.readouterr()
    bar = [line for line in captured.err.splitlines() if line.startswith("copying weights:")]
    assert bar[-1] == "copying weights: 134 MB / 134 MB (100 %)"  # a line per 10 % step off a terminal
    steps = [int(line.rsplit("(", 1)[1].split()[0]) for line in bar]
    assert len(bar) >= 2 and steps == sorted(set(steps))
    assert (f"weights {data} -> {out.parent / 'var.onnx.data'}: copied (a standalone file) "
            "[no reflink: not supported (test); no hard link: Invalid cross-device link]") in captured.out
    assert rw.HARD_LINK_NOTE not in captured.out
    assert os.stat(data).st_nlink == links and sha(out.parent / "var.onnx.data") == sha(data)


def test_cli_data_copy_never_links(tmp_path, dense_big, capsys):
    from var_export.cli import main

    src, data = dense_big
    links = os.stat(data).st_nlink
    out = tmp_path / "other" / "var.onnx"
    assert main(["-q", "rewrite", str(src), "--out", str(out), "--data", "copy", "--sink-dims", "5,17",
                 "--tau", "4", "--layers", "1:", "--heads", "dynamic"]) == 0
    captured = capsys.readouterr()
    out_data = out.parent / "var.onnx.data"
    assert os.stat(out_data).st_ino != os.stat(data).st_ino and os.stat(data).st_nlink == links
    assert sha(out_data) == sha(data) and rw.HARD_LINK_NOTE not in captured.out
    assert "copying weights" not in captured.err  # -q: no progress
    assert ("copied (a standalone file)" in captured.out) or ("reflink (copy-on-write" in captured.out)


def test_dry_run_names_the_way_and_a_bad_mode_is_refused_first(tmp_path, dense_source, monkeypatch):
    src, _ = dense_source
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, dry_run=True)
    assert "weights (--data auto: reflink, else hard link, else copy)" in result.describe()
    assert not out.parent.exists()

    def no_pass(*a, **k):
        raise AssertionError("a pass ran before the data mode was checked")

    monkeypatch.setattr(rw, "_apply", no_pass)
    with pytest.raises(ConfigError, match="expected one of auto, share, copy, link"):
        rewrite_decoder(src, out, SETTINGS, data="hardlink")
    with pytest.raises(ConfigError, match="needs the output in the input's folder"):
        rewrite_decoder(src, out, SETTINGS, data="share")


# ------------------------------------------------------------------------------ linked inputs and outputs


@pytest.mark.parametrize("form", ["dynamo", "genai", "sdpa23"])
def test_a_hard_linked_input_rewrites_and_its_linked_output_runs(tmp_path, form):
    """What onnx refuses (a data file with two links), var-export's rewrite, ONNX Runtime, the
    graph verifier and the TensorRT lint accept: the input *and* the output are multiply linked."""
    from var_export.trt.lint import lint_for_tensorrt
    from var_export.verify import verify_graph

    src = with_external_data(GRAPHS[form], tmp_path / "src")
    data = src.parent / "model.onnx.data"
    os.link(data, tmp_path / "another-name")  # e.g. an earlier rewrite's hard link
    with pytest.raises(Exception, match="hard link"):  # the catch that HARD_LINK_NOTE names
        onnx.load(str(src))
    out = tmp_path / "other" / "var.onnx"
    result = rewrite_decoder(src, out, SETTINGS, data="link")
    assert result.data_how == ["link"] and os.stat(data).st_nlink == 3
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {"visual_token_mask", "past_sink_mask"} <= {i.name for i in sess.get_inputs()}
    if form == "dynamo":  # standard ops: strict shape inference + ORT load, the TensorRT lint, parity
        verify_graph(out)
        assert lint_for_tensorrt(out).ok
        inline = tmp_path / "inline.onnx"
        rewrite_decoder(GRAPHS[form], inline, SETTINGS)
        np.testing.assert_array_equal(_logits(out), _logits(inline))


# ------------------------------------------------------------------------------ memory


_RSS_CHILD = r"""
import json, sys
from pathlib import Path
from tests.fixtures.foreign.make_fixtures import GRAPHS
from tests.test_rewrite import SETTINGS
from var_export.rewrite import rewrite_decoder

def hwm():  # this process's peak resident set, bytes
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

src, work = Path(sys.argv[1]), Path(sys.argv[2])
rewrite_decoder(GRAPHS["dynamo"], work / "warm.onnx", SETTINGS)  # imports, first-call allocations
numbers = {"base": hwm()}
for mode in ("auto", "copy"):
    result = rewrite_decoder(src, work / mode / "var.onnx", SETTINGS, data=mode)
    numbers[mode] = {"how": result.data_how, "peak": hwm()}
print(json.dumps(numbers))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_rewrite_memory_does_not_grow_with_the_dense_weights(tmp_path, dense_big):
    """Peak RSS of a rewrite of the 128 MB dense file into another folder, default and --data copy,
    above the warmed-up interpreter: < 300 MB and < half the file (reading it would exceed that)."""
    src, data = dense_big
    links = os.stat(data).st_nlink
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(src), str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = json.loads(proc.stdout.strip().splitlines()[-1])
    assert n["auto"]["how"] in (["reflink"], ["link"]) and n["copy"]["how"] in (["reflink"], ["copy"])
    assert os.stat(data).st_nlink == links + (n["auto"]["how"] == ["link"])
    for mode in ("auto", "copy"):
        grew = n[mode]["peak"] - n["base"]
        assert grew < min(300 << 20, BIG // 2), f"{mode}: peak RSS grew by {grew / 2**20:.0f} MB"
        assert sha(tmp_path / mode / "var.onnx.data") == sha(data)


def _ort_loads(path) -> bool:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - ONNX Runtime's own refusal, whatever its type
        return False
    return True


@pytest.mark.parametrize("form", ["optimum", "legacy", "dynamo", "sdpa23"])
def test_every_tensor_external_rewrites(tmp_path, form):
    """A graph saved with every initializer in its data file (``size_threshold_bytes=0``): the
    checker in FinalizePass must not resolve the small external tensors against the working
    directory ("not regular file"). The output loads in ONNX Runtime exactly when the input does
    (ONNX Runtime itself cannot shape-infer the dynamo exports' Unsqueeze with external axes)."""
    import onnx_ir as ir

    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    ir.save(ir.load(str(GRAPHS[form])), str(src), external_data="model.onnx.data", size_threshold_bytes=0)
    result = rewrite_decoder(src, src.parent / "var.onnx", SETTINGS)
    assert result.report.var_layers
    assert _ort_loads(src.parent / "var.onnx") == _ort_loads(src)
    assert _ort_loads(src) == (form in ("optimum", "legacy"))
