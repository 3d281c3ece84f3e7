"""Careless and hostile uses of the CLI and the library, each judged OK or defect.

    python -m benchmarks.abuse_cases [--json OUT.json] [--only SUBSTRING] [--skip-slow]

Every case is run against whatever ``var_export`` is importable (this checkout, or an older
commit's venv: the cases use only APIs that existed at 4d6a2f5) and prints one line
``OK|DEFECT  class  case  detail``. A case is OK when the tool behaves as issue 11 demands:
a ``VarExportError`` with a clear message (not a traceback, not ONNX Runtime's own error), no
data lost, nothing half-written, no silent no-op, no network, no raw Python warnings.
The classes match the defect classes of docs/trust.md.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

CASES: list[tuple[str, str, Callable[[Path], tuple[bool, str]]]] = []
SLOW: set[str] = set()


def case(cls: str, name: str, slow: bool = False):
    def deco(fn):
        CASES.append((cls, name, fn))
        if slow:
            SLOW.add(name)
        return fn
    return deco


def _err():
    from var_export.core.errors import VarExportError

    return VarExportError


def expect_error(fn: Callable[[], object], *words: str) -> tuple[bool, str]:
    """OK when ``fn`` raises a VarExportError whose message holds every word; no warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fn()
        except _err() as exc:
            msg = str(exc)
            missing = [w for w in words if w.lower() not in msg.lower()]
            if caught:
                return False, f"warning printed: {caught[0].category.__name__}"
            if missing:
                return False, f"{type(exc).__name__} without {missing}: {msg[:100]}"
            return True, f"{type(exc).__name__}: {msg[:90]}"
        except BaseException as exc:  # noqa: BLE001 - anything else is the defect
            return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    return False, "accepted silently"


