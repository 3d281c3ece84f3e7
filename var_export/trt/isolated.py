"""One engine build in a child process: a crash inside TensorRT's builder becomes an error.

TensorRT's builder is native code; when it crashes (TensorRT-RTX 1.7.1 segfaulted on some
Attention graphs, docs/tensorrt.md) it takes the calling Python process with it. With
``BuildConfig.isolate`` (the default) :func:`build_isolated` runs
:func:`var_export.trt.build.serialize_engine` in a child Python (:func:`child_main`), which
writes the engine to the temporary file the caller renames later, and reports on stdout, one
line each: ``progress\\t[phase, done, total]``, then ``facts\\t{...}`` or ``error\\t{...}``.
A child killed by a signal is a :class:`TensorRTBuildError` naming the signal and the graph;
the caller's engines and manifest are left untouched (nothing was renamed into place).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from var_export.core import errors
from var_export.core.errors import TensorRTBuildError, TensorRTLintError
from var_export.trt.flavour import Flavour, target_names
from var_export.trt.lint import LintFinding, LintReport
from var_export.trt.profiles import AxisRanges, ProfileLimits

ProgressFn = Callable[[str, int, int], None]
# not `python -m var_export.trt.isolated`: the package imports this module before runpy runs it
_CHILD = "import sys; from var_export.trt.isolated import child_main; sys.exit(child_main())"


def _limits_from_dict(d: dict[str, Any]) -> ProfileLimits:
    fields = {f.name for f in dataclasses.fields(ProfileLimits)}
    return ProfileLimits(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def _axes_from_json(ranges: dict[str, Any] | None) -> Callable[[ProfileLimits], AxisRanges] | None:
    """The parent's evaluated ``axes`` back as the callable ``serialize_engine`` takes."""
    if ranges is None:
        return None
    fixed = {name: {int(axis): tuple(r) for axis, r in by_axis.items()} for name, by_axis in ranges.items()}
    return lambda _limits: fixed


def build_isolated(
    flavour: Flavour,
    graph: Path,
    out: Path,
    limits: ProfileLimits,
    capabilities: Sequence[Any] = (),
    *,
    workspace_gb: float | None = None,
    opt_level: int | None = None,
    progress: ProgressFn | None = None,
    axes: Callable[[ProfileLimits], AxisRanges] | None = None,
) -> dict[str, Any]:
    """Build ``graph``'s engine into ``out`` in a child process; returns the build facts.

    ``axes`` (the family's vision input ranges) is evaluated here, for ``limits``, and its
    ranges are sent to the child: the child uses the same limits, so the profiles are equal."""
    request = {
        "flavour": flavour.name,
        "graph": os.fspath(graph),
        "out": os.fspath(out),
        "limits": limits.to_dict(),
        "targets": target_names(capabilities),
        "workspace_gb": workspace_gb,
        "opt_level": opt_level,
        "axis_ranges": None if axes is None else axes(limits),
    }
    result: dict[str, Any] = {}
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(request))
        child.stdin.close()
        for line in child.stdout:
            kind, _, body = line.rstrip("\n").partition("\t")
            if kind == "progress" and progress is not None:
                phase, done, total = json.loads(body)
                progress(phase, int(done), int(total))
            elif kind in ("facts", "error"):
                result = {kind: json.loads(body)}
        rc = child.wait()
        stderr.seek(0)
        tail = " | ".join(ln.strip() for ln in stderr.read().splitlines()[-3:] if ln.strip())
    if "facts" in result and rc == 0:
        return result["facts"]
    if "error" in result:
        raise _error(result["error"])
    what = f"was killed by {_signal_name(-rc)}" if rc < 0 else f"exited with status {rc}"
    raise TensorRTBuildError(
        f"expected {flavour.label} to build an engine from {graph}; its builder process {what}"
        f"{f' ({tail})' if tail else ''}. That is a crash inside TensorRT: docs/tensorrt.md lists "
        "the graph forms known to crash it and what avoids them. Report the graph if var-export "
        "wrote it; BuildConfig(isolate=False) builds in this process (for a core dump)."
    )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _error(err: dict[str, Any]) -> Exception:
    """The child's error as the same exception type (a lint error with its report)."""
    if err["type"] == "TensorRTLintError" and err.get("report"):
        report = dict(err["report"])
        report["findings"] = [LintFinding(**{**f, "nodes": tuple(f.get("nodes", ()))}) for f in report["findings"]]
        return TensorRTLintError(LintReport(**report))
    cls = getattr(errors, err["type"], None)
    if isinstance(cls, type) and issubclass(cls, errors.VarExportError) and cls is not TensorRTLintError:
        return cls(err["message"])
    return TensorRTBuildError(f"{err['type']}: {err['message']}")


def child_main() -> int:
    """The child: the request on stdin, the engine to its ``out``, the result on stdout."""
    from var_export.trt.build import serialize_engine, write_file
    from var_export.trt.flavour import compute_capabilities, resolve_flavour

    def emit(kind: str, body: Any) -> None:
        sys.stdout.write(f"{kind}\t{json.dumps(body)}\n")
        sys.stdout.flush()

    request = json.loads(sys.stdin.read())
    try:
        flavour = resolve_flavour(request["flavour"])
        targets = [t.removeprefix("SM") for t in request["targets"]]
        capabilities = compute_capabilities(flavour, targets) if targets else []
        data, facts = serialize_engine(
            flavour, Path(request["graph"]), _limits_from_dict(request["limits"]), capabilities,
            workspace_gb=request["workspace_gb"], opt_level=request["opt_level"],
            axes=_axes_from_json(request.get("axis_ranges")),
            progress=lambda phase, done, total: emit("progress", [phase, done, total]),
        )
        write_file(Path(request["out"]), data)
    except TensorRTLintError as exc:
        emit("error", {"type": "TensorRTLintError", "message": str(exc), "report": dataclasses.asdict(exc.report)})
        return 1
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        emit("error", {"type": type(exc).__name__, "message": str(exc)})
        return 1
    emit("facts", facts)
    return 0
