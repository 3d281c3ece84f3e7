"""Argument groups shared by the subcommands, logging and error printing."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

TOP_DESCRIPTION = """\
Bake Visual Attention Redistribution (VAR; Kang et al., ICLR 2025, "See What You
Are Told: Visual Attention Sink in Large Multimodal Models") into ONNX graphs of
LLaVA-style models, for ONNX Runtime and TensorRT.

  var-export --model tiny-llava --out build/tiny     calibrate, export, bake VAR: ORT bundle
  var-export --model llava --out engine.plan         ... and build a TensorRT engine

Conventions: the knobs follow the released code (MICV-yonsei/VisAttnSink):
  p   = keep fraction of sink attention on a selected row   (default 0.6)
  rho = a row is image-centric iff visual-sink portion <= rho (default 0.5)
The paper writes p as the fraction removed (paper 0.4 == code 0.6) and tests the
visual non-sink ratio >= rho (paper 0.8 == code 0.2). Pass --convention paper to
give the paper's numbers; they are converted and stored in the code convention.
"""

console = Console(stderr=True)


class NoAbbrevParser(argparse.ArgumentParser):
    """Every subcommand parser: no option abbreviations (``--out`` only, never ``--ou``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("var-export")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def add_global_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="only var-export's warnings and errors: no progress bars, no third-party warnings")
    g.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    g.add_argument("--version", action="version", version=f"%(prog)s {_version()}")


def quiet_third_party() -> None:
    """Silence what other libraries print on their own: Python warnings (torch.onnx,
    torchvision, PIL), transformers' logging and weight-loading bars, huggingface_hub bars."""
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TORCH_LOGS", "-onnx")  # torch.onnx's "torchvision is not installed" lines
    import sys

    if "torch" in sys.modules:
        import torch._logging

        torch._logging.set_logs(onnx=logging.ERROR)

    if "transformers" in sys.modules:  # already imported: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def setup_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if getattr(args, "quiet", False) else logging.INFO
    if getattr(args, "verbose", False):
        level = logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_time=False, show_path=False)],
        force=True,
    )
    # third-party exporters and optimizers log at INFO per node; keep them to warnings
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING if not getattr(args, "verbose", False) else logging.INFO)
    if getattr(args, "quiet", False):
        quiet_third_party()
        for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch", "transformers", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.ERROR)


def print_error(exc: BaseException | str) -> None:
    from rich.markup import escape

    name = type(exc).__name__ if isinstance(exc, BaseException) else "error"
    console.print(f"[bold red]{name}:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


def add_model_arg(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    parser.add_argument(
        "--model",
        required=required,
        help="a preset (tiny-llava, llava, llava-13b; see configs/), an HF hub id, or a local HF "
        "directory written by save_pretrained (default: tiny-llava, the embedded offline model)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code from its directory/hub repo (off by default)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading pickle-based weights (*.bin); safetensors only by default",
    )


def var_overrides(args: argparse.Namespace) -> dict:
    """The VAR knobs the user gave (None = not given), as ``resolve_settings`` overrides."""
    return {
        "sink_dims": args.sink_dims,
        "tau": args.tau,
        "rho": args.rho,
        "summ": args.summ,
        "p": args.p,
        "layers": args.layers,
        "exclude_last_layer": args.exclude_last_layer or None,
        "sink_scope": args.sink_scope,
    }


def add_var_args(parser: argparse.ArgumentParser) -> None:
    """The VAR knobs of DESIGN.md §1, shared by the pipeline, calibrate, export and rewrite."""
    g = parser.add_argument_group(
        "VAR settings",
        "Defaults come from the model preset (tau=20, rho=0.5, summ=0.2, p=0.6, layers 2:). "
        "Values are in the released code's convention unless --convention paper.",
    )
    g.add_argument("--sink-dims", help="hidden dims that mark sink tokens, e.g. 1415,2533 (default: preset / calibration)")
    g.add_argument("--tau", type=float, help="sink threshold on max |rmsnorm(x)[sink dims]| (default 20)")
    g.add_argument("--rho", type=float, help="image-centric row iff visual-sink portion <= rho (code; default 0.5). Paper: visual non-sink ratio >= rho (default 0.5)")
    g.add_argument("--summ", type=float, help="image-centric row iff visual attention mass >= summ (default 0.2)")
    g.add_argument("--p", type=float, help="keep fraction of sink attention on selected rows (code; default 0.6). Paper: fraction removed (default 0.4)")
    g.add_argument("--layers", help="VAR layers: a Python slice ('2:', '2:-1') or a comma list ('2,3,5') (default 2:)")
    g.add_argument("--exclude-last-layer", action="store_true", help="leave the last decoder layer untouched (the paper; the released code modifies it)")
    g.add_argument("--sink-scope", choices=("prompt", "all"), help="prompt: only prompt tokens can be sinks (default, as the released code); all: generated tokens too")
    g.add_argument("--heads", choices=("dynamic", "static", "hybrid"), help="dynamic: per-row test in the graph; static: calibrated heads only; hybrid (default): calibrated heads AND the per-row test")
    g.add_argument("--convention", choices=("code", "paper"), default="code", help="how --p and --rho are read (default code)")


class _NullProgress:
    """Stands in for rich Progress under --quiet."""

    def add_task(self, *a, **k) -> int:
        return 0

    def update(self, *a, **k) -> None:
        pass

    def advance(self, *a, **k) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress(args: argparse.Namespace):
    """A rich progress context (or a silent one with --quiet) handed to library calls."""
    if getattr(args, "quiet", False):
        return _NullProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def print_build_summary(result) -> None:
    """A short table: model, VAR settings, sinks, heads, files and sizes."""
    from rich.table import Table

    out = Console()
    t = Table(title=f"bundle {result.bundle_dir}", show_header=False)
    s = result.settings
    if s is None:
        t.add_row("VAR", "off (--no-var baseline)")
    else:
        t.add_row("VAR", f"heads={s.heads}  p={s.p} rho={s.rho} summ={s.summ} tau={s.tau}  sink_scope={s.sink_scope}")
        t.add_row("sink dims", ", ".join(map(str, s.sink_dims)))
        t.add_row("VAR layers", ", ".join(map(str, result.var_layers)))
        if s.heads != "dynamic":
            t.add_row("calibrated heads", " ".join(f"L{layer}H{head}" for layer, head in result.heads) or "none")
    cal = result.calibration
    if cal:
        sinks = []
        for layer in cal.get("layers", []):
            if isinstance(layer, dict) and "layer" in layer:
                sinks.append(f"L{layer['layer']}:{layer.get('sink_count', layer.get('count', '?'))}")
        if sinks:
            t.add_row("sink tokens / layer", " ".join(sinks))
    for name, size in result.files.items():
        t.add_row(name, _human(size))
    t.add_row("time", "  ".join(f"{k} {v:.1f}s" for k, v in result.timings.items()))
    if result.triton_dir:
        t.add_row("triton repository", str(result.triton_dir))
    if getattr(result, "layout_dir", None):
        t.add_row("transformers.js layout", str(result.layout_dir))
    out.print(t)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
