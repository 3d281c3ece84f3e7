"""``var-export bench``: the price of VAR on your own graphs, interleaved, with A/A noise (thin CLI).

The timing core is :mod:`var_export.timing` (no torch). The full comparative benchmark (every VAR
formulation and head mode on tiny-llava and a LLaMA-7B-width slice, plus the PyTorch per-token
comparison) is a harness outside the package: ``make bench`` (``python -m benchmarks.run``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from var_export.cli import common


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help="time VAR decoders against a no-VAR baseline, interleaved, with A/A noise",
        description=(
            "Times decoder graphs (bundle dirs or .onnx files) side by side in one interleaved run: "
            "prefill + decode steps on the same synthetic batch, a second session of the first "
            "baseline as the A/A pair, every ratio printed beside the A/A noise of its group. "
            "Writes bench.json, bench.md, bench.png. Baseline: `var-export export --no-var` "
            "(or --fused). The full benchmark over every VAR formulation is `make bench`."
        ),
    )
    common.add_global_args(p)
    p.add_argument("graphs", nargs="+", type=Path, metavar="GRAPH", help="bundle dir or decoder .onnx to time")
    p.add_argument("--baseline", action="append", type=Path, required=True,
                   help="no-VAR bundle dir or decoder .onnx (repeatable; the first is the A/A reference)")
    p.add_argument("--out", type=Path, default=Path("build/bench"), help="output folder (default build/bench)")
    p.add_argument("--prompt-tokens", type=int, default=633, help="prompt length (default 633, LLaVA-1.5)")
    p.add_argument("--image-tokens", type=int, default=576, help="image tokens in the prompt (default 576)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--decode-steps", type=int, default=8, help="decode tokens per round (default 8)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: ORT's choice)")
    p.add_argument("--group-size", type=int, default=0,
                   help="graphs loaded at once beside the baselines (0 = all; 1 for 7B-size graphs)")
    p.add_argument("--head-dim", type=int, help="the KV cache's head size, when no graph declares it "
                   "(onnxruntime-genai graphs name it kv_cache_dim)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime execution provider (cuda needs onnxruntime-gpu; default cpu)")
    return p


def run(args: argparse.Namespace) -> int:
    from var_export.timing import bench_graphs

    result = bench_graphs(
        args.graphs, args.baseline, args.out,
        prompt_tokens=args.prompt_tokens, image_tokens=args.image_tokens, rounds=args.rounds,
        steps=args.decode_steps, threads=args.threads, group_size=args.group_size,
        provider=args.provider, head_dim=args.head_dim, say=lambda msg: common.console.print(msg, highlight=False),
    )
    print((args.out / "bench.md").read_text())
    common.console.print(f"wrote {args.out}/bench.json, bench.md, bench.png", highlight=False)
    return 0 if result["cases"] else 1
