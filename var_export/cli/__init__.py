"""The ``var-export`` command line. Thin: parse, one library call, report.

Each subcommand lives in its own module of this package with two functions,
``add_parser(subparsers)`` and ``run(args) -> int``. The library never imports
this package (tested).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from var_export.core.errors import MissingExtraError, VarExportError
from var_export.core.extras import EXTRAS

# subcommand name -> module in this package. The top-level pipeline
# (``var-export --model M --out X``) is the module ``pipeline``.
SUBCOMMANDS: dict[str, str] = {
    "calibrate": "calibrate",
    "export": "export",
    "rewrite": "rewrite",
    "build-trt": "build_trt",
    "run": "run",
    "inspect": "inspect",
    "bench": "bench",
    "triton": "triton",
    "serve": "serve",
    "kernel": "kernel",
}

log = logging.getLogger("var_export")


def _load(module: str):
    return importlib.import_module(f"var_export.cli.{module}")


def build_parser() -> argparse.ArgumentParser:
    from var_export.cli import common, pipeline

    parser = argparse.ArgumentParser(
        prog="var-export",
        allow_abbrev=False,
        description=common.TOP_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_global_args(parser)
    pipeline.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=common.NoAbbrevParser)
    for name, module in SUBCOMMANDS.items():
        _load(module).add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from var_export.cli import common

    parser = build_parser()
    args = parser.parse_args(argv)
    common.setup_logging(args)
    try:
        if args.command is None:
            from var_export.cli import pipeline

            return pipeline.run(args, parser)
        return int(_load(SUBCOMMANDS[args.command]).run(args) or 0)
    except ModuleNotFoundError as exc:  # an optional dependency a code path needed (no extra check)
        root = (exc.name or "").split(".")[0]
        extra = next((e for e, mods in EXTRAS.items() if root in mods), None)
        if extra is None:
            raise
        error = MissingExtraError(f"this command needs {root} (pip install 'var-export[{extra}]'); it is not installed.")
        common.print_error(error)
        return error.exit_code
    except VarExportError as exc:
        common.print_error(exc)
        return exc.exit_code
    except OSError as exc:  # a filesystem problem of the user's machine, not a bug of ours
        common.print_error(f"{type(exc).__name__}: {exc}")
        return 2
    except KeyboardInterrupt:
        common.print_error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
