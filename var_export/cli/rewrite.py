"""``var-export rewrite``: bake VAR into an existing decoder ONNX (Optimum, TorchScript, dynamo)."""

from __future__ import annotations

import argparse
from typing import Any

from var_export.cli import common

DATA_HELP = (
    "how external-data weights reach the output. auto (default): shared by relative location when "
    "--out is in the input's folder; in another folder a reflink (copy-on-write filesystems), else a "
    "hard link (same filesystem; instant whatever the size), else a copy with a progress bar. The "
    "catch of a hard link: onnx.load, onnx.checker and onnx-ir refuse a data file with several links "
    "(the input's too, until one link is removed); ONNX Runtime, TensorRT and var-export load it. "
    "copy: a standalone file (reflink or copy), never a hard link. link: a hard link first. "
    "share: reference the input's file (output in the input's folder only). The plan printed at the "
    "end says how each data file got there."
)


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="bake VAR into an existing decoder ONNX file (e.g. an Optimum export)",
        description="Rewrite a decoder ONNX exported by someone else (Optimum "
        "text-generation-with-past, torch.onnx TorchScript or dynamo; inputs_embeds or input_ids) "
        "into a VAR decoder: adds the inputs visual_token_mask [B,T] bool, past_sink_mask "
        "[B,Lv,P] bool and the output present_sink_mask [B,Lv,T] bool. External-data weights are "
        "never loaded: an output in the input's folder references the same data file; an output "
        "elsewhere gets a reflink, a hard link or a (sparse, copy-offloaded) copy of it (--data). "
        "External-data locations outside the model's folder are refused. Without --calibration "
        "the head mode defaults to dynamic.",
    )
    p.add_argument("input", metavar="IN.onnx", help="decoder graph to rewrite (never overwritten)")
    p.add_argument("--out", metavar="OUT.onnx", help="where to write the VAR decoder (atomically)")
    p.add_argument("--calibration", metavar="JSON",
                   help="calibration.json: sink dims, settings and the head list for static/hybrid")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would change per layer; write nothing")
    p.add_argument("--data", choices=("auto", "share", "copy", "link"), default="auto", help=DATA_HELP)
    p.add_argument("--formulation", choices=("auto", "naive", "fused-qk", "fused-mask", "kernel"), default="auto",
                   help="how VAR enters attention: naive (eager MatMul -> Softmax -> MatMul; contrib "
                   "GroupQueryAttention / MultiHeadAttention unfused into it), fused-qk / fused-mask (attention "
                   "stays one ONNX Attention op: the score shift as extra Q/K columns or in the mask; contrib "
                   "attention becomes one Attention per VAR layer), kernel (the var_export::VarAttention "
                   "custom op, registered with var_export.kernels where the graph runs), or auto (ONNX "
                   "Attention graphs: fused-qk; others, contrib graphs included: naive, measured faster "
                   "than fused-qk there, docs/foreign-graphs.md)")
    common.add_var_args(p)


class CopyProgress:
    """Bytes of a weight copy on stderr: a rich bar (size, speed, time left) on a terminal, a
    line per 10 % elsewhere (logs, CI; copies of LINE_MIN bytes or more); nothing with --quiet.
    Shows only once bytes are copied: links and reflinks copy none."""

    LINE_MIN = 64 << 20

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.bar: Any = None
        self.task: Any = None
        self.step = -1  # last 10 % step printed (line mode)

    def __call__(self, done: int, total: int) -> None:
        if self.quiet or total <= 0:
            return
        console = common.console
        if console.is_terminal:
            if self.bar is None:
                from rich.progress import (
                    BarColumn,
                    DownloadColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                    TransferSpeedColumn,
                )

                self.bar = Progress(TextColumn("[bold]copying weights"), BarColumn(), DownloadColumn(),
                                    TransferSpeedColumn(), TimeRemainingColumn(), console=console)
                self.bar.start()
                self.task = self.bar.add_task("copy", total=total)
            self.bar.update(self.task, completed=done, total=total)
            return
        step = min(10, done * 10 // total)
        if total >= self.LINE_MIN and step > self.step:
            self.step = step
            console.print(f"copying weights: {_size(done)} / {_size(total)} ({step * 10} %)",
                          highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def run(args: argparse.Namespace) -> int:
    from var_export.rewrite import load_calibration, resolve_settings, rewrite_decoder

    calibration = load_calibration(args.calibration) if args.calibration else None
    settings = resolve_settings(
        sink_dims=args.sink_dims, calibration=calibration, convention=args.convention,
        tau=args.tau, rho=args.rho, summ=args.summ, p=args.p, layers=args.layers,
        exclude_last_layer=True if args.exclude_last_layer else None,
        sink_scope=args.sink_scope, heads=args.heads,
    )
    progress = CopyProgress(quiet=getattr(args, "quiet", False))
    try:
        result = rewrite_decoder(
            args.input, args.out, settings, calibration=calibration,
            dry_run=args.dry_run, data=args.data, progress=progress, formulation=args.formulation,
        )
    finally:
        progress.close()
    print(result.describe())
    return 0
