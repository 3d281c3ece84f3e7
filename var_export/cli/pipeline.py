"""``var-export --model M --out X``: the one command (calibrate → export → VAR → bundle [→ engine])."""

from __future__ import annotations

import argparse
from pathlib import Path

from var_export.cli import common


def add_build_args(parser: argparse.ArgumentParser, *, out_help: str) -> None:
    """Arguments shared by the top-level command and ``export``."""
    common.add_model_arg(parser)
    parser.add_argument("--out", type=Path, help=out_help)
    g = parser.add_argument_group("calibration")
    g.add_argument("--calibration", type=Path, help="use this calibration.json instead of calibrating")
    g.add_argument("--data", type=Path, help="calibration images folder (+ optional prompts.txt); default: built-in synthetic images")
    g.add_argument("--head-threshold", type=float, default=0.5, help="image-centric score a head needs to be selected (default 0.5)")
    g.add_argument("--allow-noop", action="store_true", help="write a hybrid/static bundle even when calibration selected no head (it then changes nothing); refused by default")
    g = parser.add_argument_group("graphs")
    g.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="graph precision (VAR arithmetic stays fp32; default fp32)")
    g.add_argument("--opset", type=int, help="ONNX opset of the exported graphs (default 18; 23 with --fused)")
    g.add_argument("--fused", action="store_true", help="export SDPA attention as the fused ONNX Attention op (opset 23) and bake VAR around it (class masses + shifted scores); the TensorRT lint warns that it needs a parser with opset-23 Attention")
    g.add_argument("--formulation", choices=("naive", "fused-qk", "fused-mask", "kernel"), help="how VAR is baked in (default naive; fused-qk with --fused): naive = eager attention, VAR on the Softmax; fused-qk / fused-mask = the ONNX Attention op kept, VAR as class masses + a score shift (TensorRT-ready); kernel = each VAR layer's attention becomes var_export::VarAttention, a one-pass ONNX Runtime CPU custom op (fp32; compiled on first use, docs/kernel.md)")
    g.add_argument("--format", choices=("onnx", "triton"), default="onnx", help="triton: also write OUT-triton, a Triton model repository whose var_llava model (Python backend, decoupled) streams generations from the bundle (see var-export triton / serve)")
    g.add_argument("--layout", choices=("bundle", "transformers.js"), default="bundle", help="transformers.js: also write OUT-transformers.js, the onnx-community layout (onnx/*.onnx, preprocessor_config.json; the sink cache named so transformers.js feeds it back; docs/serving.md)")
    common.add_var_args(parser)


def options_from_args(args: argparse.Namespace, *, no_var: bool = False):
    from var_export.pipeline import BuildOptions

    overrides = common.var_overrides(args)
    return BuildOptions(
        out=args.out,
        model=args.model,
        heads=args.heads,
        overrides=overrides,
        convention=args.convention,
        calibration=args.calibration,
        data=args.data,
        head_threshold=args.head_threshold,
        no_var=no_var,
        dtype=args.dtype,
        opset=args.opset,
        fused=args.fused,
        formulation=args.formulation,
        trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
        triton=args.format == "triton",
        allow_noop=args.allow_noop,
        layout=args.layout,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_build_args(
        parser,
        out_help="a bundle directory (ONNX Runtime), or X.plan for a TensorRT engine with its bundle beside it",
    )
    from var_export.cli.build_trt import add_trt_args

    add_trt_args(parser)  # strongly typed engines: fp16 comes from --dtype fp16


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from var_export.pipeline import build_bundle, build_plan

    if args.out is None:
        parser.print_help()
        return 2
    opts = options_from_args(args)
    with common.progress(args) as progress:
        if Path(args.out).suffix == ".plan":
            from var_export.cli.build_trt import build_config, engine_progress, print_engines

            result, engines = build_plan(
                opts, progress, engine=build_config(args), engine_progress=engine_progress(progress)
            )
            common.print_build_summary(result)
            print_engines(engines)
            return 0
        result = build_bundle(opts, progress)
    common.print_build_summary(result)
    return 0
