"""``var-export build-trt BUNDLE --out engine.plan``: lint the decoder for TensorRT, then build."""

from __future__ import annotations

import argparse
from pathlib import Path

from var_export.cli import common

HELP = "lint a bundle's decoder for TensorRT and build a TensorRT engine (.plan)"

DESCRIPTION = """\
Build a TensorRT engine from a bundle's decoder_model_merged.onnx (or any .onnx file).

First a preflight lint that needs no TensorRT: op types the TensorRT ONNX parser supports,
no data-dependent shapes (NonZero, Loop, If ...; in the VAR nodes no ScatterND either), bool / int64
graph I/O, dynamic inputs that need optimization profiles, external data. Errors stop the
build; --lint-only stops after the lint (exit 0 when it passes, 1 when it does not).

The build needs the tensorrt Python package and an NVIDIA GPU:
  pip install var-export[trt]
One optimization profile covers batch 1..--max-batch, new tokens 1..--max-seq and cached
tokens 0..--max-past (optimum at batch 1, one new token, half the past).
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name,
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory or an .onnx file")
    p.add_argument("--out", help="the engine file to write, e.g. engine.plan (not needed with --lint-only)")
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels (default: FP32)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of the profile (default 4)")
    p.add_argument("--max-seq", type=int, default=None, help="most new tokens per call, i.e. the longest prompt (default 1024)")
    p.add_argument("--max-past", type=int, default=None, help="most cached tokens (default 1024)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace in GiB (default 4)")
    p.add_argument("--lint-only", action="store_true", help="run the TensorRT lint and stop (no TensorRT needed)")
    return p


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from var_export import trt
    from var_export.core.errors import ConfigError

    graph = _graph(args.bundle)
    report = trt.lint_for_tensorrt(graph)
    style = {"error": "bold red", "warning": "yellow", "info": "dim"}
    common.console.print(escape(report.format().splitlines()[0]), highlight=False, soft_wrap=True)
    for f in report.findings:
        common.console.print(
            f"  [{style[f.severity]}]{f.severity}[/] {escape(f'[{f.code}] {f.message}')}\n"
            f"      -> {escape(f.fix)}",
            highlight=False,
            soft_wrap=True,
        )
    if args.lint_only:
        return 0 if report.ok else 1
    if not args.out:
        raise ConfigError("build-trt needs --out ENGINE.plan (or --lint-only).")
    report.raise_if_errors()
    limits = trt.ProfileLimits.from_max(
        max_batch=args.max_batch, max_seq=args.max_seq, max_past=args.max_past
    )
    common.console.print(
        escape(trt.describe_profiles(trt.make_profiles(trt.graph_input_shapes(graph), limits))),
        highlight=False,
        style="dim",
        soft_wrap=True,
    )
    with _progress(args) as progress:
        out = trt.build_engine(
            graph,
            Path(args.out),
            fp16=args.fp16,
            profiles=limits,
            workspace_gb=args.workspace_gb,
            lint=False,  # done above
            progress=progress,
        )
    common.console.print(f"wrote {escape(str(out))}", highlight=False)
    return 0


def _graph(path: str) -> Path:
    """The decoder of a bundle (checked by load_bundle when it is one), or the .onnx given."""
    from var_export import trt

    p = Path(path)
    if p.is_dir():
        try:
            from var_export.bundle import load_bundle
        except ImportError:  # bundle module not available: plain directory lookup
            return trt.resolve_graph(p)
        return trt.resolve_graph(load_bundle(p))
    return trt.resolve_graph(p)


class _progress:
    """A rich progress bar fed by build_engine's progress(phase, done, total) callback."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = not getattr(args, "quiet", False)
        self.bar = None
        self.tasks: dict[str, int] = {}

    def __enter__(self):  # -> ProgressFn | None
        if not self.enabled:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=common.console
        )
        self.bar.__enter__()
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        assert self.bar is not None
        if phase not in self.tasks:
            self.tasks[phase] = self.bar.add_task(phase, total=total or None)
        self.bar.update(self.tasks[phase], completed=done, total=total or None)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
