"""The generation worker behind ``var_llava``: ``python -m var_export.serve_worker BUNDLE``.

The Triton Python-backend model (var_export/triton_model.py, inside Triton's stub interpreter)
starts this process with the environment's own Python and talks to it over stdin/stdout,
one JSON object per line. The worker holds the ONNX Runtime sessions, the continuous-batching
engine and every KV / sink-mask cache; only prompts, images and text pieces cross the pipe.

Why a separate process: the pytriton stub embeds its own CPython build (3.11.2 for Python 3.11)
and runs it with the environment's standard library; C extensions of a newer patch release
fail in it (``_ssl``: undefined symbol ``_PyModule_Add``, reached through transformers ->
huggingface_hub), and its string tensors need numpy<2. The stub side needs only the standard
library and numpy; everything else runs here, in the interpreter the bundle was tested with.

Protocol (stdin, from the model)::

    {"id": 7, "prompt": "...", "image": "<base64>", "max_new_tokens": 32, "var": true}
    {"cancel": 7}

stdout, to the model::

    {"ready": true, "max_batch": 16, "var": true, "family": "qwen2_5_vl"}   once, after loading
    {"fatal": "message"}                                 instead of ready, then exit 1
    {"id": 7, "piece": "text"}                           each new piece of text
    {"id": 7, "done": true, "error": null | {"type": "DataError", "message": "..."}}

End of stdin (the model finalized, or its stub died) stops the engine and ends the process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from typing import IO, Any

log = logging.getLogger("var_export.serve_worker")


class _Out:
    """Line-delimited JSON on a stream, one writer at a time."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        line = json.dumps(message) + "\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


def serve(bundle: str, max_batch: int, inp: IO[str], out: _Out) -> int:
    """Load, say ready, then run requests from ``inp`` until it ends. Returns an exit code."""
    from var_export.core.errors import VarExportError
    from var_export.engine import BatchedGenerator, GenRequest
    from var_export.runtime import VarRuntime

    try:
        runtime = VarRuntime(bundle, var=True, verify=False)
    except VarExportError as exc:
        out({"fatal": f"{type(exc).__name__}: {exc}"})
        return 1
    engine = BatchedGenerator(runtime, max_batch=max_batch)
    cancelled: set[int] = set()
    engine.start()
    out({"ready": True, "max_batch": max_batch, "var": runtime.has_var, "family": runtime.family.name})
    try:
        for line in inp:
            msg = json.loads(line)
            if "cancel" in msg:
                cancelled.add(int(msg["cancel"]))
                continue
            rid = int(msg["id"])

            def on_done(error: Exception | None, rid: int = rid) -> None:
                cancelled.discard(rid)
                err = None if error is None else {"type": type(error).__name__, "message": str(error)}
                out({"id": rid, "done": True, "error": err})

            engine.submit(GenRequest(
                prompt=msg.get("prompt", ""),
                image=msg.get("image", ""),
                max_new_tokens=int(msg.get("max_new_tokens", 32)),
                var=bool(msg.get("var", True)),
                on_piece=lambda piece, rid=rid: out({"id": rid, "piece": piece}),
                on_done=on_done,
                is_cancelled=lambda rid=rid: rid in cancelled,
            ))
    finally:
        engine.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m var_export.serve_worker", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--max-batch", type=int, default=16)
    args = p.parse_args(argv)
    # The protocol owns the original stdout; anything a library prints (Python or C) goes to stderr.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="var_llava worker: %(levelname)s %(message)s")
    return serve(args.bundle, args.max_batch, sys.stdin, _Out(protocol))


if __name__ == "__main__":
    sys.exit(main())
