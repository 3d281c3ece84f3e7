"""``var-export bench``: the price of VAR vs the unfused and fused baselines (thin CLI)."""

from __future__ import annotations

import argparse
from pathlib import Path

from var_export.cli import common


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="time VAR graphs against the no-VAR baselines (unfused and fused), interleaved, with A/A noise",
        description=(
            "Exports the unfused (eager, opset 18) and fused (SDPA, opset 23 Attention) decoders without "
            "VAR, applies every VAR formulation in every head mode, and times them side by side in one "
            "interleaved run (A/A noise beside every ratio). Writes bench.json, bench.md, bench.png."
        ),
    )
    common.add_global_args(p)
    p.add_argument("--out", type=Path, default=Path("build/bench"), help="output folder (default build/bench)")
    p.add_argument("--size", action="append", choices=("tiny", "slice", "slice-tiny"),
                   help="tiny: tiny-llava; slice: LLaMA-7B-width 2-layer decoder (GBs, minutes); "
                   "slice-tiny: the slice at toy width (repeatable; default tiny)")
    p.add_argument("--formulation", action="append", choices=("naive", "fused-qk", "fused-mask"),
                   help="VAR formulations to time (repeatable; default all)")
    p.add_argument("--heads", action="append", choices=("dynamic", "static", "hybrid"),
                   help="head modes to time (repeatable; default all)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--decode-steps", type=int, default=8, help="decode tokens per round (default 8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    p.add_argument("--group-size", type=int, default=0,
                   help="VAR graphs loaded at once beside the baselines (0 = all; use 1 for the 7B slice)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime execution provider (cuda needs onnxruntime-gpu; default cpu)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch per-token comparison")
    p.add_argument("--no-profile", action="store_true", help="skip the ORT per-node-type profiles")
    return p


def run(args: argparse.Namespace) -> int:
    from var_export.bench import FORMULATIONS, MODES, BenchConfig, run_bench

    config = BenchConfig(
        sizes=tuple(args.size or ("tiny",)),
        formulations=tuple(args.formulation or FORMULATIONS),
        modes=tuple(args.heads or MODES),
        rounds=args.rounds,
        decode_steps=args.decode_steps,
        threads=args.threads,
        group_size=args.group_size,
        torch_compare=not args.no_torch,
        profile=not args.no_profile,
        provider=args.provider,
    )
    result = run_bench(config, args.out, progress=lambda msg: common.console.print(msg, highlight=False))
    from var_export.bench import markdown_table

    print(markdown_table(result))
    common.console.print(f"wrote {args.out}/bench.json, bench.md, bench.png", highlight=False)
    return 0
