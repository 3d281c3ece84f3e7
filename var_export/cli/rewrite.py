"""``var-export rewrite``: bake VAR into an existing decoder ONNX (Optimum, TorchScript, dynamo)."""

from __future__ import annotations

import argparse

from var_export.cli import common


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="bake VAR into an existing decoder ONNX file (e.g. an Optimum export)",
        description="Rewrite a decoder ONNX exported by someone else (Optimum "
        "text-generation-with-past, torch.onnx TorchScript or dynamo; inputs_embeds or input_ids) "
        "into a VAR decoder: adds the inputs visual_token_mask [B,T] bool, past_sink_mask "
        "[B,Lv,P] bool and the output present_sink_mask [B,Lv,T] bool. External-data weights are "
        "never loaded: an output in the input's folder references the same data file; an output "
        "elsewhere gets a (sparse, copy-offloaded) copy. External-data locations outside the "
        "model's folder are refused. Without --calibration the head mode defaults to dynamic.",
    )
    p.add_argument("input", metavar="IN.onnx", help="decoder graph to rewrite (never overwritten)")
    p.add_argument("--out", metavar="OUT.onnx", help="where to write the VAR decoder (atomically)")
    p.add_argument("--calibration", metavar="JSON",
                   help="calibration.json: sink dims, settings and the head list for static/hybrid")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would change per layer; write nothing")
    p.add_argument("--data", choices=("auto", "share", "copy", "link"), default="auto",
                   help="external weights: share the input's data file (output in the same folder), "
                   "copy it beside the output (a reflink where the filesystem has them), link it "
                   "(hard link on the same filesystem, else copy; onnx.load and onnx-ir then refuse "
                   "both data files as multiply linked, ONNX Runtime loads them), or auto (share if "
                   "same folder, else copy)")
    common.add_var_args(p)


def run(args: argparse.Namespace) -> int:
    from var_export.rewrite import load_calibration, resolve_settings, rewrite_decoder

    calibration = load_calibration(args.calibration) if args.calibration else None
    settings = resolve_settings(
        sink_dims=args.sink_dims, calibration=calibration, convention=args.convention,
        tau=args.tau, rho=args.rho, summ=args.summ, p=args.p, layers=args.layers,
        exclude_last_layer=True if args.exclude_last_layer else None,
        sink_scope=args.sink_scope, heads=args.heads,
    )
    with common.progress(args) as bar:
        task: list = []

        def copied(done: int, total: int) -> None:  # bytes of the weights being copied
            if not task:
                task.append(bar.add_task("copying weights (MB)", total=max(total >> 20, 1)))
            bar.update(task[0], completed=done >> 20)

        result = rewrite_decoder(
            args.input, args.out, settings, calibration=calibration,
            dry_run=args.dry_run, data=args.data, progress=copied,
        )
    print(result.describe())
    return 0
