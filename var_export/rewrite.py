"""Bake VAR into an existing decoder ONNX file (Optimum, TorchScript or dynamo exports).

    rewrite_decoder(in_path, out_path, settings, heads=..., calibration=..., dry_run=...)

1. **safety** — :func:`var_export.safety.check_external_data` on the graph protobuf, before
   anything else reads it: external-data locations must stay inside the model's folder.
2. **load** — onnx-ir, weights left lazy (external tensors are never read; inline ones are
   already in the protobuf).
3. **layers** — the layer count from the ``past_key_values.{i}.key`` inputs (the passes read
   everything else themselves, including the query-head count of graphs that build the Q
   ``Reshape`` target at run time, and opset < 15 graphs).
4. **passes** — :func:`passes.pipeline.apply_var` (locate, sink detection, head selection,
   redistribution, finalize), in place.
5. **write** — atomically: a temporary file beside ``out_path``, then ``os.replace``. Weights
   are never materialised:

   * ``data="share"`` (default when ``out_path`` is in the input's folder): the new graph
     references the input's external data file(s) by the same relative location — no byte of
     weights is read or written. The output is valid as long as the input's data file stays.
   * ``data="copy"`` (default for another folder): each data file is copied beside the output
     as ``<out name>.data`` (several files: ``<out name>.data.d/<location>``) with a
     sparse-aware, copy-offloading copy (``SEEK_DATA``/``copy_file_range``), then the graph
     is relinked to the copies. Hard links and symlinks are not used: onnx-ir refuses data
     files with several hard links, and a symlink out of the folder is what
     :mod:`var_export.safety` refuses.

   Graphs without external data are written self-contained.

The input file is never overwritten (nor its data files).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
import onnx_ir as ir

from var_export.core import calibration_schema as schema
from var_export.core import settings as settings_module
from var_export.core.calibration_schema import calibration_heads
from var_export.core.errors import CalibrationError, ConfigError, ModelLoadError
from var_export.core.settings import VarSettings
from var_export.passes.locate import PAST_KEY_RE
from var_export.safety import ExternalDataRef, check_external_data

__all__ = [
    "RewriteResult",
    "load_calibration",
    "resolve_settings",
    "rewrite_decoder",
]

log = logging.getLogger(__name__)

DataMode = Literal["auto", "share", "copy"]

@dataclasses.dataclass
class RewriteResult:
    """What :func:`rewrite_decoder` did (or, with ``dry_run``, would do)."""

    in_path: Path
    out_path: Path | None  # None for a dry run
    dry_run: bool
    report: Any  # passes.pipeline.VarReport: per-layer plan, ignored Softmax nodes
    data_mode: str  # "inline" (no external data) | "share" | "copy"
    data_files: list[Path]  # external data files the output reads (would read)
    added_inputs: list[str]
    added_outputs: list[str]
    seconds: float

    def describe(self) -> str:
        """A human-readable plan: per decoder layer what is (would be) changed."""
        r = self.report
        verb = "would change" if self.dry_run else "changed"
        lines = [
            f"{self.in_path} -> {self.out_path if self.out_path else '(dry run, nothing written)'}",
            f"decoder layers: {r.num_layers}; VAR layers: {r.var_layers}; head mode: {r.head_mode}",
        ]
        by_layer = {lr.layer: lr for lr in r.layers}
        for layer in range(r.num_layers):
            lr = by_layer.get(layer)
            if lr is None:
                lines.append(f"  layer {layer}: untouched (not a VAR layer)")
                continue
            found = lr.found
            what = ["sink detection"]
            if lr.redistribution:
                heads = "all heads (per-row test)" if lr.heads is None else f"heads {lr.heads}"
                what.append(f"head selection + redistribution on {heads}")
            else:
                what.append("no redistribution (no calibrated head in this layer)")
            lines.append(
                f"  layer {layer}: {verb}: {', '.join(what)}\n"
                f"      softmax {found.get('softmax')!r} -> probs {found.get('probs')!r} "
                f"(via {found.get('probs_path') or 'direct'}) -> MatMul {found.get('pv_matmul')!r}; "
                f"residual {found.get('residual')!r}; heads {found.get('num_heads')} "
                f"(from {found.get('num_heads_from') or '?'}); "
                f"layer from {found.get('layer_from')}"
            )
        for why in r.ignored:
            lines.append(f"  ignored Softmax {why}")
        lines.append(f"new inputs: {self.added_inputs}; new outputs: {self.added_outputs}; "
                     f"nodes added: {r.nodes_added}")
        if self.data_files:
            lines.append(f"weights ({self.data_mode}): {[str(p) for p in self.data_files]}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Calibration and settings


def load_calibration(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``calibration.json`` for a graph rewrite: partial files are accepted (no HF config here
    to fingerprint; the model shape is checked against the graph instead)."""
    return schema.load_calibration(path, strict=False)


