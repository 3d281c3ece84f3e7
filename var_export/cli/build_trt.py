"""``var-export build-trt BUNDLE --out engine.plan``: lint a bundle's graphs for TensorRT, build."""

from __future__ import annotations

import argparse

from var_export.cli import common

HELP = "lint a bundle's graphs for TensorRT and build TensorRT engines (.plan) for all three"

DESCRIPTION = """\
Build TensorRT engines for a bundle's three graphs (or one .onnx file):

  X.plan                     the decoder (decoder_model_merged.onnx)
  X.vision_encoder.plan      X.embed_tokens.plan
  X.engines.json             flavour, TensorRT version, targets, profiles, precision, sha256

First the lint: TensorRT's own ONNX parser when a TensorRT is importable (parse + support
verdict, errors named by ONNX node and op type), else a hand-written lint (op types, data-
dependent shapes, bool / int64 I/O, dynamic inputs, external data). External data must stay
inside the graph's folder (checked before any parser reads the graph). --lint-only stops after
the lint (exit 0 when it passes, 1 when it does not).

Flavours (--trt-flavor, default auto): tensorrt-rtx (pip install var-export[trt]) builds ahead
of time without a GPU for the compute capabilities of --trt-targets (default: the GPU here, or
80,86,89,120); datacenter tensorrt >= 10 builds on and for the GPU it runs on. Networks are
strongly typed: an fp16 engine comes from an fp16 bundle (`var-export export --dtype fp16`).
Profiles: batch 1..--max-batch (4), new tokens 1..--max-seq, cached tokens 0..--max-past (both
default to the manifest's max_position_embeddings), images per vision call 1..--max-images
(default --max-batch). The vision inputs' ranges come from the bundle's model family: LLaVA-1.5
images, LLaVA-NeXT / OneVision / InternVL tiles (up to the largest tile grid + 1 per image),
Qwen-VL patches (the processor's min/max pixels per image, never more tokens than --max-seq).
"""


def add_trt_args(parser: argparse.ArgumentParser) -> None:
    """Engine options shared with the top-level command (``--out X.plan``)."""
    g = parser.add_argument_group("TensorRT engines")
    g.add_argument("--trt-flavor", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"), help="which TensorRT builds (default auto: tensorrt with a GPU, else tensorrt-rtx)")
    g.add_argument("--trt-targets", default=None, help="TensorRT-RTX compute capabilities, e.g. 80,86,89,120 or current (default: the GPU here, else 80,86,89,120)")
    g.add_argument("--max-batch", type=int, default=None, help="largest batch of the profile (default 4)")
    g.add_argument("--max-seq", type=int, default=None, help="most new tokens per call, i.e. the longest prompt (default: the model's max positions)")
    g.add_argument("--max-past", type=int, default=None, help="most cached tokens (default: the model's max positions - 1)")
    g.add_argument("--trt-opt-level", type=int, default=None, choices=range(6), metavar="0..5", help="builder optimization level (default: TensorRT's, 3); 0 builds fastest, for tests and trials, 5 searches longest")
    g.add_argument("--max-images", type=int, default=None, help="most images per vision call (default: --max-batch, one image per prompt)")
    g.add_argument("--workspace-gb", type=float, default=None, help="builder workspace cap in GiB (default: TensorRT's)")


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory or an .onnx file")
    p.add_argument("--out", help="the decoder engine to write, e.g. engine.plan (not needed with --lint-only)")
    p.add_argument("--lint-only", action="store_true", help="lint and stop (no TensorRT needed)")
    p.add_argument("--hand-lint", action="store_true", help="use the hand-written lint even when a TensorRT parser is here")
    add_trt_args(p)
    return p


def build_config(args: argparse.Namespace):
    from var_export.trt import BuildConfig

    return BuildConfig(
        flavour=args.trt_flavor,
        targets=args.trt_targets,
        max_batch=args.max_batch,
        max_seq=args.max_seq,
        max_past=args.max_past,
        max_images=args.max_images,
        workspace_gb=args.workspace_gb,
        opt_level=args.trt_opt_level,
    )


def print_lint(reports) -> bool:
    """Print each graph's lint report; True when all pass."""
    from rich.markup import escape

    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    for report in reports.values():
        common.console.print(escape(report.format().splitlines()[0]), highlight=False, soft_wrap=True)
        for f in report.findings:
            common.console.print(
                f"  [{style[f.severity]}]{f.severity}[/] {escape(f'[{f.code}] {f.message}')}\n"
                f"      -> {escape(f.fix)}",
                highlight=False,
                soft_wrap=True,
            )
    return all(r.ok for r in reports.values())


def print_engines(engines) -> None:
    from rich.markup import escape

    m = engines.manifest
    common.console.print(
        f"[green]TensorRT engines[/] ({m['flavour']} {m['tensorrt_version']}, {m['precision']}, "
        f"targets {', '.join(m['targets'])})", highlight=False,
    )
    for name, entry in m["engines"].items():
        common.console.print(
            f"  {escape(entry['file'])}  {entry['bytes'] / 1e6:.1f} MB  from {escape(name)} "
            f"in {entry['build_seconds']:.1f} s", highlight=False,
        )
    common.console.print(f"  {escape(str(engines.manifest_path))}", highlight=False)


def engine_progress(progress):
    """Adapt a rich Progress (add_task/update) to the builder's callback (phase, done, total)."""
    tasks: dict[str, int] = {}

    def report(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total or None)
        progress.update(tasks[phase], completed=done, total=total or None)

    return report


def run(args: argparse.Namespace) -> int:
    from var_export import trt
    from var_export.core.errors import ConfigError
    from var_export.trt import TensorRTLintError

    reports = trt.lint_sources(args.bundle, "none" if args.hand_lint else args.trt_flavor)
    ok = print_lint(reports)
    if args.lint_only:
        return 0 if ok else 1
    if not args.out:
        raise ConfigError("build-trt needs --out ENGINE.plan (or --lint-only).")
    for report in reports.values():
        if not report.ok:
            raise TensorRTLintError(report)
    with common.progress(args) as progress:
        engines = trt.build_engines(
            args.bundle, args.out, build_config(args), progress=engine_progress(progress)
        )
    print_engines(engines)
    return 0
