"""``var-export calibrate``: sink dims, sink statistics and image-centric heads → calibration.json."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from var_export.cli import common

DESCRIPTION = """\
Run the PyTorch model over image+prompt pairs (--data DIR: images + optional prompts.txt;
default: built-in synthetic images) and write calibration.json (DESIGN.md §2):
  sink_dims  hidden dims with massive normalised values, found in the data and compared with the
             preset (a warning on disagreement; --sink-dims is always kept as given);
  layers     per VAR layer: sink tokens (count, visual share) and per head the image-centric
             score = fraction of eligible prompt rows passing the per-row test (portion <= rho,
             summation >= summ; released-code convention, see --convention);
  heads      the [layer, head] pairs with score >= --head-threshold (baked by --heads static/hybrid).
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(
        name,
        help="measure sink dims and image-centric heads, write calibration.json",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_model_arg(p)
    p.add_argument("--out", type=Path, required=True, help="calibration.json to write (atomically)")
    p.add_argument("--data", type=Path, help="folder of images (+ optional prompts.txt, one prompt per line); default: built-in synthetic images")
    p.add_argument("--num-samples", type=int, default=8, help="number of synthetic images without --data (default 8)")
    p.add_argument("--head-threshold", type=float, default=0.5, help="image-centric score a head needs to be selected, in [0, 1] (default 0.5)")
    common.add_var_args(p)


def run(args: argparse.Namespace) -> int:
    from var_export.core.extras import require_extra

    require_extra("torch", "`var-export calibrate`")
    from var_export.calibration.calibrate import calibrate, write_calibration
    from var_export.core.errors import ConfigError
    from var_export.core.settings import parse_sink_dims, resolve_settings
    from var_export.inputs import calibration_samples
    from var_export.models import load_llava, resolve_model

    if not 0.0 <= args.head_threshold <= 1.0:
        raise ConfigError(f"--head-threshold must be in [0, 1], found {args.head_threshold}.")
    if args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; expected a file path like calibration.json.")
    from var_export.outputs import Outputs, check_target

    check_target(args.out, "file", what="calibration file")  # before the model loads
    user_dims = parse_sink_dims(args.sink_dims) if args.sink_dims else None
    overrides = dict(common.var_overrides(args), sink_dims=user_dims)
    spec = resolve_model(args.model)
    preset = spec.preset
    # knobs are validated here, before the model loads; sink dims come from the data when not given
    settings = resolve_settings(
        preset=preset if preset and preset.get("sink_dims") else {**(preset or {}), "sink_dims": [0]},
        overrides=overrides,
        convention=args.convention,
    )
    samples = calibration_samples(args.data, args.num_samples)
    loaded = load_llava(
        spec, attn_implementation="eager", trust_remote_code=args.trust_remote_code,
        allow_pickle=args.allow_pickle,
    )
    with common.progress(args) as progress:
        cal = calibrate(
            loaded, samples, settings,
            head_threshold=args.head_threshold,
            preset_sink_dims=(preset or {}).get("sink_dims"),
            user_sink_dims=user_dims,
            progress=progress,
        )
    with Outputs() as tx:
        write_calibration(cal, tx.stage_file(args.out, what="calibration file"))
        tx.commit()
    path = args.out
    if not getattr(args, "quiet", False):
        from rich.console import Console

        Console().print(summary_table(cal, path))
    return 0


def summary_table(cal: dict[str, Any], path: Path) -> Any:
    """A readable summary: sink dims, sink tokens per layer, head scores and selected heads."""
    from rich.table import Table

    s = cal["settings"]
    t = Table(title=f"calibration {path}  ({cal['model_id']}, {cal['num_samples']} samples)")
    t.add_column("layer", justify="right")
    t.add_column("sinks/sample", justify="right")
    t.add_column("visual", justify="right")
    t.add_column("eligible", justify="right")
    t.add_column("image-centric score per head", no_wrap=True)
    t.add_column("heads", no_wrap=True)
    selected = {(layer, head) for layer, head in cal["heads"]}
    for row in cal["layers"]:
        layer = row["layer"]
        share = row["visual_share"]
        scores = " ".join(
            f"[bold green]{x:.2f}[/]" if (layer, h) in selected else f"{x:.2f}"
            for h, x in enumerate(row["image_centric_score"])
        )
        heads = " ".join(f"H{h}" for lay, h in sorted(selected) if lay == layer) or "-"
        t.add_row(
            str(layer), f"{row['sink_tokens_per_sample']:g}", "-" if share is None else f"{share:.0%}",
            str(row["eligible_rows"]), scores, heads,
        )
    found, preset = cal.get("sink_dims_found", []), cal.get("preset_sink_dims")
    t.caption = (
        f"sink dims {cal['sink_dims']} ({cal.get('sink_dims_source', '?')}; found in data {found}"
        + (f", preset {preset}" if preset else "")
        + f")  tau={s['tau']} rho={s['rho']} summ={s['summ']} p={s['p']}  "
        f"heads selected (score >= {cal.get('head_threshold')}): "
        + (" ".join(f"L{lay}H{h}" for lay, h in cal["heads"]) or "none")
    )
    return t
