"""``var-export export``: the three graphs (with VAR, or ``--no-var`` for the baseline) as a bundle."""

from __future__ import annotations

import argparse

from var_export.cli import common
from var_export.cli.pipeline import add_build_args, options_from_args


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="export the three ONNX graphs as a bundle (with VAR baked in, or --no-var)",
        description="Export vision_encoder / embed_tokens / decoder_model_merged ONNX graphs of a "
        "LLaVA-family model into a bundle directory. With VAR (default) the decoder gets the VAR "
        "inputs visual_token_mask, past_sink_mask and output present_sink_mask; --no-var writes the "
        "same bundle without VAR, the baseline to compare against.",
    )
    add_build_args(p, out_help="bundle directory to write (replaced atomically)")
    p.add_argument("--no-var", action="store_true", help="export without VAR (baseline)")


def run(args: argparse.Namespace) -> int:
    from var_export.core.errors import ConfigError
    from var_export.pipeline import build_bundle

    if args.out is None:
        raise ConfigError("export needs --out DIR (the bundle directory to write).")
    with common.progress(args) as progress:
        result = build_bundle(options_from_args(args, no_var=args.no_var), progress)
    common.print_build_summary(result)
    return 0
