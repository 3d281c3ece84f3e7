"""``var-export inspect``: PNGs of the sink patches, sink counts, head scores and one head's attention."""

from __future__ import annotations

import argparse
from pathlib import Path

from var_export.cli import common

DESCRIPTION = """\
Draw what VAR sees and does for one image and one prompt, into --out DIR:
  sinks.png              the image as the model sees it, visual-sink patches outlined, per VAR layer
  sink_counts.png        sink tokens per decoder layer, visual vs text
  head_scores.png        image-centric score per (layer, head); selected heads boxed
  attention_<L>_<H>.png  the last prompt token's attention over the image patches before and
                         after VAR on one head (shared colour scale), and the mass moved
  summary.json           the numbers behind the pictures

This runs the PyTorch model with the VAR reference (calibration/reference.py), not ONNX Runtime:
the exported graphs do not output attention probabilities. With BUNDLE the model is loaded from
the bundle's model_id (a preset such as tiny-llava, or a local directory) and the bundle's VAR
settings and calibration.json are used. With --model the preset's settings (and the VAR knobs
below) are used and the head scores are computed from this image and prompt alone.

  var-export inspect build/tiny --image cat.png --prompt "What is in the image?" --out pics
  var-export inspect --model tiny-llava --image cat.png --prompt "Describe it." --out pics --layer 3
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="draw sink patches, sink counts, head scores and attention before/after VAR (PyTorch)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("bundle", nargs="?", type=Path, metavar="BUNDLE", help="a bundle directory (from var-export --out DIR or export); or give --model")
    common.add_model_arg(p)
    p.add_argument("--image", type=Path, required=True, help="the image (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="the question; the model's chat format and <image> are added unless it holds <image>")
    p.add_argument("--out", type=Path, required=True, help="directory for the PNGs and summary.json (created; our files in it are replaced atomically)")
    p.add_argument("--layer", type=int, help="decoder layer of the attention picture, a VAR layer (default: that of the best selected head)")
    p.add_argument("--head", type=int, help="query head of the attention picture (default: the selected head with the highest image-centric score)")
    p.add_argument("--head-threshold", type=float, default=0.5, help="with --model: image-centric score a head needs to be selected, in [0, 1] (default 0.5)")
    common.add_var_args(p)


def run(args: argparse.Namespace) -> int:
    from var_export.core.errors import ConfigError
    from var_export.core.extras import require_extra

    require_extra("torch", "`var-export inspect`")
    from var_export.inspect import inspect_bundle, inspect_pretrained

    knobs = ("sink_dims", "tau", "rho", "summ", "p", "layers", "sink_scope", "heads")
    overrides = {k: getattr(args, k) for k in knobs}
    overrides["exclude_last_layer"] = args.exclude_last_layer or None
    if args.bundle is not None:
        if args.model is not None:
            raise ConfigError("give either BUNDLE or --model, not both.")
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ConfigError(
                f"--{', --'.join(k.replace('_', '-') for k in given)} cannot change a bundle's VAR settings; "
                "inspect with --model M to try other knobs."
            )
        result = inspect_bundle(
            args.bundle, args.image, args.prompt, args.out, layer=args.layer, head=args.head,
            trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        )
    else:
        result = inspect_pretrained(
            args.model, args.image, args.prompt, args.out, overrides=overrides,
            convention=args.convention, head_threshold=args.head_threshold, layer=args.layer,
            head=args.head, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        )
    att = result.summary["attention"]
    common.console.print(
        f"wrote {len(result.files)} files to {result.out_dir}: "
        + ", ".join(p.name for p in result.files)
        + f"\nlayer {result.layer} head {result.head}: {att.get('moved_from_sinks', 0.0):.3f} of the last "
        "prompt token's attention moved from sinks to visual non-sinks",
        highlight=False,
    )
    return 0
