"""A real tritonserver serving the other families: tiny-qwen2.5-vl (M-RoPE, dynamic resolution)
and tiny-llava-next (tiles + image_newline packing), one server per family (module scope),
random localhost ports. Every streamed text equals `var-export run`'s for the same prompt and
image, VAR on and off, with concurrent requests whose images differ in size (different numbers
of image tokens in one batch). The bundles are the session's (no export here).
"""

from __future__ import annotations

import base64

import pytest

from tests.serve_fixtures import DEFAULT_FAMILIES, FAMILIES, PROMPTS, family_bundle, family_images
from tests.triton_client import grpc_stream, http_stream

pytest.importorskip("tritonclient.grpc", reason="tritonclient is in the dev extra")
pytest.importorskip("pytriton", reason="nvidia-pytriton (the tritonserver binary) is in the dev extra")

@pytest.fixture(scope="module", params=list(DEFAULT_FAMILIES))
def served(request, tmp_path_factory, tiled):  # tiled: lazy; names the shared exports (xdist group)
    """The family's bundle behind a started TritonServer, with run's texts (cached) to compare."""
    from var_export.runtime import VarRuntime
    from var_export.serve import TritonServer

    bundle = family_bundle(request, request.param)
    images = family_images(request.param, tmp_path_factory.mktemp(f"serve-{request.param}"))
    runtimes = {v: VarRuntime(bundle, var=v) for v in (True, False)}
    cache: dict = {}

    def reference(prompt: str, image: int, var: bool, n: int) -> str:
        key = (prompt, image, var, n)
        if key not in cache:
            cache[key] = runtimes[var].generate(images[image], prompt, max_new_tokens=n).text
        return cache[key]

    with TritonServer(bundle, max_batch=8) as server:
        yield {"name": request.param, "server": server, "bundle": bundle, "images": images,
               "b64": [base64.b64encode(p.read_bytes()).decode() for p in images], "reference": reference}
        pids = server.pids()
    import psutil

    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_serves_the_bundles_family(served):
    log = served["server"].log_path.read_text(errors="replace")
    assert f"'family': '{FAMILIES[served['name']]}'" in log  # the worker's hello


def test_concurrent_requests_of_different_image_sizes_equal_run(served):
    """Three image sizes, VAR on and off, six requests on one stream: one batch whose rows have
    different numbers of image tokens (and, for Qwen, different rope_deltas), leaving at
    different steps."""
    cases = {f"r{k}": (PROMPTS[k % 3], k % 3, k < 3, 4 + 2 * k) for k in range(6)}
    state = grpc_stream(served["server"].grpc_url,
                        [(rid, (p, served["b64"][i], n, v)) for rid, (p, i, v, n) in cases.items()])
    for rid, (p, i, v, n) in cases.items():
        s = state[rid]
        assert s["final"] and s["error"] is None, (rid, s)
        assert s["text"] == served["reference"](p, i, v, n), rid
        assert s["text"] and s["pieces"] > 1  # streamed piece by piece


def test_server_streams_what_cli_run_prints(served, capsys):
    from var_export.cli import main

    for var in (True, False):
        args = ["-q", "run", str(served["bundle"]), "--image", str(served["images"][1]),
                "--prompt", PROMPTS[0], "--max-new-tokens", "8", *([] if var else ["--no-var"])]
        assert main(args) == 0
        printed = capsys.readouterr().out
        streamed = grpc_stream(served["server"].grpc_url, [("x", (PROMPTS[0], served["b64"][1], 8, var))])["x"]
        assert streamed["error"] is None and printed == streamed["text"] + "\n"


def test_http_generate_stream_equals_run(served):
    status, events = http_stream(served["server"].http_url,
                                 {"prompt": PROMPTS[2], "image": served["b64"][2], "max_new_tokens": 6, "var": False})
    assert status == 200 and len(events) > 1
    assert "".join(e["text"] for e in events) == served["reference"](PROMPTS[2], 2, False, 6)