def resolve_settings(
    *,
    sink_dims: str | Sequence[int] | None = None,
    calibration: dict[str, Any] | None = None,
    convention: str = "code",
    **knobs: Any,
) -> VarSettings:
    """VarSettings from explicit knobs (None = not given) over the calibration's settings
    (``var_export.core.settings.resolve_settings``). The head mode defaults to ``hybrid`` with a
    calibration that lists heads and to ``dynamic`` without one."""
    overrides = {**knobs, "sink_dims": sink_dims}
    if overrides.get("heads") is None:
        overrides["heads"] = "hybrid" if calibration_heads(calibration) is not None else "dynamic"
    return settings_module.resolve_settings(
        calibration=calibration, overrides=overrides, convention=convention  # type: ignore[arg-type]
    )


def _check_fingerprint(calibration: dict[str, Any], num_layers: int, hidden: int | None,
                       heads: dict[int, int | None]) -> None:
    """Refuse a calibration whose recorded model shape does not match the graph."""
    fp = calibration.get("fingerprint")
    if not isinstance(fp, dict):
        return
    def pick(*names: str) -> int | None:
        for n in names:
            if isinstance(fp.get(n), int):
                return int(fp[n])
        return None
    want = {
        "layers": (pick("num_layers", "num_hidden_layers"), num_layers),
        "hidden size": (pick("hidden_size"), hidden),
        "query heads": (pick("num_heads", "num_attention_heads"),
                        next((h for h in heads.values() if h), None)),
    }
    bad = [f"{k}: calibration {a}, graph {b}" for k, (a, b) in want.items()
           if a is not None and b is not None and a != b]
    if bad:
        raise CalibrationError(
            "calibration.json was made for another model (" + "; ".join(bad) + "). "
            "Calibrate this model (`var-export calibrate`) or use --heads dynamic without it."
        )


# ---------------------------------------------------------------------------------------------
# Layers of a foreign export


def graph_num_layers(model: ir.Model) -> int | None:
    """Decoder layers = number of ``past_key_values.{i}.key`` inputs (indices 0..L-1)."""
    idx = sorted(int(m.group(1)) for v in model.graph.inputs if v.name and (m := PAST_KEY_RE.match(v.name)))
    if not idx:
        return None
    if idx != list(range(len(idx))):
        raise ModelLoadError(
            f"past key inputs have indices {idx}; expected 0..{len(idx) - 1} (one per layer)."
        )
    return len(idx)


