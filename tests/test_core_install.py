"""The core install (no torch, no transformers) runs ``rewrite``, ``run``, ``build-trt`` and ``bench``;
``export``, ``calibrate`` and ``inspect`` name the ``var-export[torch]`` extra.

One subprocess with an import blocker on ``sys.meta_path``: importing torch, torchvision,
transformers or safetensors raises ``ModuleNotFoundError`` there, as on a machine without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from var_export.core.contract import DECODER

BLOCKED = ("torch", "torchvision", "transformers", "safetensors")

SCRIPT = textwrap.dedent(
    """
    import contextlib, io, json, sys

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    from var_export.cli import main

    results = {{}}
    for key, argv in json.loads(sys.argv[1]).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        results[key] = {{"code": code, "out": out.getvalue(), "err": err.getvalue()}}
    results["torch_imported"] = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r})
    print(json.dumps(results))
    """
).format(blocked=BLOCKED)


def test_core_commands_run_without_torch(tmp_path, tiny_bundles):
    from var_export.runtime import VarRuntime

    var, plain, image = str(tiny_bundles["var"]), str(tiny_bundles["plain"]), str(tiny_bundles["image"])
    prompt = "What is in the picture?"
    commands = {
        "run": ["-q", "run", var, "--image", image, "--prompt", prompt, "--max-new-tokens", "4"],
        "rewrite": ["-q", "rewrite", f"{plain}/{DECODER}", "--out", str(tmp_path / "var.onnx"),
                    "--sink-dims", "5,17", "--heads", "dynamic", "--layers", "2:"],
        "lint": ["-q", "build-trt", var, "--lint-only"],
        "bench": ["-q", "bench", var, "--baseline", plain, "--prompt-tokens", "70", "--image-tokens", "64",
                  "--rounds", "1", "--decode-steps", "1", "--out", str(tmp_path / "bench")],
        "export": ["-q", "export", "--out", str(tmp_path / "bundle")],
        "calibrate": ["-q", "calibrate", "--out", str(tmp_path / "cal.json")],
        "inspect": ["-q", "inspect", var, "--image", image, "--prompt", prompt, "--out", str(tmp_path / "pics")],
        "bad_knob": ["-q", "export", "--out", str(tmp_path / "bundle"), "--p", "0"],
    }
    r = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(commands)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.pop("torch_imported") == []
    for key in ("run", "rewrite", "lint", "bench"):
        assert res[key]["code"] == 0, (key, res[key]["err"][-2000:])
    want = VarRuntime(var).generate(image, prompt, max_new_tokens=4).text
    assert res["run"]["out"].strip() == want.strip()  # same text as the in-process (torch) run
    assert (tmp_path / "var.onnx").stat().st_size > 0 and (tmp_path / "bench" / "bench.json").is_file()
    for key in ("export", "calibrate", "inspect"):
        assert res[key]["code"] != 0, key
        assert "var-export[torch]" in res[key]["err"] and "Traceback" not in res[key]["err"], res[key]["err"]
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "cal.json").exists()
    assert res["bad_knob"]["code"] != 0 and "p must be in (0, 1]" in res["bad_knob"]["err"]