def cli(argv: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; (exit code, stderr+stdout)."""
    from var_export.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001
            return 99, f"traceback: {type(exc).__name__}: {exc}"
    return int(rc or 0), buf.getvalue()


def parses(argv: list[str]) -> bool:
    from var_export.cli import build_parser

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Fixtures (built once per run)

STATE: dict[str, object] = {}


def tiny_graphs(root: Path) -> dict[str, Path]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER

    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, ins, outs in ((VISION_ENCODER, ["pixel_values"], ["image_features"]),
                            (EMBED_TOKENS, ["input_ids"], ["inputs_embeds"]),
                            (DECODER, ["inputs_embeds"], ["logits"])):
        w = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
        g = helper.make_graph([helper.make_node("Add", [ins[0], "w"], outs)], "g",
                              [helper.make_tensor_value_info(ins[0], TensorProto.FLOAT, [64])],
                              [helper.make_tensor_value_info(outs[0], TensorProto.FLOAT, [64])], [w])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
        onnx.save_model(m, str(root / name))
        out[name] = root / name
    return out


FIELDS = {"model_id": "test/tiny", "fingerprint": "abc",
          "var": {"sink_dims": [1, 2], "tau": 20.0, "rho": 0.5, "summ": 0.2, "p": 0.6, "heads": "hybrid"},
          "var_layers": [2, 3], "head_mode": "hybrid"}


def small_bundle(work: Path, name: str = "small") -> Path:
    from var_export.bundle import write_bundle

    out = work / name
    if out.exists():
        shutil.rmtree(out)
    return write_bundle(out, graphs=tiny_graphs(work / f"{name}-graphs"), manifest_fields=FIELDS, calibration=None)


def big_bundle(work: Path) -> Path:
    """A real tiny-llava VAR bundle (built once, ~40 s)."""
    if "bundle" not in STATE:
        out = work / "tiny-bundle"
        rc, text = cli(["-q", "--model", "tiny-llava", "--out", str(out)])
        if rc != 0:
            raise RuntimeError(f"could not build the tiny bundle: {text[-400:]}")
        STATE["bundle"] = out
    return STATE["bundle"]  # type: ignore[return-value]


def runtime(work: Path):
    if "rt" not in STATE:
        from var_export.runtime import VarRuntime

        STATE["rt"] = VarRuntime(big_bundle(work), verify=False)
    return STATE["rt"]


def png(path: Path, size=(32, 32)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. Ownership before replacement


def _foreign(work: Path, files: dict[str, str]) -> Path:
    d = Path(tempfile.mkdtemp(dir=work, prefix="foreign-"))
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def _intact(d: Path, files: dict[str, str]) -> bool:
    return all((d / rel).is_file() and (d / rel).read_text() == t for rel, t in files.items())


FOREIGN_SETS = {
    "a manifest.json plus a thesis": {"manifest.json": '{"name":"app"}', "thesis.tex": "t", "src/app.js": "x"},
    "only a manifest.json": {"manifest.json": "{}"},
    "a user's notes": {"notes.txt": "n"},
    "a hidden file": {".env": "SECRET=1"},
    "a nested tree": {"a/b/c.txt": "c"},
}

for _label, _files in FOREIGN_SETS.items():
    @case("1 ownership", f"write_bundle into a folder with {_label}")
    def _c(work, files=_files):
        from var_export.bundle import write_bundle

        d = _foreign(work, files)
        res = expect_error(lambda: write_bundle(d, graphs=tiny_graphs(work / "g"), manifest_fields=FIELDS,
                                                calibration=None))
        return res[0] and _intact(d, files), res[1] + ("" if _intact(d, files) else " DATA LOST")

    @case("1 ownership", f"write_triton_repository into a folder with {_label}")
    def _t(work, files=_files):
        from var_export.triton import write_triton_repository

        d = _foreign(work, files)
        res = expect_error(lambda: write_triton_repository(small_bundle(work), d, overwrite=True))
        return res[0] and _intact(d, files), res[1] + ("" if _intact(d, files) else " DATA LOST")


@case("1 ownership", "var-export --out a folder with manifest.json + thesis (issue's data-loss case)", slow=True)
def _(work):
    files = FOREIGN_SETS["a manifest.json plus a thesis"]
    d = _foreign(work, files)
    t = time.perf_counter()
    rc, text = cli(["-q", "--model", "tiny-llava", "--out", str(d)])
    took = time.perf_counter() - t
    ok = rc != 0 and _intact(d, files) and took < 15
    return ok, f"rc={rc} intact={_intact(d, files)} {took:.1f}s"


@case("1 ownership", "write_bundle replaces its own earlier bundle")
def _(work):
    out = small_bundle(work, "own")
    try:
        small_bundle_again = __import__("var_export.bundle", fromlist=["write_bundle"]).write_bundle
        small_bundle_again(out, graphs=tiny_graphs(work / "g2"), manifest_fields=FIELDS, calibration=None)
        return True, "replaced"
    except BaseException as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"


@case("1 ownership", "write_bundle into its own bundle after a user added a file")
def _(work):
    from var_export.bundle import write_bundle

    out = small_bundle(work, "own2")
    (out / "my-notes.txt").write_text("keep me")
    write = lambda: write_bundle(out, graphs=tiny_graphs(work / "g3"), manifest_fields=FIELDS, calibration=None)  # noqa: E731
    res = expect_error(write)
    kept = (out / "my-notes.txt").is_file()
    return res[0] and kept, res[1] + ("" if kept else " DATA LOST")


def _rewrite_src(work: Path) -> Path:
    src = work / "rw" / "model.onnx"
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        here = Path(__file__).resolve().parent.parent
        shutil.copyfile(here / "tests/fixtures/foreign/legacy_llama.onnx", src)
    return src


def _settings():
    from var_export.core.settings import VarSettings

    return VarSettings(sink_dims=(1, 2), heads="dynamic", layers="1:")


@case("1 ownership", "rewrite --out over a user's file")
def _(work):
    from var_export.rewrite import rewrite_decoder

    src = _rewrite_src(work)
    theirs = work / "rw" / "theirs.onnx"
    theirs.write_bytes(b"precious")
    res = expect_error(lambda: rewrite_decoder(src, theirs, _settings()))
    return res[0] and theirs.read_bytes() == b"precious", res[1]


@case("1 ownership", "calibrate --out over a user's file")
def _(work):
    target = work / "user-calibration.json"
    target.write_text("mine")
    rc, text = cli(["calibrate", "--model", "tiny-llava", "--out", str(target), "-q"])
    return rc != 0 and target.read_text() == "mine", f"rc={rc}"


@case("1 ownership", "inspect --out a folder of the user's files")
def _(work):
    files = {"holiday.jpg": "x", "summary.json": "theirs"}
    d = _foreign(work, files)
    img = png(work / "img.png")
    rc, text = cli(["inspect", "--model", "tiny-llava", "--image", str(img), "--prompt", "what", "--out", str(d)])
    return rc != 0 and _intact(d, files), f"rc={rc} intact={_intact(d, files)}"


@case("1 ownership", "export --out X.plan over a user's file (refused before work)")
def _(work):
    plan = work / "user.plan"
    plan.write_bytes(b"mine")
    t = time.perf_counter()
    rc, text = cli(["-q", "--model", "tiny-llava", "--out", str(plan), "--heads", "dynamic"])
    took = time.perf_counter() - t
    return rc != 0 and plan.read_bytes() == b"mine" and took < 15, f"rc={rc} {took:.1f}s"


# ---------------------------------------------------------------------------------------------
# 2/3. All or nothing; filesystem errors


def _fs_fault(work: Path, target, fault_errno: int, where: str) -> tuple[bool, str]:
    """Write a bundle while ``where`` fails with ``fault_errno``; the previous bundle stays."""
    from var_export.bundle import write_bundle

    out = small_bundle(work, f"fault-{where}-{fault_errno}")
    before = sorted(p.name for p in out.iterdir())
    graphs = tiny_graphs(work / "gf")
    real = {"copyfile": shutil.copyfile, "rename": os.rename, "write_text": Path.write_text}

    def boom(*a, **k):
        raise OSError(fault_errno, os.strerror(fault_errno), str(a[0]) if a else None)

    patches = {"copyfile": (shutil, "copyfile"), "rename": (os, "rename"), "write_text": (Path, "write_text")}
    mod, attr = patches[where]
    setattr(mod, attr, boom)
    try:
        res = expect_error(lambda: write_bundle(out, graphs=graphs, manifest_fields=FIELDS, calibration=None))
    finally:
        setattr(mod, attr, real[where])
    after = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    ok = res[0] and after == before and not leftovers
    return ok, f"{res[1][:70]} previous={'intact' if after == before else 'CHANGED'} leftovers={leftovers[:2]}"


for _errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EIO):
    for _where in ("copyfile", "rename", "write_text"):
        @case("3 fs errors", f"write_bundle with {errno.errorcode[_errno]} in {_where}")
        def _f(work, e=_errno, w=_where):
            return _fs_fault(work, None, e, w)


@case("3 fs errors", "write_bundle --out whose parent is a file")
def _(work):
    from var_export.bundle import write_bundle

    f = work / "a-file"
    f.write_text("x")
    return expect_error(lambda: write_bundle(f / "b", graphs=tiny_graphs(work / "g"), manifest_fields=FIELDS,
                                             calibration=None), "file")


@case("3 fs errors", "write_bundle --out that is a file")
def _(work):
    from var_export.bundle import write_bundle

    f = work / "b-file"
    f.write_text("x")
    res = expect_error(lambda: write_bundle(f, graphs=tiny_graphs(work / "g"), manifest_fields=FIELDS,
                                            calibration=None))
    return res[0] and f.read_text() == "x", res[1]


@case("3 fs errors", "write_bundle --out that is a symlink to a bundle")
def _(work):
    from var_export.bundle import write_bundle

    real = small_bundle(work, "link-target")
    link = work / "link"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(real)
    res = expect_error(lambda: write_bundle(link, graphs=tiny_graphs(work / "g"), manifest_fields=FIELDS,
                                            calibration=None), "symlink")
    return res[0] and link.is_symlink(), res[1]


@case("3 fs errors", "CLI --out whose parent is a file")
def _(work):
    f = work / "c-file"
    f.write_text("x")
    rc, text = cli(["-q", "--model", "tiny-llava", "--out", str(f / "b"), "--heads", "dynamic"])
    return rc not in (0, 99), f"rc={rc} {text.strip()[:80]}"


@case("3 fs errors", "rewrite --out that is a directory")
def _(work):
    from var_export.rewrite import rewrite_decoder

    d = work / "rw-dir"
    d.mkdir(exist_ok=True)
    return expect_error(lambda: rewrite_decoder(_rewrite_src(work), d, _settings()))


@case("3 fs errors", "rewrite --out that is a symlink")
def _(work):
    from var_export.rewrite import rewrite_decoder

    target = work / "rw-target.onnx"
    target.write_bytes(b"t")
    link = work / "rw-link.onnx"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(target)
    res = expect_error(lambda: rewrite_decoder(_rewrite_src(work), link, _settings()))
    return res[0] and target.read_bytes() == b"t", res[1]


@case("3 fs errors", "rewrite --out whose parent is a file")
def _(work):
    from var_export.rewrite import rewrite_decoder

    f = work / "d-file"
    f.write_text("x")
    return expect_error(lambda: rewrite_decoder(_rewrite_src(work), f / "o.onnx", _settings()))


@case("3 fs errors", "rewrite with ENOSPC while copying weights leaves no orphan .data")
def _(work):
    import var_export.rewrite as rw

    folder = work / "rw-ext"
    folder.mkdir(exist_ok=True)
    import onnx_ir as ir

    ir.save(ir.load(str(_rewrite_src(work))), str(folder / "model.onnx"), external_data="model.onnx.data",
            size_threshold_bytes=1024)
    out = work / "rw-ext-out" / "var.onnx"
    real = rw._copy_sparse

    def full(src, dst, *rest):
        Path(dst).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    rw._copy_sparse = full
    try:
        res = expect_error(lambda: rw.rewrite_decoder(folder / "model.onnx", out, _settings(), data="copy"))
    finally:
        rw._copy_sparse = real
    left = [p.name for p in out.parent.iterdir()] if out.parent.exists() else []
    left = [n for n in left if n != ".var-export-owned"]
    return res[0] and not left, f"{res[1][:70]} left={left}"


@case("2 all-or-nothing", "bundle + triton: triton failure leaves no new bundle either", slow=True)
def _(work):
    import var_export.triton as tr

    out = work / "bt"
    real = tr.write_triton_repository

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    tr.write_triton_repository = fail
    try:
        rc, text = cli(["-q", "--model", "tiny-llava", "--heads", "dynamic", "--format", "triton", "--out", str(out)])
    finally:
        tr.write_triton_repository = real
    return rc not in (0, 99) and not out.exists(), f"rc={rc} bundle_written={out.exists()}"


@case("2 all-or-nothing", "--out X.plan over a foreign bundle folder is refused before work")
def _(work):
    d = _foreign(work, {"x.txt": "x"})
    plan = d.with_name(d.name + ".plan")
    bundle_dir = plan.with_name(plan.stem + "_bundle")
    bundle_dir.mkdir()
    (bundle_dir / "mine.txt").write_text("m")
    t = time.perf_counter()
    rc, text = cli(["-q", "--model", "tiny-llava", "--heads", "dynamic", "--out", str(plan)])
    took = time.perf_counter() - t
    return rc not in (0, 99) and (bundle_dir / "mine.txt").exists() and took < 15, f"rc={rc} {took:.1f}s"


# ---------------------------------------------------------------------------------------------
# 4. SIGKILL


@case("4 sigkill", "temp folders of a SIGKILLed build are removed by the next run", slow=True)
def _(work):
    parent = work / "killed"
    parent.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "var_export.cli", "-q", "--model", "tiny-llava",
                             "--heads", "dynamic", "--out", str(parent / "b")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and not any(p.name.startswith(".") for p in parent.iterdir()):
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    from var_export.bundle import write_bundle

    write_bundle(parent / "next", graphs=tiny_graphs(work / "gk"), manifest_fields=FIELDS, calibration=None)
    left = [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name != ".var-export-owned"]
    return bool(stale) and not left, f"stale after kill={stale[:1]} left after next run={left[:2]}"


# ---------------------------------------------------------------------------------------------
# 5. Typed validation of files read back

MANIFEST_MUTATIONS: dict[str, Callable[[dict], None]] = {
    "schema_version missing": lambda m: m.pop("schema_version"),
    "schema_version '1'": lambda m: m.__setitem__("schema_version", "1"),
    "model_id missing": lambda m: m.pop("model_id"),
    "model_id empty": lambda m: m.__setitem__("model_id", ""),
    "model_id a number": lambda m: m.__setitem__("model_id", 7),
    "files a list": lambda m: m.__setitem__("files", []),
    "file bytes negative": lambda m: next(iter(m["files"].values())).__setitem__("bytes", -3),
    "file bytes a string": lambda m: next(iter(m["files"].values())).__setitem__("bytes", "12"),
    "file sha256 not hex": lambda m: next(iter(m["files"].values())).__setitem__("sha256", "zz"),
    "file entry a string": lambda m: m["files"].__setitem__(next(iter(m["files"])), "abc"),
    "io missing": lambda m: m.pop("io"),
    "io entry without outputs": lambda m: next(iter(m["io"].values())).pop("outputs"),
    "var.tau NaN": lambda m: m["var"].__setitem__("tau", float("nan")),
    "var.tau Infinity": lambda m: m["var"].__setitem__("tau", float("inf")),
    "var.p 2.0": lambda m: m["var"].__setitem__("p", 2.0),
    "var.rho -1": lambda m: m["var"].__setitem__("rho", -1),
    "var.sink_dims strings": lambda m: m["var"].__setitem__("sink_dims", ["a"]),
    "var.sink_dims negative": lambda m: m["var"].__setitem__("sink_dims", [-5]),
    "var a list": lambda m: m.__setitem__("var", [1, 2]),
    "var.heads unknown": lambda m: m["var"].__setitem__("heads", "all"),
    "head_mode unknown": lambda m: m.__setitem__("head_mode", "sometimes"),
    "var_layers strings": lambda m: m.__setitem__("var_layers", ["two"]),
    "max_position_embeddings -5": lambda m: m.__setitem__("max_position_embeddings", -5),
    "max_position_embeddings 1e400": lambda m: m.__setitem__("max_position_embeddings", float("inf")),
    "image_token_id a string": lambda m: m.__setitem__("image_token_id", "<image>"),
    "eos_token_id -1": lambda m: m.__setitem__("eos_token_id", -1),
    "opset 999": lambda m: m.__setitem__("opset", 999),
    "heads not pairs": lambda m: m.__setitem__("heads", [[1, 2, 3]]),
    "manifest a JSON list": None,  # handled below
}


def _mutated_manifest(work: Path, label: str, mutate) -> Path:
    out = small_bundle(work, "mm")
    path = out / "manifest.json"
    if mutate is None:
        path.write_text("[1, 2]")
        return out
    m = json.loads(path.read_text())
    mutate(m)
    path.write_text(json.dumps(m))
    return out


for _label, _mut in MANIFEST_MUTATIONS.items():
    @case("5 schemas", f"manifest.json: {_label}")
    def _m(work, label=_label, mut=_mut):
        from var_export.bundle import load_bundle

        out = _mutated_manifest(work, label, mut)
        field = label.split()[0].split(".")[-1] if mut is not None else "object"
        return expect_error(lambda: load_bundle(out), field)


@case("5 schemas", "manifest.json: external data file not listed in the manifest")
def _(work):
    import onnx

    from var_export.bundle import load_bundle

    out = small_bundle(work, "ext")
    g = out / "decoder_model_merged.onnx"
    m = onnx.load(str(g))
    onnx.save_model(m, str(g), save_as_external_data=True, location="w.data", size_threshold=0)
    man = json.loads((out / "manifest.json").read_text())
    import hashlib

    man["files"]["decoder_model_merged.onnx"] = {"sha256": hashlib.sha256(g.read_bytes()).hexdigest(),
                                                 "bytes": g.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(man))
    return expect_error(lambda: load_bundle(out), "w.data")


def _cal_doc() -> dict:
    return {"schema_version": 1, "model_id": "tiny-llava", "fingerprint": {"num_layers": 4},
            "settings": {"tau": 20.0, "rho": 0.5, "summ": 0.2, "p": 0.6}, "sink_dims": [5, 17],
            "layers": [{"layer": 2, "image_centric_score": [0.1, 0.9]}], "heads": [[2, 1]]}


CAL_MUTATIONS: dict[str, Callable[[dict], None]] = {
    "heads [[1]]": lambda c: c.__setitem__("heads", [[1]]),
    "heads [['a', 1]]": lambda c: c.__setitem__("heads", [["a", 1]]),
    "heads negative": lambda c: c.__setitem__("heads", [[-1, 0]]),
    "heads a dict": lambda c: c.__setitem__("heads", {"2": 1}),
    "sink_dims negative": lambda c: c.__setitem__("sink_dims", [-1]),
    "sink_dims floats": lambda c: c.__setitem__("sink_dims", [1.5]),
    "settings.tau NaN": lambda c: c["settings"].__setitem__("tau", float("nan")),
    "settings.p 7": lambda c: c["settings"].__setitem__("p", 7),
    "settings.rho a string": lambda c: c["settings"].__setitem__("rho", "half"),
    "settings a list": lambda c: c.__setitem__("settings", [1]),
    "layers a dict": lambda c: c.__setitem__("layers", {"2": {}}),
    "layers[0].layer missing": lambda c: c["layers"][0].pop("layer"),
    "image_centric_score NaN": lambda c: c["layers"][0].__setitem__("image_centric_score", [float("nan")]),
    "image_centric_score 5": lambda c: c["layers"][0].__setitem__("image_centric_score", [5.0]),
    "schema_version missing": lambda c: c.pop("schema_version"),
    "model_id missing": lambda c: c.pop("model_id"),
    "fingerprint a list": lambda c: c.__setitem__("fingerprint", [1]),
    "head_threshold 3": lambda c: c.__setitem__("head_threshold", 3),
}

for _label, _mut in CAL_MUTATIONS.items():
    @case("5 schemas", f"calibration.json: {_label}")
    def _cm(work, label=_label, mut=_mut):
        from var_export.core.calibration_schema import load_calibration

        doc = _cal_doc()
        mut(doc)
        p = work / "cal.json"
        p.write_text(json.dumps(doc))
        field = label.split()[0].split(".")[-1].split("[")[0]
        return expect_error(lambda: load_calibration(p), field)


@case("5 schemas", "calibration.json: not UTF-8")
def _(work):
    from var_export.core.calibration_schema import load_calibration

    p = work / "cal-bin.json"
    p.write_bytes(b"\xff\xfe{}")
    return expect_error(lambda: load_calibration(p))


# ---------------------------------------------------------------------------------------------
# 6. Runtime API input validation


def _step(work: Path, **change):
    from var_export.runtime import decode_step_numpy, empty_past, prefill_position_ids

    rt = runtime(work)
    d = rt.decoder
    hidden = d.get_inputs()[0].shape[2]
    b, s = 2, 5
    args = {
        "inputs_embeds": np.zeros((b, s, hidden), np.float32),
        "attention_mask": np.ones((b, s), np.int64),
        "position_ids": prefill_position_ids(np.ones((b, s), np.int64)),
        "past": empty_past(d, b),
        "visual_token_mask": np.zeros((b, s), np.bool_),
    }
    for k, v in change.items():
        args[k] = v(args) if callable(v) else v
    return decode_step_numpy(d, args["inputs_embeds"], args["attention_mask"], args["position_ids"],
                             args["past"], args["visual_token_mask"])


STEP_CASES: dict[str, dict] = {
    "inputs_embeds 2-D": {"inputs_embeds": lambda a: a["inputs_embeds"][0]},
    "inputs_embeds wrong hidden size": {"inputs_embeds": lambda a: a["inputs_embeds"][..., :7]},
    "inputs_embeds int64": {"inputs_embeds": lambda a: a["inputs_embeds"].astype(np.int64)},
    "inputs_embeds NaN": {"inputs_embeds": lambda a: a["inputs_embeds"] * np.nan},
    "inputs_embeds a list": {"inputs_embeds": lambda a: "not an array"},
    "attention_mask float 0.5": {"attention_mask": lambda a: a["attention_mask"] * 0.5},
    "attention_mask values 2": {"attention_mask": lambda a: a["attention_mask"] * 2},
    "attention_mask batch 3 vs embeds 2": {"attention_mask": np.ones((3, 5), np.int64)},
    "attention_mask shorter than the prompt": {"attention_mask": np.ones((2, 3), np.int64)},
    "attention_mask 1-D": {"attention_mask": np.ones(5, np.int64)},
    "attention_mask longer but no past (decode before prefill)": {"attention_mask": np.ones((2, 9), np.int64)},
    "position_ids wrong shape": {"position_ids": np.zeros((2, 4), np.int64)},
    "position_ids float": {"position_ids": lambda a: a["position_ids"].astype(np.float32)},
    "visual_token_mask float": {"visual_token_mask": np.zeros((2, 5), np.float32)},
    "visual_token_mask int": {"visual_token_mask": np.zeros((2, 5), np.int64)},
    "visual_token_mask wrong length": {"visual_token_mask": np.zeros((2, 4), np.bool_)},
    "visual_token_mask wrong batch": {"visual_token_mask": np.zeros((1, 5), np.bool_)},
    "past missing (decode before prefill)": {"past": {}},
    "past wrong batch": {"past": lambda a: {k: v[:1] for k, v in a["past"].items()}},
    "past_sink_mask float": {"past": lambda a: {k: (v.astype(np.float32) if k == "past_sink_mask" else v)
                                                for k, v in a["past"].items()}},
    "past key wrong head dim": {"past": lambda a: {k: (v[..., :3] if k.endswith(".key") else v)
                                                   for k, v in a["past"].items()}},
    "past with an unknown name": {"past": lambda a: {**a["past"], "past_key_values.99.key": np.zeros((2, 2, 0, 4))}},
}

for _label, _change in STEP_CASES.items():
    @case("6 runtime inputs", f"decode_step_numpy: {_label}")
    def _s(work, change=_change):
        return expect_error(lambda: _step(work, **change))


def _generate(work: Path, image=None, prompt="What is this?", max_new_tokens=2):
    rt = runtime(work)
    return rt.generate(image if image is not None else png(work / "ok.png"), prompt, max_new_tokens=max_new_tokens)


GEN_CASES: dict[str, dict] = {
    "max_new_tokens 2.5": {"max_new_tokens": 2.5},
    "max_new_tokens '3'": {"max_new_tokens": "3"},
    "max_new_tokens True": {"max_new_tokens": True},
    "max_new_tokens 0": {"max_new_tokens": 0},
    "max_new_tokens -4": {"max_new_tokens": -4},
    "max_new_tokens None": {"max_new_tokens": None},
    "prompt invalid UTF-8 bytes": {"prompt": b"\xff\xfe what"},
    "prompt with a lone surrogate (undecodable argv)": {"prompt": "what \udcff is it"},
    "prompt None": {"prompt": None},
    "prompt empty": {"prompt": "   "},
    "prompt 2 MB": {"prompt": "word " * 400_000},
    "prompt with two image tokens": {"prompt": "<image> and <image>"},
    "image a directory": {"image": "DIR"},
    "image missing": {"image": "/nonexistent/x.png"},
    "image an empty file": {"image": "EMPTY"},
    "image a text file": {"image": "TEXT"},
    "image a decompression bomb (100 MP)": {"image": "BOMB"},
    "image between 1x and 2x PIL's bomb limit (warning)": {"image": "WARN"},
    "image an int": {"image": 42},
}


def _image(work: Path, kind):
    if not isinstance(kind, str) or kind.startswith("/"):
        return kind
    p = work / f"img-{kind}.png"
    if kind == "DIR":
        p.mkdir(exist_ok=True)
    elif kind == "EMPTY":
        p.write_bytes(b"")
    elif kind == "TEXT":
        p.write_text("hello")
    elif kind in ("BOMB", "WARN") and not p.exists():
        from PIL import Image

        side = 10_000 if kind == "BOMB" else 10_000
        pixels = 100_000_000 if kind == "BOMB" else int(Image.MAX_IMAGE_PIXELS * 1.5)
        w = side
        h = pixels // side
        Image.new("L", (w, h)).save(p, optimize=True)
    return p


for _label, _kw in GEN_CASES.items():
    @case("6 runtime inputs", f"generate: {_label}")
    def _g(work, kw=_kw):
        kw = dict(kw)
        if "image" in kw:
            kw["image"] = _image(work, kw["image"])
        t = time.perf_counter()
        res = expect_error(lambda: _generate(work, **kw))
        took = time.perf_counter() - t
        return res[0] and took < 20, f"{res[1]} ({took:.1f}s)"


@case("6 runtime inputs", "greedy_decode_numpy: max_new_tokens 1.5")
def _(work):
    from var_export.runtime import greedy_decode_numpy

    rt = runtime(work)
    hidden = rt.decoder.get_inputs()[0].shape[2]
    return expect_error(lambda: greedy_decode_numpy(rt.decoder, rt._embed, np.zeros((1, 3, hidden), np.float32),
                                                    np.ones((1, 3), np.int64), 1.5))


@case("6 runtime inputs", "greedy_decode_numpy: float visual mask")
def _(work):
    from var_export.runtime import greedy_decode_numpy

    rt = runtime(work)
    hidden = rt.decoder.get_inputs()[0].shape[2]
    return expect_error(lambda: greedy_decode_numpy(
        rt.decoder, rt._embed, np.zeros((1, 3, hidden), np.float32), np.ones((1, 3), np.int64), 2,
        visual_token_mask=np.ones((1, 3), np.float32) * 0.3))


@case("6 runtime inputs", "run CLI: --prompt with undecodable bytes")
def _(work):
    img = png(work / "ok.png")
    rc, text = cli(["run", str(big_bundle(work)), "--image", str(img), "--prompt", "x \udcff y", "--no-verify"])
    return rc not in (0, 99) and "Traceback" not in text, f"rc={rc} {text.strip()[-80:]}"


# ---------------------------------------------------------------------------------------------
# 7. Never a silent no-op


@case("7 no-op", "hybrid bundle from a calibration that selects no head", slow=True)
def _(work):
    out = work / "noop"
    rc, text = cli(["-q", "--model", "tiny-llava", "--head-threshold", "0.999", "--out", str(out)])
    return rc not in (0, 99) and not out.exists() and "dynamic" in text, f"rc={rc} written={out.exists()}"


@case("7 no-op", "static bundle from a calibration with an empty head list")
def _(work):
    bundle = big_bundle(work)
    cal = json.loads((bundle / "calibration.json").read_text())
    cal["heads"] = []
    p = work / "noheads.json"
    p.write_text(json.dumps(cal))
    out = work / "noop-static"
    t = time.perf_counter()
    rc, text = cli(["-q", "--model", "tiny-llava", "--calibration", str(p), "--heads", "static", "--out", str(out)])
    return rc not in (0, 99) and not out.exists(), f"rc={rc} written={out.exists()} {time.perf_counter() - t:.1f}s"


# ---------------------------------------------------------------------------------------------
# 8. Never write a graph that does not load


@case("8 graphs load", "VAR decoder keeps ORT symbolic shape inference working")
def _(work):
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(big_bundle(work) / "decoder_model_merged.onnx"))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        return True, "inferred"
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {str(exc)[:80]}"


@case("8 graphs load", "strict ONNX shape inference of every bundle graph")
def _(work):
    import onnx

    for g in ("vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"):
        try:
            onnx.shape_inference.infer_shapes_path(str(big_bundle(work) / g), str(work / "inf.onnx"),
                                                   strict_mode=True, data_prop=True)
        except Exception as exc:  # noqa: BLE001
            return False, f"{g}: {str(exc)[:80]}"
    return True, "all three pass"


@case("8 graphs load", "fused qkv (Phi-3 style) decoder: query heads read correctly")
def _(work):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.fused_qkv import fused_qkv_case

    try:
        return fused_qkv_case(work / "fused")
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {str(exc)[:90]}"


# ---------------------------------------------------------------------------------------------
# 9. No network because of a file's contents


@case("9 no network", "inspect BUNDLE whose model_id is a hub id")
def _(work):
    bundle = big_bundle(work)
    copy = work / "hub-id-bundle"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    man = json.loads((copy / "manifest.json").read_text())
    man["model_id"] = "someone/llava-clone"
    (copy / "manifest.json").write_text(json.dumps(man))
    calls = []
    real = socket.create_connection

    def spy(*a, **k):
        calls.append(a[0])
        raise OSError("network disabled by the abuse test")

    socket.create_connection = spy
    env = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        img = png(work / "ok.png")
        rc, text = cli(["inspect", str(copy), "--image", str(img), "--prompt", "what", "--out", str(work / "insp-hub")])
    finally:
        socket.create_connection = real
        if env is not None:
            os.environ["HF_HUB_OFFLINE"] = env
    return rc not in (0, 99) and not calls, f"rc={rc} network attempts={len(calls)}"


# ---------------------------------------------------------------------------------------------
# 10. CLI consistency

ABBREV = {
    "calibrate": ["--mod", "tiny-llava", "--ou", "x.json"],
    "export": ["--mod", "tiny-llava", "--ou", "x"],
    "rewrite": ["in.onnx", "--ou", "o.onnx"],
    "build-trt": ["b", "--lint-o"],
    "run": ["b", "--ima", "x.png", "--prom", "p"],
    "inspect": ["b", "--ima", "x.png", "--prom", "p", "--ou", "o"],
    "bench": ["--roun", "1"],
}
for _sub, _argv in ABBREV.items():
    @case("10 cli", f"{_sub}: option abbreviations refused")
    def _a(work, sub=_sub, argv=_argv):
        ok = not parses([sub, *argv])
        return ok, "refused" if ok else "abbreviation accepted"

for _sub, _opt in (("export", "--no-v"), ("export", "--calib"), ("calibrate", "--head-t"), ("run", "--max-new"),
                   ("rewrite", "--dry"), ("export", "--sink-d"), ("inspect", "--lay"), ("export", "--exclude"),
                   ("calibrate", "--num"), ("run", "--no-ve")):
    @case("10 cli", f"{_sub} {_opt}: abbreviation refused")
    def _a2(work, sub=_sub, opt=_opt):
        base = {"export": ["--out", "x"], "calibrate": ["--out", "c.json"], "run": ["b", "--image", "i", "--prompt", "p"],
                "rewrite": ["in.onnx"], "inspect": ["b", "--image", "i", "--prompt", "p", "--out", "o"]}[sub]
        value = [] if opt in ("--no-v", "--dry", "--exclude", "--no-ve") else ["1"]
        ok = not parses([sub, *base, opt, *value])
        return ok, "refused" if ok else "abbreviation accepted"


@case("10 cli", "--version")
def _(work):
    rc, text = cli(["--version"])
    return rc == 0 and "var-export" in text, f"rc={rc} {text.strip()[:40]}"


@case("10 cli", "top-level abbreviation (--mod) refused")
def _(work):
    return (not parses(["--mod", "tiny-llava", "--out", "x"])), ""


@case("10 cli", "-q is quiet: no third-party lines on stderr", slow=True)
def _(work):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "var_export.cli", "-q", "export", "--model", "tiny-llava", "--no-var",
                        "--out", str(work / "quiet")], env=env, capture_output=True, text=True)
    noise = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode == 0 and not noise, f"rc={p.returncode} stderr lines={len(noise)} {noise[:1]}"


for _argv, _label in (
    (["--head-threshold", "nan", "--out", "X"], "--head-threshold nan"),
    (["--head-threshold", "2", "--out", "X"], "--head-threshold 2"),
    (["--tau", "inf", "--out", "X"], "--tau inf"),
    (["--p", "0", "--out", "X"], "--p 0"),
    (["--layers", "9:", "--out", "X"], "--layers 9: on a 4-layer model"),
    (["--sink-dims", "-1", "--out", "X"], "--sink-dims -1"),
    (["--opset", "3", "--out", "X", "--heads", "dynamic"], "--opset 3"),
    (["--out", ""], "--out ''"),
):
    @case("10 cli", f"bad value {_label}: clear error, no traceback")
    def _v(work, argv=_argv):
        argv = [str(work / "v-out") if a == "X" else a for a in argv]
        t = time.perf_counter()
        rc, text = cli(["-q", "--model", "tiny-llava", *argv])
        took = time.perf_counter() - t
        return rc not in (0, 99) and "Traceback" not in text and took < 30, f"rc={rc} {took:.1f}s {text.strip()[:70]}"


# ---------------------------------------------------------------------------------------------


def render_table(before: list[dict], after: list[dict]) -> str:
    """A markdown table: one row per case, OK/defect before and after, with after's detail."""
    old = {r["case"]: r for r in before}
    lines = ["| # | class | case | before | after | after: what happened |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(after, 1):
        b = old.get(r["case"])
        was = "—" if b is None else ("OK" if b["ok"] else "defect")
        detail = r["detail"].replace("|", "/")[:110]
        lines.append(f"| {i} | {r['class']} | {r['case'].replace('|', '/')} | {was} | "
                     f"{'OK' if r['ok'] else 'defect'} | {detail} |")
    n_b = sum(1 for r in after if r["case"] in old and old[r["case"]]["ok"])
    n_a = sum(r["ok"] for r in after)
    lines.append("")
    lines.append(f"{len(after)} cases: before {n_b} OK / {len(after) - n_b} defects; "
                 f"after {n_a} OK / {len(after) - n_a} defects.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE.json", "AFTER.json"),
                    help="print the markdown table of two runs and exit")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--only", help="run the cases whose name contains this")
    ap.add_argument("--skip-slow", action="store_true", help="skip the cases that build a model")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temp folder)")
    args = ap.parse_args(argv)
    if args.compare:
        print(render_table(*(json.loads(p.read_text()) for p in args.compare)))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work or Path(tempfile.mkdtemp(prefix="abuse-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for cls, name, fn in CASES:
        if args.only and args.only not in name:
            continue
        if args.skip_slow and name in SLOW:
            continue
        t = time.perf_counter()
        try:
            ok, detail = fn(work)
        except BaseException as exc:  # noqa: BLE001 - a crash of the case is a defect of the tool
            ok, detail = False, f"case crashed: {type(exc).__name__}: {str(exc)[:100]}"
            if os.environ.get("ABUSE_DEBUG"):
                traceback.print_exc()
        results.append({"class": cls, "case": name, "ok": bool(ok), "detail": str(detail).replace("\n", " "),
                        "seconds": round(time.perf_counter() - t, 2)})
        print(f"{'OK    ' if ok else 'DEFECT'}  {cls:18s}  {name}  |  {str(detail)[:120]}", flush=True)
    n_ok = sum(r["ok"] for r in results)
    print(f"\n{n_ok}/{len(results)} OK, {len(results) - n_ok} defects")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
