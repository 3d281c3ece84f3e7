"""``python -m benchmarks.gpu_check --out DIR``: the checks only a CUDA machine shows, in one run.

1. ONNX Runtime CUDA EP parity: every graph of the benchmark (the two no-VAR baselines and each VAR
   formulation x head mode) on tiny-llava, batch 2 left padded, prefill + decode steps, against the
   PyTorch reference (``VarReference``, CPU, fp32) and against the same graph on the CPU EP. Also
   whether every node of each graph is placed on CUDA (CPU fallback disabled in a probe session).
2. The VAR price table on the CUDA EP (``benchmarks/bench_var.py``), for tiny-llava and the
   LLaMA-7B-width slice.
3. TensorRT: whether the ``tensorrt`` module is importable (the engine build needs it).

Writes ``gpu_check.json`` and the bench files under ``--out``; prints as it goes. Needs
onnxruntime-gpu. Nothing here runs in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np


def _say(msg: str) -> None:
    print(msg, flush=True)


PLACEMENT_LINES: list[str] = []  # ORT's "... placed on [EP]" log lines, for the report


def cpu_placed_ops(path: Path) -> dict[str, int]:
    """Op types ORT placed on the CPU EP in a CUDA session (from its verbose placement log)."""
    import os
    import re
    import tempfile

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 0
    with tempfile.TemporaryFile(mode="w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read()
    counts: dict[str, int] = {}
    on_cpu = False
    for line in text.splitlines():
        if "placed on [" in line:
            on_cpu = "placed on [CPUExecutionProvider]" in line
            PLACEMENT_LINES.append(line.strip()[-160:])
            if on_cpu and "All nodes" in line:
                return {"ALL NODES": int(line.rsplit(":", 1)[1])}
            if on_cpu:  # ORT lists the nodes on the following lines (with their own log prefix)
                counts["nodes"] = int(line.rsplit(":", 1)[1])
            continue
        m = re.match(r"^\s+(\w+) \(", line)
        if on_cpu and m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
        elif not line.startswith(" "):
            on_cpu = False
    return counts


def cuda_parity(out: Path, steps: int = 4, provider: str = "cuda") -> dict:

    from benchmarks.bench_var import build_graphs, is_var, tiny_llava_case
    from var_export.calibration.reference import VarReference
    from var_export.timing import ort_session, run_decode

    case = tiny_llava_case(batch=2, seed=7, decode_steps=steps)
    paths = build_graphs(case, out / "graphs-parity")
    valid = case.valid_rows()
    rows = {}
    for name, path in paths.items():
        var = is_var(name)
        mode = name.rsplit("-", 1)[1] if var else None
        settings = case.settings.replace(heads=mode) if var else None
        heads = case.heads if mode in ("static", "hybrid") else None
        ref = case.reference_logits(VarReference(case.model, settings, heads), steps)
        cuda = run_decode(ort_session(path, provider=provider), case, steps, var=var)
        cpu = run_decode(ort_session(path, provider="cpu"), case, steps, var=var)

        def maxdiff(a: list, b: list) -> float:
            d = [float(np.abs(a[0][valid] - b[0][valid]).max())]
            d += [float(np.abs(x - y).max()) for x, y in zip(a[1:], b[1:])]
            return max(d)

        rows[name] = {
            "cuda_vs_reference": maxdiff(cuda.logits, ref),
            "cuda_vs_cpu_ep": maxdiff(cuda.logits, cpu.logits),
            "ops_on_cpu": cpu_placed_ops(path),
        }
        _say(f"parity {name:20s} CUDA vs reference {rows[name]['cuda_vs_reference']:.2e}  "
             f"CUDA vs CPU EP {rows[name]['cuda_vs_cpu_ep']:.2e}  ops left on CPU: {rows[name]['ops_on_cpu']}")
    return {"case": "tiny-llava batch 2 left-padded", "decode_steps": steps, "provider": provider, "graphs": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--sizes", default="tiny,slice")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA / cuDNN libraries from the nvidia-* wheels
    report: dict = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    _say(f"onnxruntime {ort.__version__}, providers {report['providers']}")
    try:
        import tensorrt  # noqa: F401

        report["tensorrt"] = tensorrt.__version__
    except Exception as exc:  # noqa: BLE001
        report["tensorrt"] = f"not importable: {exc}"
    _say(f"tensorrt: {report['tensorrt']}")

    def section(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:  # noqa: BLE001 - one failing section must not hide the others
            report[name] = {"error": traceback.format_exc()[-3000:]}
            _say(report[name]["error"])
        report.setdefault("seconds", {})[name] = round(time.perf_counter() - t, 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    section("parity", lambda: cuda_parity(args.out))
    section("parity-no-tf32", lambda: cuda_parity(args.out, provider="cuda-fp32"))
    report["placement_log"] = sorted(set(PLACEMENT_LINES))[:40]
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    def bench(size: str) -> dict:
        from benchmarks.bench_var import BenchConfig, run_bench
        from var_export.timing import markdown_table

        config = BenchConfig(sizes=(size,), rounds=args.rounds, decode_steps=args.decode_steps,
                             provider="cuda", torch_compare=False, profile=True)
        result = run_bench(config, args.out / f"bench-{size}", progress=_say)
        _say(markdown_table(result))
        return {"table": markdown_table(result)}

    for size in filter(None, args.sizes.split(",")):
        section(f"bench-{size}", lambda size=size: bench(size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