# ---------------------------------------------------------------------------------------------
# Writing without materialising weights


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _copy_sparse(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` keeping holes (SEEK_DATA/SEEK_HOLE) and letting the kernel
    copy the data extents (``copy_file_range``: reflink or in-kernel copy where supported)."""
    size = src.stat().st_size
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fd_in, fd_out = fin.fileno(), fout.fileno()
        os.ftruncate(fd_out, size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd_in, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            end = os.lseek(fd_in, start, os.SEEK_HOLE)
            off = start
            while off < end:
                try:
                    n = os.copy_file_range(fd_in, fd_out, end - off, off, off)
                except OSError:
                    os.lseek(fd_in, off, os.SEEK_SET)
                    os.lseek(fd_out, off, os.SEEK_SET)
                    n = os.write(fd_out, os.read(fd_in, min(end - off, 1 << 24)))
                if n <= 0:
                    break
                off += n
            pos = end
        os.fsync(fd_out)


def _relink(model: ir.Model, mapping: dict[str, tuple[str, Path]]) -> int:
    """Point every external tensor at its new (location, base_dir); returns how many."""
    count = 0

    def fix(tensor: Any) -> Any:
        nonlocal count
        if not isinstance(tensor, ir.ExternalTensor):
            return None
        key = os.path.normpath(os.path.abspath(tensor.path))
        if key not in mapping:
            return None
        location, base = mapping[key]
        count += 1
        return ir.ExternalTensor(
            location, tensor.offset, tensor.length, tensor.dtype, shape=tensor.shape,
            name=tensor.name, doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props) or None, base_dir=os.fspath(base),
        )

    for graph in model.graphs():
        for value in graph.initializers.values():
            new = fix(value.const_value)
            if new is not None:
                value.const_value = new
        for node in graph:
            if node.op_type == "Constant" and "value" in node.attributes:
                attr = node.attributes["value"]
                new = fix(attr.value)
                if new is not None:
                    node.attributes["value"] = ir.AttrTensor("value", new)
    return count


ORT_VERIFY_LIMIT = 4 << 30  # bytes of weights up to which the output is also loaded in ORT


def _write(
    model: ir.Model, in_path: Path, out_path: Path, refs: list[ExternalDataRef], mode: str,
    verify: bool = True,
) -> list[Path]:
    """Stage the graph (and copied data files) beside ``out_path``, verify, then swap in
    (var_export.outputs); returns the data files the output references."""
    from var_export.outputs import Outputs
    from var_export.verify import verify_graph

    out_dir = out_path.parent
    data_files: list[Path] = []
    links: list[Path] = []
    with Outputs() as tx:
        staged_model = tx.stage_file(out_path, what="rewrite output")
        stage = staged_model.parent
        if refs and mode == "copy":
            mapping: dict[str, tuple[str, Path]] = {}
            multi = len(refs) > 1
            data_root = tx.stage_dir(out_dir / f"{out_path.name}.data.d") if multi else None
            for ref in refs:
                location = (f"{out_path.name}.data.d/{os.path.normpath(ref.location)}" if multi
                            else f"{out_path.name}.data")
                final = out_dir / location
                if any(_same_file(final, r.path) for r in refs if final.exists()):
                    raise ConfigError(f"the copy of {ref.location!r} would overwrite the input's "
                                      f"data file {final}; choose another --out name.")
                if multi:
                    staged = data_root / os.path.normpath(ref.location)
                    staged.parent.mkdir(parents=True, exist_ok=True)
                else:
                    staged = tx.stage_file(final, what="rewrite weights")
                log.info("copying weights %s -> %s (%.1f MB apparent)", ref.path, final, ref.size / 1e6)
                _copy_sparse(ref.path, staged)
                os.chmod(staged, stat.S_IMODE(ref.path.stat().st_mode))
                mapping[os.path.normpath(os.path.abspath(ref.path))] = (location, out_dir)
                data_files.append(final)
            _relink(model, mapping)
        elif refs:  # share: same folder, same relative locations
            data_files = [ref.path for ref in refs]
        ir.save(model, os.fspath(staged_model), format="protobuf")  # external tensors keep their locations
        os.chmod(staged_model, stat.S_IMODE(in_path.stat().st_mode))
        if verify:
            if mode == "share":  # the staged graph reads the shared data through links beside it
                links = _link_shared(refs, stage)
            weights = sum(r.size for r in refs)
            verify_graph(staged_model, ort_load=weights <= ORT_VERIFY_LIMIT)
            if weights > ORT_VERIFY_LIMIT:
                log.info("%s: %.1f GB of weights; checked with strict shape inference, not loaded in "
                         "ONNX Runtime", out_path.name, weights / 1e9)
            for link in links:
                link.unlink()
        tx.commit()
    return data_files


def _link_shared(refs: list[ExternalDataRef], stage: Path) -> list[Path]:
    """Hard links to the shared data files inside the staging folder (same filesystem)."""
    links = []
    for ref in refs:
        link = stage / os.path.normpath(ref.location)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.link(ref.path, link)
        links.append(link)
    return links


# ---------------------------------------------------------------------------------------------
# The entry point


def rewrite_decoder(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None,
    settings: VarSettings,
    *,
    heads: Iterable[Sequence[int]] | None = None,
    calibration: str | os.PathLike[str] | dict[str, Any] | None = None,
    dry_run: bool = False,
    data: DataMode = "auto",
    verify: bool = True,
) -> RewriteResult:
    """Bake VAR into the decoder graph ``in_path`` and write it to ``out_path``.

    ``heads``: calibrated (layer, head) pairs for static/hybrid; default: the calibration's
    ``heads``. ``calibration``: a ``calibration.json`` path or its parsed dict (heads and a
    fingerprint check against the graph). ``dry_run``: plan only, nothing written.
    ``verify``: strict shape inference and (up to ``ORT_VERIFY_LIMIT`` of weights) an ONNX Runtime
    load of the output before it replaces anything. The output path follows
    :func:`var_export.outputs.check_target` (never replaces a file var-export did not write).
    ``data``: how external weights reach the output (module docstring); ``auto`` shares them
    when ``out_path`` is in the input's folder and copies them otherwise.
    """
    from var_export.passes.pipeline import apply_var

    t0 = time.perf_counter()
    in_path = Path(in_path)
    if not in_path.is_file():
        raise ModelLoadError(f"input graph {str(in_path)!r} not found (expected an .onnx file).")
    if out_path is None and not dry_run:
        raise ConfigError("no output path: pass --out OUT.onnx (or --dry-run to only print the plan).")
    out = Path(out_path) if out_path is not None else None
    if out is not None and (out.exists() and _same_file(out, in_path)
                            or os.path.abspath(out) == os.path.abspath(in_path)):
        raise ConfigError(
            f"--out {str(out)!r} is the input graph itself; refusing to overwrite it. "
            "Choose another output name, e.g. model_var.onnx."
        )
    try:
        proto = onnx.load(os.fspath(in_path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{in_path} is not a readable ONNX model ({type(exc).__name__}: {exc}).") from exc
    refs = check_external_data(in_path, proto)  # before anything else reads the graph
    if out is not None:
        for ref in refs:
            if out.exists() and _same_file(out, ref.path) or os.path.abspath(out) == os.path.abspath(ref.path):
                raise ConfigError(f"--out {str(out)!r} is the input's external data file; refusing.")
    if out is not None and not dry_run:  # before the passes run: refuse what we may not replace
        from var_export.outputs import check_target

        check_target(out, "file", what="rewrite output")

    model = ir.serde.deserialize_model(proto)
    del proto
    ir.external_data.set_base_dir(model.graph, os.fspath(in_path.parent))

    cal = load_calibration(calibration) if isinstance(calibration, (str, os.PathLike)) else calibration
    head_list = [(int(a), int(b)) for a, b in heads] if heads is not None else calibration_heads(cal)

    num_layers = graph_num_layers(model)
    inputs_before = [v.name for v in model.graph.inputs]
    outputs_before = [v.name for v in model.graph.outputs]
    if cal:
        from var_export.passes.locate import locate_layers

        matches = locate_layers(model).matches
        hidden = next((m.residual.shape[-1] for m in matches if m.residual.shape is not None
                       and isinstance(m.residual.shape[-1], int)), None)
        _check_fingerprint(cal, num_layers or len(matches), hidden, {m.layer: m.num_heads for m in matches})

    model, report = apply_var(model, settings, head_list, num_layers=num_layers, inplace=True)
    added_in = [v.name for v in model.graph.inputs if v.name not in inputs_before]
    added_out = [v.name for v in model.graph.outputs if v.name not in outputs_before]

    if not refs:
        mode = "inline"
    elif data == "auto":
        same_dir = out is None or os.path.realpath(out.parent) == os.path.realpath(in_path.parent)
        mode = "share" if same_dir else "copy"
    else:
        mode = data
        if mode == "share" and out is not None and (
            os.path.realpath(out.parent) != os.path.realpath(in_path.parent)
        ):
            raise ConfigError(
                "data='share' needs the output in the input's folder (its weights are referenced "
                f"by relative location); {out.parent} is another folder. Use data='copy'."
            )
    data_files = [r.path for r in refs]
    if not dry_run:
        assert out is not None
        data_files = _write(model, in_path, out, refs, mode, verify=verify)
        log.info("wrote %s (%d VAR layers, weights %s)", out, len(report.var_layers), mode)
    return RewriteResult(
        in_path=in_path, out_path=None if dry_run else out, dry_run=dry_run, report=report,
        data_mode=mode, data_files=data_files, added_inputs=added_in,
        added_outputs=added_out, seconds=time.perf_counter() - t0,
    )
