"""``var-export serve BUNDLE``: a real Triton server streaming generations from a bundle."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from var_export.cli import common

HELP = "serve a bundle with a real Triton server (var_llava: streamed generation, HTTP + gRPC)"

DESCRIPTION = """\
Write the var_llava repository (see `var-export triton`) into a temporary folder and run
tritonserver on it, bound to 127.0.0.1: the one nvidia-pytriton carries (pip install
nvidia-pytriton), else --tritonserver PATH or tritonserver on PATH. Prints one line when the
model is ready; SIGINT (Ctrl-C) or SIGTERM stops the server, its model processes and removes
the temporary repository.

  gRPC: tritonclient.grpc start_stream + async_stream_infer("var_llava", ...)
  HTTP: POST /v2/models/var_llava/generate_stream {"prompt": ..., "image": "<base64>"}
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", type=Path, help="a bundle directory")
    p.add_argument("--http-port", type=int, help="HTTP port (default: a free one)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: a free one)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (default 16)")
    p.add_argument("--tritonserver", type=Path, help="a tritonserver binary (default: nvidia-pytriton's, else PATH)")
    return p


def run(args: argparse.Namespace) -> int:
    from var_export.serve import TritonServer

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = TritonServer(args.bundle, http_port=args.http_port, grpc_port=args.grpc_port,
                          max_batch=args.max_batch, tritonserver=args.tritonserver)
    with server:
        print(f"var_llava ready: http {server.http_url} grpc {server.grpc_url} (pid {server.process.pid}); "
              "Ctrl-C to stop", flush=True)
        if not stop.is_set():
            server.wait(stop)
    common.console.print("stopped", highlight=False)
    return 0
