"""The Triton Python-backend model ``var_llava`` (copied as ``model.py`` by var_export.triton).

Glue only, standard library + numpy (it runs in Triton's stub interpreter): it starts the
generation worker (``python -m var_export.serve_worker``, the environment's own Python, named in
``environment.json`` beside this file), forwards each request to it and streams the worker's
text pieces back through the request's response sender (decoupled mode), then the final flag.
A request error (bad base64, missing or too long prompt) is that request's error response;
a client that goes away is cancelled in the worker. See var_export/serve_worker.py for why the
generation runs in its own process.

The stub does not inherit PYTHONPATH, and ``triton_python_backend_utils`` imports numpy: so,
before anything else, ``environment.json``'s ``stub_sys_path`` goes first on sys.path (a
private numpy<2 when the environment's numpy is 2; docs/serving.md).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ENV = json.loads(Path(__file__).with_name("environment.json").read_text())
for _path in reversed(ENV.get("stub_sys_path", [])):
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)

import subprocess  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (provided by the Python backend)

CANCEL_POLL_S = 0.05  # how often client cancellations / disconnects are looked for


def _error(message: str, code: str = "INVALID_ARG") -> object:
    try:
        return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))
    except (AttributeError, TypeError):  # a Python backend without error codes
        return pb_utils.TritonError(message)


def _scalar(request: object, name: str) -> object | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"input '{name}': expected one value (dims [1]), found {values.size}.")
    return values[0]


def _text(value: object, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"input '{name}': expected UTF-8 text ({exc}).") from exc
    return str(value)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        bundle = Path(params.get("bundle_dir") or "bundle")
        if not bundle.is_absolute():
            bundle = Path(args["model_repository"]) / args["model_version"] / bundle
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(ENV.get("worker_pythonpath", [])))
        self.worker = subprocess.Popen(
            [ENV["python"], "-m", "var_export.serve_worker", str(bundle), "--max-batch", params.get("max_batch") or "16"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        hello = json.loads(self.worker.stdout.readline() or '{"fatal": "the worker exited while loading"}')
        if not hello.get("ready"):
            self.worker.wait(10)
            raise RuntimeError(f"var_llava could not load the bundle {bundle}: {hello.get('fatal')}")
        self.lock = threading.Lock()
        self.senders: dict[int, object] = {}
        self.next_id = 0
        self.closing = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()
        pb_utils.Logger.log_info(f"var_llava: bundle {bundle}, worker pid {self.worker.pid}, {hello}")

    # -- requests in ----------------------------------------------------------------------------

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                message = self._message(request)
            except Exception as exc:  # a malformed request: answer it, keep serving
                sender.send(pb_utils.InferenceResponse(error=_error(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            with self.lock:
                rid = self.next_id
                self.next_id += 1
                self.senders[rid] = sender
                self._write({"id": rid, **message})
        return None

    def _message(self, request: object) -> dict:
        prompt, image = _scalar(request, "prompt"), _scalar(request, "image")
        if prompt is None or image is None:
            raise ValueError("inputs 'prompt' and 'image' (base64 of a PNG/JPEG) are required.")
        message = {"prompt": _text(prompt, "prompt"), "image": _text(image, "image")}
        n, var = _scalar(request, "max_new_tokens"), _scalar(request, "var")
        if n is not None:
            message["max_new_tokens"] = int(n)
        if var is not None:
            message["var"] = bool(var)
        return message

    def _write(self, message: dict) -> None:
        self.worker.stdin.write(json.dumps(message) + "\n")
        self.worker.stdin.flush()

    # -- text out -------------------------------------------------------------------------------

    def _read(self) -> None:
        """Worker messages -> responses; when the worker dies, every open request gets an error."""
        for line in self.worker.stdout:
            try:
                msg = json.loads(line)
            except ValueError:  # not the protocol (the worker sends prints to stderr; be safe)
                pb_utils.Logger.log_warn(f"var_llava: worker said {line.strip()[:200]!r}")
                continue
            with self.lock:
                sender = self.senders.get(msg.get("id"))
                if sender is None:
                    continue
                if msg.get("done"):
                    del self.senders[msg["id"]]
            try:
                if "piece" in msg:
                    out = pb_utils.Tensor("text", np.array([msg["piece"].encode("utf-8")], dtype=np.object_))
                    sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
                elif msg["error"] is None:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    err = msg["error"]
                    code = "CANCELLED" if err["type"] == "RequestCancelled" else "INVALID_ARG"
                    sender.send(pb_utils.InferenceResponse(error=_error(f"{err['type']}: {err['message']}", code)),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as exc:  # the client went away: stop generating for it
                pb_utils.Logger.log_info(f"var_llava: request {msg.get('id')} dropped ({exc})")
                self._cancel(msg.get("id"))
        if not self.closing.is_set():
            pb_utils.Logger.log_error(f"var_llava: the worker exited (code {self.worker.poll()})")
        with self.lock:
            orphans, self.senders = list(self.senders.values()), {}
        for sender in orphans:
            try:
                sender.send(pb_utils.InferenceResponse(error=_error("var_llava: the generation worker stopped", "INTERNAL")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # noqa: S110 - its client is gone too
                pass

    def _cancel(self, rid: object) -> None:
        with self.lock:
            sender = self.senders.pop(rid, None)  # type: ignore[arg-type]
            if sender is None:
                return
            try:
                self._write({"cancel": rid})
            except OSError:
                pass
        try:  # close the request on Triton's side too (its client may be gone already)
            sender.send(pb_utils.InferenceResponse(error=_error("var_llava: request cancelled", "CANCELLED")),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: S110
            pass

    def _watch(self) -> None:
        """Clients that cancelled or disconnected: tell the worker to drop them."""
        while not self.closing.wait(CANCEL_POLL_S):
            with self.lock:
                gone = [rid for rid, s in self.senders.items() if s.is_cancelled()]
            for rid in gone:
                self._cancel(rid)

    def finalize(self) -> None:
        self.closing.set()
        try:
            self.worker.stdin.close()  # end of input: the worker stops its engine and exits
            self.worker.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.worker.kill()
            self.worker.wait(5)
