"""``python -m benchmarks.bench_serve [--bundle DIR]``: load on a real Triton server (localhost).

Starts ``var_llava`` (var_export.serve.TritonServer) on a bundle (default: builds the tiny-llava
VAR bundle into build/serve-bench/bundle), then sends a fixed number of streamed gRPC requests
at each concurrency (1, 4, 16 by default) and stops by itself. Per level: requests/s, generated
tokens/s (streamed pieces), p50 / p99 latency (send -> final response) and time to first piece.
Levels run in the order 1, 4, 16, then 1 again: the two concurrency-1 rows are the A/A noise.
``--compare-unbatched`` also runs the same levels on a server with ``--max-batch 1`` (no
continuous batching) and prints the throughput ratio batched / unbatched per level.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import platform
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

PROMPTS = ("What is in the picture?", "Describe the red square and the picture in words.", "Colors?")
REQUEST_TIMEOUT_S = 120.0


def _one(url: str, prompt: str, image: str, max_new_tokens: int) -> tuple[float, float, int]:
    """One streamed request on its own stream: (latency s, first piece s, pieces)."""
    import tritonclient.grpc as grpcclient

    events: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    inputs = []
    for name, value in (("prompt", prompt), ("image", image)):
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
        inputs.append(t)
    n = grpcclient.InferInput("max_new_tokens", [1], "INT32")
    n.set_data_from_numpy(np.array([max_new_tokens], np.int32))
    inputs.append(n)
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    t0 = time.perf_counter()
    first, pieces = None, 0
    try:
        client.async_stream_infer("var_llava", inputs, enable_empty_final_response=True)
        while True:
            result, error = events.get(timeout=REQUEST_TIMEOUT_S)
            if error is not None:
                raise RuntimeError(str(error))
            if result.as_numpy("text") is not None:
                pieces += 1
                first = first if first is not None else time.perf_counter() - t0
            if result.get_response().parameters["triton_final_response"].bool_param:
                return time.perf_counter() - t0, first or 0.0, pieces
    finally:
        client.stop_stream()
        client.close()


def run_level(url: str, images: list[str], concurrency: int, requests: int, max_new_tokens: int) -> dict:
    """``requests`` requests, at most ``concurrency`` in flight (a fixed pool of client threads)."""
    jobs: queue.Queue[int] = queue.Queue()
    for i in range(requests):
        jobs.put(i)
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                i = jobs.get_nowait()
            except queue.Empty:
                return
            r = _one(url, PROMPTS[i % 3], images[i % len(images)], max_new_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S * requests)
    wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    return {
        "concurrency": concurrency, "requests": len(results), "wall_s": wall,
        "req_per_s": len(results) / wall, "tok_per_s": sum(r[2] for r in results) / wall,
        "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
        "ttft_p50_s": float(np.percentile([r[1] for r in results], 50)),
    }


def serve_levels(bundle: Path, levels: list[int], requests: int, max_new_tokens: int, max_batch: int,
                 images: list[str]) -> list[dict]:
    from var_export.serve import TritonServer

    rows = []
    with TritonServer(bundle, max_batch=max_batch) as server:
        run_level(server.grpc_url, images, 1, 2, max_new_tokens)  # warm-up
        for c in [*levels, levels[0]]:
            row = run_level(server.grpc_url, images, c, requests, max_new_tokens)
            row["max_batch"] = max_batch
            rows.append(row)
            logging.info("max_batch %d, concurrency %d: %.2f req/s, p50 %.2f s", max_batch, c, row["req_per_s"], row["p50_s"])
    return rows


def _tiny_bundle(out: Path) -> Path:
    from var_export.pipeline import BuildOptions, build_bundle

    if not (out / "manifest.json").is_file():
        build_bundle(BuildOptions(out=out, model="tiny-llava", heads="dynamic"))
    return out


def _images(n: int = 3) -> list[str]:
    import io

    from var_export.calibration.tiny_llava import synthetic_images

    out = []
    for im in synthetic_images(n, seed=7):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def table(rows: list[dict], machine: str) -> str:
    lines = [f"machine: {machine}", "",
             "| max_batch | concurrency | requests | req/s | tokens/s | p50 latency (s) | p99 latency (s) | p50 first piece (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} "
                     f"| {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['ttft_p50_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, help="a bundle (default: tiny-llava, built once into --out)")
    p.add_argument("--out", type=Path, default=Path("build/serve-bench"))
    p.add_argument("--concurrency", default="1,4,16", help="comma list (default 1,4,16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--compare-unbatched", action="store_true", help="also a server with --max-batch 1")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = args.bundle or _tiny_bundle(args.out / "bundle")
    levels = [int(c) for c in args.concurrency.split(",")]
    images = _images()
    rows = serve_levels(bundle, levels, args.requests, args.max_new_tokens, max(levels), images)
    if args.compare_unbatched:
        rows += serve_levels(bundle, levels, args.requests, args.max_new_tokens, 1, images)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}, Python {platform.python_version()}"
    text = table(rows, machine)
    if args.compare_unbatched:
        batched = {r["concurrency"]: r for r in rows if r["max_batch"] != 1}
        plain = {r["concurrency"]: r for r in rows if r["max_batch"] == 1}
        text += "\n\nthroughput batched / unbatched: " + ", ".join(
            f"c={c}: {batched[c]['req_per_s'] / plain[c]['req_per_s']:.2f}x" for c in levels)
    a, b = [r for r in rows if r["concurrency"] == levels[0] and r["max_batch"] != 1][:2]
    text += f"\nA/A (concurrency {levels[0]}, first vs last run): {b['req_per_s'] / a['req_per_s']:.2f}x"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (args.out / "serve.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
