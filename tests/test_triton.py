"""The var_llava Triton repository, and a real tritonserver (`var-export serve`) on localhost.

The server tests start `var-export serve BUNDLE` as a user would (a subprocess, random free
ports), talk to it with tritonclient (gRPC streams) and the HTTP generate_stream endpoint, and
compare every text with `var-export run`'s (VarRuntime.generate, VAR on and off).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.triton_client import grpc_stream, http_stream
from var_export.core.errors import BundleError, ConfigError, OutputError
from var_export.triton import (
    MODEL_NAME,
    config_text,
    model_config,
    parse_config,
    write_triton_repository,
)

pytest.importorskip("tritonclient.grpc", reason="tritonclient is in the dev extra")
pytriton = pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) is in the dev extra")

PROMPTS = ("What is in the picture?", "Describe the red square and the picture in words.", "Colors?")


# ---------------------------------------------------------------------------------------------
# The repository


def test_config_is_triton_protobuf():
    from tritonclient.grpc import model_config_pb2 as pb

    text = config_text(model_config(bundle_dir="/b", max_batch=4))
    config = parse_config(text)
    assert config.name == MODEL_NAME and config.backend == "python" and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    io = {i.name: (pb.DataType.Name(i.data_type), list(i.dims), i.optional) for i in config.input}
    assert io == {
        "prompt": ("TYPE_STRING", [1], False),
        "image": ("TYPE_STRING", [1], False),
        "max_new_tokens": ("TYPE_INT32", [1], True),
        "var": ("TYPE_BOOL", [1], True),
    }
    assert [(o.name, pb.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [("text", "TYPE_STRING", [1])]
    assert config.parameters["bundle_dir"].string_value == "/b"
    assert config.parameters["max_batch"].string_value == "4"
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    with pytest.raises(ConfigError, match="instance_kind"):
        model_config(instance_kind="GPU")


def test_repository_is_self_contained(tiny_var_bundle, tmp_path):
    from var_export.bundle import load_bundle

    out = write_triton_repository(tiny_var_bundle["bundle"], tmp_path / "repo")
    version = out / MODEL_NAME / "1"
    assert sorted(p.name for p in version.iterdir()) == ["bundle", "environment.json", "model.py"]
    load_bundle(version / "bundle")  # every file, SHA-256 checked
    env = json.loads((version / "environment.json").read_text())
    assert env["python"] == sys.executable
    config = parse_config((out / MODEL_NAME / "config.pbtxt").read_text())
    assert config.parameters["bundle_dir"].string_value == "bundle"
    ref = write_triton_repository(tiny_var_bundle["bundle"], tmp_path / "ref", copy_bundle=False)
    assert not (ref / MODEL_NAME / "1" / "bundle").exists()
    assert parse_config((ref / MODEL_NAME / "config.pbtxt").read_text()).parameters["bundle_dir"].string_value == str(
        Path(tiny_var_bundle["bundle"]).resolve())


def test_repository_refuses_non_empty_out_and_bad_bundle(tiny_var_bundle, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("mine")
    with pytest.raises(OutputError, match="no .var-export-owned marker"):
        write_triton_repository(tiny_var_bundle["bundle"], tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "x").read_text() == "mine"
    with pytest.raises(BundleError):
        write_triton_repository(tmp_path / "not_a_bundle", tmp_path / "r2")
    assert not (tmp_path / "r2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no half-written temp folder


def test_cli_triton_writes_the_repository(tiny_var_bundle, tmp_path):
    from var_export.cli import main

    assert main(["-q", "triton", str(tiny_var_bundle["bundle"]), "--out", str(tmp_path / "r"), "--reference"]) == 0
    assert (tmp_path / "r" / MODEL_NAME / "config.pbtxt").is_file()
    assert main(["-q", "triton", str(tiny_var_bundle["bundle"]), "--out", str(tmp_path / "r")]) != 0  # not empty


# ---------------------------------------------------------------------------------------------
# A real server


@pytest.fixture(scope="module")
def server(tiny_var_bundle):
    """`var-export serve BUNDLE` in a subprocess; stopped (and checked) by test_shutdown."""
    import psutil

    from var_export.serve import free_port

    http, grpc = free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "var_export.cli", "-q", "serve", str(tiny_var_bundle["bundle"]),
         "--http-port", str(http), "--grpc-port", str(grpc), "--max-batch", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=240)  # startup_timeout of TritonServer is 180 s
        assert "var_llava ready" in line, line
        children = psutil.Process(proc.pid).children(recursive=True)
        tree = [proc.pid, *(p.pid for p in children)]
        repo = next(a.split("=", 1)[1] for p in children for a in p.cmdline() if a.startswith("--model-repository="))
        yield {"proc": proc, "http": f"127.0.0.1:{http}", "grpc": f"127.0.0.1:{grpc}", "tree": tree,
               "workdir": Path(repo).parent}
    except queue.Empty:
        proc.kill()
        pytest.fail(f"the server did not get ready: {proc.stderr.read()[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for pid in tree if "tree" in locals() else []:
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


@pytest.fixture(scope="module")
def reference(tiny_var_bundle):
    """What `var-export run` prints, VAR on and off, for (prompt, image, var, max_new_tokens)."""
    from var_export.runtime import VarRuntime

    rts = {v: VarRuntime(tiny_var_bundle["bundle"], var=v) for v in (True, False)}
    cache: dict = {}

    def text(prompt: str, image: int, var: bool, n: int) -> str:
        key = (prompt, image, var, n)
        if key not in cache:
            cache[key] = rts[var].generate(tiny_var_bundle["images"][image], prompt, max_new_tokens=n).text
        return cache[key]

    return text


@pytest.fixture(scope="module")
def b64(tiny_var_bundle):
    return [base64.b64encode(p.read_bytes()).decode() for p in tiny_var_bundle["images"]]


def test_grpc_stream_equals_run_var_on_and_off(server, reference, b64):
    cases = {"on": (PROMPTS[0], 0, True, 10), "off": (PROMPTS[0], 0, False, 10), "default": (PROMPTS[1], 1, None, None)}
    state = grpc_stream(server["grpc"], [(rid, (p, b64[i], n, v)) for rid, (p, i, v, n) in cases.items()])
    for rid, (p, i, v, n) in cases.items():
        s = state[rid]
        assert s["final"] and s["error"] is None, (rid, s)
        assert s["text"] == reference(p, i, True if v is None else v, 32 if n is None else n), rid
        assert s["text"] and s["pieces"] > 1  # streamed, piece by piece


def test_server_streams_what_cli_run_prints(server, b64, tiny_var_bundle, capsys):
    from var_export.cli import main

    for var in (True, False):
        args = ["-q", "run", str(tiny_var_bundle["bundle"]), "--image", str(tiny_var_bundle["images"][0]),
                "--prompt", PROMPTS[0], "--max-new-tokens", "10", *([] if var else ["--no-var"])]
        assert main(args) == 0
        printed = capsys.readouterr().out
        streamed = grpc_stream(server["grpc"], [("x", (PROMPTS[0], b64[0], 10, var))])["x"]["text"]
        assert printed == streamed + "\n"


def test_http_generate_stream_equals_run(server, reference, b64):
    for var in (True, False):
        status, events = http_stream(server["http"], {"prompt": PROMPTS[2], "image": b64[2], "max_new_tokens": 8, "var": var})
        assert status == 200 and len(events) > 1
        assert "".join(e["text"] for e in events) == reference(PROMPTS[2], 2, var, 8)


def test_eight_concurrent_requests_all_correct(server, reference, b64):
    cases = {f"r{k}": (PROMPTS[k % 3], k % 3, k % 4 != 3, 6 + k) for k in range(8)}
    state = grpc_stream(server["grpc"], [(rid, (p, b64[i], n, v)) for rid, (p, i, v, n) in cases.items()])
    for rid, (p, i, v, n) in cases.items():
        assert state[rid]["final"] and state[rid]["text"] == reference(p, i, v, n), rid


def test_disconnects_and_malformed_requests_leave_the_server_serving(server, reference, b64):
    gone = grpc_stream(server["grpc"], [("long", (PROMPTS[1], b64[1], 200, True))], stop_after=1)
    assert not gone["long"]["final"]
    status, events = http_stream(server["http"], {"prompt": PROMPTS[1], "image": b64[1], "max_new_tokens": 200}, read_events=1)
    assert status == 200 and len(events) == 1
    bad = {
        "base64": (PROMPTS[0], "not base64 !!"),
        "no prompt": (None, b64[0]),
        "too long": ("word " * 3000, b64[0]),
        "not an image": (PROMPTS[0], base64.b64encode(b"text").decode()),
    }
    for name, (prompt, image) in bad.items():
        s = grpc_stream(server["grpc"], [("x", (prompt, image))])["x"]
        assert s["error"] and not s["text"], name
    assert "base64" in grpc_stream(server["grpc"], [("x", bad["base64"])])["x"]["error"]
    status, events = http_stream(server["http"], {"prompt": "word " * 3000, "image": b64[0]})
    assert status == 400 and "positions" in events[0]["error"]
    state = grpc_stream(server["grpc"], [("after", (PROMPTS[0], b64[0], 6, True))])
    assert state["after"]["text"] == reference(PROMPTS[0], 0, True, 6)


def test_shutdown_leaves_no_process(server):
    import psutil

    proc = server["proc"]
    assert len(server["tree"]) >= 3  # var-export serve, tritonserver, its stub (+ the worker)
    assert server["workdir"].is_dir()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in server["tree"]):
        assert time.monotonic() < deadline, [p for p in server["tree"] if psutil.pid_exists(p)]
        time.sleep(0.2)
    assert not server["workdir"].exists()  # the temporary repository is gone


@pytest.mark.slow
def test_pipeline_writes_triton_repository_and_transformers_js_layout(tmp_path):
    """`var-export --model tiny-llava --out X --format triton --layout transformers.js` (a full build)."""
    from var_export.cli import main

    out = tmp_path / "tiny"
    assert main(["-q", "--model", "tiny-llava", "--heads", "dynamic", "--out", str(out),
                 "--format", "triton", "--layout", "transformers.js"]) == 0
    assert (out / "config.json").is_file() and (out / "generation_config.json").is_file()
    repo = tmp_path / "tiny-triton"
    assert parse_config((repo / MODEL_NAME / "config.pbtxt").read_text()).name == MODEL_NAME
    assert (repo / MODEL_NAME / "1" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "tiny-transformers.js" / "onnx" / "decoder_model_merged.onnx").is_file()
