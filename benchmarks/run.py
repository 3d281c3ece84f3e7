"""``python -m benchmarks.run [--full] --out DIR`` (``make bench``): the VAR price benchmark.

Default: the quick run (tiny-llava and the toy-width slice, 2 rounds). ``--full``: tiny-llava and the
LLaMA-7B-width slice (hidden 4096, 32 heads, 2 layers, 633-token prompt), 5 rounds of 16 decode
steps, one VAR graph at a time beside the baselines (memory: ~4 sessions of ~2.1 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from benchmarks.bench_var import config_for, run_bench
from var_export.timing import markdown_table, write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    p.add_argument("--full", action="store_true", help="the LLaMA-7B-width slice (minutes, ~10 GB RAM)")
    p.add_argument("--out", type=Path, default=Path("build/bench"))
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime execution provider")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch per-token comparison")
    p.add_argument("--formulations", help="comma list of VAR formulations to time (default: all of "
                   "naive, fused-qk, fused-mask, kernel)")
    p.add_argument("--modes", help="comma list of head modes (default: dynamic, static, hybrid)")
    p.add_argument("--from-json", type=Path, metavar="BENCH_JSON",
                   help="measure nothing: rewrite bench.md and bench.png from a bench.json into --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.from_json:
        write_report(json.loads(args.from_json.read_text()), args.out)
        print(f"wrote {args.out}/bench.json, bench.md, bench.png from {args.from_json}")
        return 0
    config = dataclasses.replace(
        config_for(full=args.full, threads=args.threads), provider=args.provider,
        torch_compare=not args.no_torch,
    )
    if args.formulations:
        config = dataclasses.replace(config, formulations=tuple(args.formulations.split(",")))
    if args.modes:
        config = dataclasses.replace(config, modes=tuple(args.modes.split(",")))
    result = run_bench(config, args.out, progress=print)
    print(markdown_table(result))
    print(f"wrote {args.out}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
