"""Clients of the var_llava model for the server tests (test_triton.py, test_triton_families.py):
requests on one gRPC stream (tritonclient) and the HTTP generate_stream endpoint (urllib)."""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request

import numpy as np

from var_export.triton import MODEL_NAME

TIMEOUT = 60.0  # seconds any one request may take


def infer_inputs(prompt: str | None, image: str | None, n: int | None = None, var: bool | None = None) -> list:
    import tritonclient.grpc as grpcclient

    out = []
    for name, value, dtype in (("prompt", prompt, "BYTES"), ("image", image, "BYTES")):
        if value is not None:
            t = grpcclient.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
            out.append(t)
    if n is not None:
        t = grpcclient.InferInput("max_new_tokens", [1], "INT32")
        t.set_data_from_numpy(np.array([n], np.int32))
        out.append(t)
    if var is not None:
        t = grpcclient.InferInput("var", [1], "BOOL")
        t.set_data_from_numpy(np.array([var], bool))
        out.append(t)
    return out


def grpc_stream(url: str, requests: list[tuple], *, stop_after: int | None = None) -> dict[str, dict]:
    """Send requests on one gRPC stream; collect {request id: {"text", "final", "error"}}."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    state: dict[str, dict] = {}
    try:
        for rid, args in requests:
            state[rid] = {"text": "", "final": False, "error": None, "pieces": 0}
            client.async_stream_infer(MODEL_NAME, infer_inputs(*args), request_id=rid, enable_empty_final_response=True)
        deadline = time.monotonic() + TIMEOUT
        while not all(s["final"] or s["error"] for s in state.values()):
            result, error = events.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                if len(state) != 1:
                    raise AssertionError(f"unexpected stream error: {error}")
                next(iter(state.values()))["error"] = str(error)
                continue
            response = result.get_response()
            s = state[response.id]
            text = result.as_numpy("text")
            if text is not None:
                s["text"] += text[0].decode()
                s["pieces"] += 1
            s["final"] = response.parameters["triton_final_response"].bool_param
            if stop_after is not None and s["pieces"] >= stop_after:
                return state  # the client goes away mid-stream (finally: stream closed)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return state


def http_stream(url: str, body: dict, *, read_events: int | None = None) -> tuple[int, list[dict]]:
    req = urllib.request.Request(
        f"http://{url}/v2/models/{MODEL_NAME}/generate_stream", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    events: list[dict] = []
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if read_events is not None and len(events) >= read_events:
                        break  # closing the connection: a client that disconnects
            return resp.status, events
    except urllib.error.HTTPError as exc:
        return exc.code, [json.loads(ln[5:] if ln.startswith("data:") else ln)
                          for ln in exc.read().decode().splitlines() if ln.strip()]
