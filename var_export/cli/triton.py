"""``var-export triton BUNDLE --out REPO``: a Triton model repository serving ``var_llava``."""

from __future__ import annotations

import argparse
from pathlib import Path

from var_export.cli import common

HELP = "write a Triton model repository whose var_llava model streams generations from a bundle"

DESCRIPTION = """\
Write REPO/var_llava: a Triton Python-backend model (decoupled) that runs the whole greedy
generation inside the server from the bundle, with continuous batching of concurrent requests.
Inputs: prompt (TYPE_STRING [1]), image (TYPE_STRING [1], base64 of a PNG/JPEG), optional
max_new_tokens (TYPE_INT32 [1], default 32) and var (TYPE_BOOL [1], default true; false = run
--no-var). Output: text (TYPE_STRING [1]), one streamed response per new piece of text.

The bundle is copied into the repository (--reference records its path instead).
var_llava/1/environment.json names the Python that runs the generation (this one); edit it
when the server runs elsewhere (docs/serving.md). `var-export serve` does all of this and
starts a server.
"""


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle directory (var-export export / --out DIR)")
    p.add_argument("--out", type=Path, required=True, help="the repository directory to write (new or empty)")
    p.add_argument("--reference", action="store_true", help="record the bundle's absolute path instead of copying it")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (default 16)")
    p.add_argument("--overwrite", action="store_true", help="replace a repository this command wrote before")
    return p


def run(args: argparse.Namespace) -> int:
    from var_export.triton import write_triton_repository

    out = write_triton_repository(args.bundle, args.out, copy_bundle=not args.reference,
                                  max_batch=args.max_batch, overwrite=args.overwrite)
    common.console.print(f"[green]Triton repository[/] {out} (model var_llava)", highlight=False)
    return 0
