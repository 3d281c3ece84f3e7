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
   * ``data="auto"`` (default for another folder): each data file gets beside the output as
     ``<out name>.data`` (several files: ``<out name>.data.d/<location>``) by the fastest way
     the filesystems allow, and the graph is relinked to it:

     1. a **reflink** (``FICLONE``: a copy-on-write clone, instant, a standalone file) where the
        filesystem has them (btrfs, XFS with reflink, bcachefs, ...);
     2. else a **hard link** (same inode, instant, whatever the size) where source and output
        share a filesystem (``st_dev``) and the kernel allows the link;
     3. else a **copy**: sparse-aware and copy-offloading (``SEEK_DATA``/``copy_file_range``),
        reporting its progress to ``progress(done, total)``.

     :attr:`RewriteResult.data_how` says which, per file (``data_why``: why a faster way was not
     taken). The catch of a hard link: onnx (``onnx.load``, ``onnx.checker``) and onnx-ir refuse
     an external data file with several hard links (their hard-link-attack guard) — the output's
     and then the *input's* too, until one of the links is removed. ONNX Runtime, TensorRT's
     parser and var-export's own tools (``rewrite``, ``build-trt``, ``bench``, the graph
     verifier) load them. A tool writing the output's data file in place (not replacing it)
     would write the input's weights too. ``data="copy"`` is the standalone-copy opt-out.
   * ``data="copy"``: the reflink or copy above, never a hard link (a standalone file).
   * ``data="link"``: a hard link first (even where a reflink would do), else reflink or copy.

   The input's data file is never written through a link (no chmod either: it would change the
   input's mode).

   Symlinks are never used: a symlink out of the folder is what :mod:`var_export.safety` refuses.

   Graphs without external data are written self-contained.

The input file is never overwritten (nor its data files).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import onnx
import onnx_ir as ir

from var_export.core import calibration_schema as schema
from var_export.core import settings as settings_module
from var_export.core.calibration_schema import calibration_heads
from var_export.core.errors import CalibrationError, ConfigError, GraphPatternError, ModelLoadError
from var_export.core.settings import VarSettings
from var_export.passes.locate import PAST_KEY_RE
from var_export.passes.unfuse_contrib import CONTRIB_DOMAIN
from var_export.safety import ExternalDataRef, check_external_data

__all__ = [
    "FORMULATIONS",
    "RewriteResult",
    "graph_form",
    "load_calibration",
    "resolve_formulation",
    "resolve_settings",
    "rewrite_decoder",
]

log = logging.getLogger(__name__)

DataMode = Literal["auto", "share", "copy", "link"]
Progress = Callable[[int, int], None]  # (bytes done, bytes total) of the weights being copied

# How a data file reaches an output in another folder, by data mode: the ways tried, in order.
PLACEMENT: dict[str, tuple[str, ...]] = {
    "auto": ("reflink", "link", "copy"),
    "link": ("link", "reflink", "copy"),
    "copy": ("reflink", "copy"),
}
HOW_TEXT = {
    "share": "shared: the input's own file, referenced by relative location (nothing copied)",
    "link": "hard link (the input's inode; no byte copied)",
    "reflink": "reflink (copy-on-write clone; no byte copied, a standalone file)",
    "copy": "copied (a standalone file)",
}
HARD_LINK_NOTE = (
    "note: hard-linked weights: onnx.load, onnx.checker and onnx-ir refuse an external data file "
    "with several links (for the input's graph too, until one link is removed); ONNX Runtime, "
    "TensorRT and var-export load them. `--data copy` (data='copy') gives a standalone copy."
)

FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int): reflink the whole file

@dataclasses.dataclass
class RewriteResult:
    """What :func:`rewrite_decoder` did (or, with ``dry_run``, would do)."""

    in_path: Path
    out_path: Path | None  # None for a dry run
    dry_run: bool
    report: Any  # passes.pipeline.VarReport: per-layer plan, ignored Softmax nodes
    data_mode: str  # "inline" (no external data) | "share" | "auto" | "copy" | "link" (resolved mode)
    data_files: list[Path]  # external data files the output reads (would read)
    added_inputs: list[str]
    added_outputs: list[str]
    seconds: float
    notes: list[str] = dataclasses.field(default_factory=list)  # graph form, formulation, unfusing
    data_how: list[str] = dataclasses.field(default_factory=list)  # per data file: share|link|reflink|copy
    data_why: list[str] = dataclasses.field(default_factory=list)  # per data file: why not a faster way ("")
    data_sources: list[Path] = dataclasses.field(default_factory=list)  # the input's data files, same order

    def describe_data(self) -> list[str]:
        """How the weights reach the output: one line per data file (and the hard-link note)."""
        if not self.data_files:
            return []
        if not self.data_how:  # dry run
            ways = {"share": "shared with the input", "auto": "reflink, else hard link, else copy",
                    "copy": "reflink, else copy", "link": "hard link, else reflink, else copy"}
            return [f"weights (--data {self.data_mode}: {ways.get(self.data_mode, self.data_mode)}): "
                    f"{[str(p) for p in self.data_files]}"]
        lines = []
        sources = self.data_sources or self.data_files
        for src, dst, how, why in zip(sources, self.data_files, self.data_how,
                                      self.data_why or [""] * len(self.data_how), strict=True):
            where = str(dst) if src == dst else f"{src} -> {dst}"
            lines.append(f"weights {where}: {HOW_TEXT.get(how, how)}" + (f" [{why}]" if why else ""))
        if "link" in self.data_how:
            lines.append(HARD_LINK_NOTE)
        return lines
    formulation: str = ""  # the VAR formulation applied (FORMULATIONS, auto resolved)

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
            if "attention" in found:  # the fused formulation (ONNX Attention graphs)
                lines.append(
                    f"  layer {layer}: {verb}: sink detection"
                    + (", class masses + score shift (" + str(found.get("formulation")) + ")"
                       if lr.redistribution else ", no redistribution (no calibrated head in this layer)")
                    + f"\n      Attention {found.get('attention')!r}; residual {found.get('residual')!r}; "
                    f"heads {found.get('num_heads')}"
                )
                continue
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
        lines.extend(self.notes)
        lines.append(f"new inputs: {self.added_inputs}; new outputs: {self.added_outputs}; "
                     f"nodes added: {r.nodes_added}")
        lines.extend(self.describe_data())
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


def _copy_sparse(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Copy ``src`` to ``dst`` keeping holes (SEEK_DATA/SEEK_HOLE) and letting the kernel
    copy the data extents (``copy_file_range``: reflink or in-kernel copy where supported);
    ``progress(done, total)`` after each chunk of at most 64 MB."""
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
                    n = os.copy_file_range(fd_in, fd_out, min(end - off, 1 << 26), off, off)
                except OSError:
                    os.lseek(fd_in, off, os.SEEK_SET)
                    os.lseek(fd_out, off, os.SEEK_SET)
                    n = os.write(fd_out, os.read(fd_in, min(end - off, 1 << 24)))
                if n <= 0:
                    break
                off += n
                if progress is not None:
                    progress(off, size)
            pos = end
        os.fsync(fd_out)
    if progress is not None:
        progress(size, size)


def _reflink(src: Path, dst: Path) -> str | None:
    """Clone ``src`` into the (empty) file ``dst`` with ``FICLONE``; None when done, else why not."""
    import fcntl

    try:
        with open(src, "rb") as fin, open(dst, "r+b") as fout:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        return None
    except OSError as exc:
        log.debug("no reflink %s -> %s (%s)", src, dst, exc)
        return f"no reflink: {exc.strerror or exc}"


def _same_filesystem(a: Path, b: Path) -> bool:
    """Whether ``a`` and the folder ``b`` are on one filesystem (a hard link can join them)."""
    return a.stat().st_dev == b.stat().st_dev


def _hard_link(src: Path, folder: Path, name: str) -> tuple[Path | None, str]:
    """A hard link of ``src`` in ``folder`` under a temporary name: (its path, "") or (None, why not)."""
    if not _same_filesystem(src, folder):
        return None, "no hard link: another filesystem"
    tmp = folder / f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    try:
        os.link(src, tmp)
    except OSError as exc:  # EXDEV (bind mounts), EPERM (protected_hardlinks), EMLINK, no links
        log.warning("cannot hard-link %s (%s)", src, exc)
        return None, f"no hard link: {exc.strerror or exc}"
    return tmp, ""


def _stage_data(ref: ExternalDataRef, final: Path, mode: str,
                progress: Progress | None) -> tuple[Path, str, str]:
    """A temporary file beside ``final`` with ``ref``'s bytes, placed by the first way of
    ``PLACEMENT[mode]`` that works: (its path, how: link/reflink/copy, why not a faster way)."""
    why: list[str] = []
    for how in PLACEMENT[mode]:
        if how == "link":
            linked, reason = _hard_link(ref.path, final.parent, final.name)
            if linked is not None:
                return linked, "link", "; ".join(why)
            why.append(reason)
            continue
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            if how == "reflink":
                reason = _reflink(ref.path, tmp)
                if reason is not None:
                    why.append(reason)
                    tmp.unlink()
                    continue
            else:
                log.log(logging.INFO if mode == "copy" else logging.WARNING,  # asked for, or a fallback
                        "copying weights %s -> %s (%.1f MB apparent; %s)", ref.path, final,
                        ref.size / 1e6, "; ".join(why) or "asked")
                _copy_sparse(ref.path, tmp, progress)
            os.chmod(tmp, stat.S_IMODE(ref.path.stat().st_mode))  # our own new inode only
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, how, "; ".join(why)
    raise AssertionError(f"PLACEMENT[{mode!r}] ends without a copy")  # unreachable: every mode ends with copy


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


def _write(
    model: ir.Model, in_path: Path, out_path: Path, refs: list[ExternalDataRef], mode: str,
    progress: Progress | None = None,
) -> tuple[list[Path], list[str], list[str]]:
    """Save atomically; returns the data files the output references, how each got there and
    why not a faster way. ``progress(done, total)`` counts over all data files."""
    out_dir = out_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []  # (temporary, final) data files
    data_files: list[Path] = []
    how: list[str] = []
    why: list[str] = []
    try:
        if refs and mode in PLACEMENT:
            mapping: dict[str, tuple[str, Path]] = {}
            total, placed = sum(r.size for r in refs), 0
            for ref in refs:
                location = (f"{out_path.name}.data" if len(refs) == 1
                            else f"{out_path.name}.data.d/{os.path.normpath(ref.location)}")
                final = out_dir / location
                if any(os.path.realpath(final) == os.path.realpath(r.path) for r in refs):
                    raise ConfigError(f"the copy of {ref.location!r} would overwrite the input's "
                                      f"data file {final}; choose another --out name.")
                final.parent.mkdir(parents=True, exist_ok=True)
                step = None if progress is None else (
                    lambda done, _total, base=placed: progress(base + done, total))
                tmp, done, reason = _stage_data(ref, final, mode, step)
                placed += ref.size
                staged.append((tmp, final))
                how.append(done)
                why.append(reason)
                mapping[os.path.normpath(os.path.abspath(ref.path))] = (location, out_dir)
                data_files.append(final)
            _relink(model, mapping)
        elif refs:  # share: same folder, same relative locations
            data_files = [ref.path for ref in refs]
            how = ["share"] * len(refs)
            why = [""] * len(refs)
        fd, tmp_model = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        staged_model = Path(tmp_model)
        try:
            ir.save(model, tmp_model, format="protobuf")  # external tensors keep their (new) locations; no data read
            os.chmod(tmp_model, stat.S_IMODE(in_path.stat().st_mode))  # mkstemp made it 0600
            for tmp, final in staged:
                os.replace(tmp, final)
            staged = []
            os.replace(tmp_model, out_path)
        finally:
            if staged_model.exists():
                staged_model.unlink()
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return data_files, how, why


# ---------------------------------------------------------------------------------------------
# Graph forms: which formulation a foreign graph gets


def graph_form(model: ir.Model) -> str:
    """``"onnx-attention"`` (ONNX ``Attention`` op, opset 23), ``"contrib"`` (ONNX Runtime
    contrib ops: GroupQueryAttention / MultiHeadAttention / SkipSimplifiedLayerNormalization) or
    ``"standard"`` (MatMul -> Softmax -> MatMul with plain residual Adds)."""
    ops = {(n.domain or "", n.op_type) for n in model.graph}
    if ("", "Attention") in ops or ("ai.onnx", "Attention") in ops:
        return "onnx-attention"
    if any(d == CONTRIB_DOMAIN and op in _CONTRIB_NORMALISED for d, op in ops):
        return "contrib"
    return "standard"


_CONTRIB_NORMALISED = {"GroupQueryAttention", "MultiHeadAttention", "SkipSimplifiedLayerNormalization"}


def _onnx_checkable(model: ir.Model) -> bool:
    """onnx.checker knows every op (no ONNX Runtime-only op such as the default-domain
    SimplifiedLayerNormalization, nor contrib ops)."""
    return all((n.domain or "") in ("", "ai.onnx") and n.op_type not in _ORT_ONLY_DEFAULT_DOMAIN
               for n in model.graph)


_ORT_ONLY_DEFAULT_DOMAIN = {"SimplifiedLayerNormalization", "LayerNormalization"}  # < opset 17 for the latter


FORMULATIONS = ("auto", "naive", "fused-qk", "fused-mask", "kernel")
Formulation = Literal["auto", "naive", "fused-qk", "fused-mask", "kernel"]
# auto on GroupQueryAttention / MultiHeadAttention graphs: naive, measured faster than the ONNX
# Attention form + fused-qk on CPU (docs/foreign-graphs.md, "Parity and price"); kernel is faster
# still but needs the custom op registered wherever the graph runs, so auto never picks it.
CONTRIB_AUTO = "naive"
_FUSED = {"fused-qk": "qk", "fused-mask": "mask", "kernel": "kernel"}  # formulation -> fused_var shift
_LABEL = {shift: name for name, shift in _FUSED.items()}


def resolve_formulation(model: ir.Model, formulation: str = "auto") -> str:
    """The formulation ``formulation`` stands for on this graph (``auto`` resolved), or a
    ``ConfigError`` for one the graph cannot take: ``naive`` needs eager attention (or contrib
    attention it unfuses); ``fused-*`` / ``kernel`` need attention kept as one op (ONNX
    ``Attention``, or GroupQueryAttention / MultiHeadAttention it normalises into one)."""
    if formulation not in FORMULATIONS:
        raise ConfigError(f"formulation must be one of {FORMULATIONS}, found {formulation!r}.")
    form = graph_form(model)
    fusable = form == "onnx-attention" or bool(contrib_layers(model))
    if formulation == "auto":
        return "fused-qk" if form == "onnx-attention" else _contrib_auto(model) if fusable else "naive"
    if formulation == "naive" and form == "onnx-attention":
        raise ConfigError(
            "--formulation naive needs attention as MatMul -> Softmax -> MatMul; found ONNX Attention ops, "
            "which only the fused formulations rewrite. Use --formulation auto, fused-qk, fused-mask or kernel "
            "(or export the model with eager attention)."
        )
    if formulation in _FUSED and not fusable:
        raise ConfigError(
            f"--formulation {formulation} keeps attention one op: expected ONNX Attention or "
            "GroupQueryAttention / MultiHeadAttention nodes; found none (attention as MatMul -> "
            "Softmax -> MatMul). Use --formulation auto or naive."
        )
    if formulation == "kernel":
        from var_export.passes.fused_var import SHIFTS

        if "kernel" not in SHIFTS:
            raise ConfigError(
                "--formulation kernel needs the var_export::VarAttention custom op (passes.fused_var "
                f"shift 'kernel'); this installation has the shifts {SHIFTS} only. Use --formulation "
                "auto or fused-qk."
            )
    return formulation


def _contrib_auto(model: ir.Model) -> str:
    """auto on contrib attention: ``CONTRIB_AUTO``; fused-qk where only the ONNX Attention form
    reproduces the graph (GQA with ``rotary_interleaved=1``); naive where the opset bump that
    form needs would change an op's meaning."""
    interleaved = any(n.op_type == "GroupQueryAttention" and n.attributes.get_int("rotary_interleaved", 0)
                      for n in contrib_layers(model).values())
    wanted = "fused-qk" if interleaved else CONTRIB_AUTO
    if wanted == "naive":
        return "naive"
    from var_export.passes.contrib_attention import opset_blockers

    blockers = opset_blockers(model)
    if blockers:
        log.info("auto formulation: naive (opset 23 would change %s)", blockers)
        return "naive"
    return wanted


def _apply(model: ir.Model, settings: VarSettings, heads: list[tuple[int, int]] | None,
           num_layers: int | None, cal: dict[str, Any] | None,
           formulation: str = "auto") -> tuple[Any, list[str], str]:
    """Route the graph to its formulation (in place); returns the VarReport, notes and the
    formulation applied."""
    form = graph_form(model)
    chosen = resolve_formulation(model, formulation)
    notes = [f"graph form: {form}", f"formulation: {chosen}" + (" (auto)" if formulation == "auto" else "")]
    if form == "onnx-attention":
        notes[-1] += " (passes.fused_var; each Attention op stays one op)"
        report = _apply_fused(model, settings, heads, num_layers, cal, _FUSED[chosen])
    elif chosen in _FUSED:
        report = _apply_contrib_fused(model, settings, heads, num_layers, cal, _FUSED[chosen], notes)
    else:
        report = _apply_naive(model, settings, heads, num_layers, cal, form, notes)
    if not _onnx_checkable(model):
        notes.append("onnx.checker skipped: the graph has ONNX Runtime-only ops (loads in ONNX Runtime only)")
    if chosen != "naive" or form != "contrib":
        model.metadata_props["var_export.formulation"] = chosen
    return report, notes, chosen


def _contrib_num_layers(model: ir.Model, num_layers: int | None) -> int:
    n = num_layers if num_layers is not None else len(contrib_layers(model)) or None
    if n is None:
        raise ModelLoadError("no past_key_values.{i}.key inputs: cannot tell the decoder's layers.")
    return n


def _apply_contrib_fused(model: ir.Model, settings: VarSettings, heads: list[tuple[int, int]] | None,
                         num_layers: int | None, cal: dict[str, Any] | None, shift: str, notes: list[str]) -> Any:
    """GroupQueryAttention / MultiHeadAttention: one ONNX Attention per VAR layer, the fused
    formulation, then the contrib ops put back where VAR changes nothing."""
    from var_export.passes.unfuse_contrib import normalize_contrib, restore

    before = model.graph.num_nodes()
    n = _contrib_num_layers(model, num_layers)
    replaced = normalize_contrib(model, settings.var_layers(n), target="attention")
    report = _apply_fused(model, settings, heads, n, cal, shift, check=_onnx_checkable(model))
    changed = {lr.layer for lr in report.layers if lr.redistribution}
    kept = [r for r in replaced if r.layer not in changed]
    restore(model, kept)
    notes.append(
        f"contrib ops: one {'var_export::VarAttention' if shift == 'kernel' else 'ONNX Attention (opset 23)'} on layers "
        f"{sorted({r.layer for r in replaced} & changed)}, fused ops kept on "
        f"{sorted({r.layer for r in kept})} (VAR changes nothing there)"
    )
    report.nodes_added = model.graph.num_nodes() - before
    return report


def _apply_naive(model: ir.Model, settings: VarSettings, heads: list[tuple[int, int]] | None,
                 num_layers: int | None, cal: dict[str, Any] | None, form: str, notes: list[str]) -> Any:
    """The naive formulation (``apply_var``); contrib attention unfused into eager ops first."""
    from var_export.passes.pipeline import apply_var

    before = model.graph.num_nodes()
    replaced = []
    if form == "contrib":
        from var_export.passes.unfuse_contrib import normalize_contrib

        replaced = normalize_contrib(model, settings.var_layers(_contrib_num_layers(model, num_layers)))
    if cal:
        from var_export.passes.locate import locate_layers

        matches = locate_layers(model).matches
        hidden = next((m.residual.shape[-1] for m in matches if m.residual.shape is not None
                       and isinstance(m.residual.shape[-1], int)), None)
        _check_fingerprint(cal, num_layers or len(matches), hidden, {m.layer: m.num_heads for m in matches})
    _, report = apply_var(model, settings, heads, num_layers=num_layers, inplace=True, check=_onnx_checkable(model))
    if replaced:
        from var_export.passes.unfuse_contrib import restore

        changed = {lr.layer for lr in report.layers if lr.redistribution}
        kept = [r for r in replaced if r.layer not in changed]
        restore(model, kept)
        notes.append(
            "contrib ops: unfused on layers "
            f"{sorted({r.layer for r in replaced} & changed)}, fused ops kept on "
            f"{sorted({r.layer for r in kept})} (VAR changes nothing there)"
        )
        model.metadata_props["var_export.formulation"] = "naive-unfused-contrib"
    report.nodes_added = model.graph.num_nodes() - before
    return report


def _check_loads_in_ort(model: ir.Model) -> None:
    """Graphs onnx.checker cannot check (ORT-only ops): an ONNX Runtime session must accept them
    (only for self-contained graphs: a session would read external weights)."""
    import onnxruntime as ort

    from var_export import kernels

    try:
        ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                             kernels.session_options(model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any load failure is the same refusal
        raise GraphPatternError(
            f"the rewritten graph does not load in ONNX Runtime ({type(exc).__name__}: {exc}); "
            "nothing was written. Please report this graph form."
        ) from exc


def contrib_layers(model: ir.Model) -> dict[int, Any]:
    from var_export.passes.unfuse_contrib import contrib_attention_layers

    return contrib_attention_layers(model)


def _apply_fused(model: ir.Model, settings: VarSettings, heads: list[tuple[int, int]] | None,
                 num_layers: int | None, cal: dict[str, Any] | None, shift: str = "qk", *,
                 check: bool = True) -> Any:
    """ONNX ``Attention`` graphs: the fused formulation (attention stays one op)."""
    from var_export.passes.fused_var import apply_fused_var, locate_fused_layers
    from var_export.passes.pipeline import LayerReport, VarReport

    if cal:
        matches = locate_fused_layers(model)
        hidden = next((m.residual.shape[-1] for m in matches if m.residual.shape is not None
                       and isinstance(m.residual.shape[-1], int)), None)
        _check_fingerprint(cal, num_layers or len(matches), hidden, {m.layer: m.num_heads for m in matches})
    log.info("ONNX Attention ops: the fused formulation (passes.fused_var, shift %s)", shift)
    _, fr = apply_fused_var(model, settings, heads, num_layers=num_layers, inplace=True,
                            shift=shift, check=check)  # type: ignore[arg-type]
    by_layer = {int(d["layer"]): d for d in fr.layers}  # type: ignore[call-overload]
    layers = [
        LayerReport(layer=la, found={**by_layer[la], "formulation": _LABEL.get(fr.shift, fr.shift)}, sink_detection=True,
                    redistribution=la in fr.changed_layers,
                    heads=None if settings.heads == "dynamic" else sorted(h for l2, h in heads or [] if l2 == la))
        for la in fr.var_layers
    ]
    return VarReport(var_layers=fr.var_layers, num_layers=fr.num_layers, head_mode=fr.head_mode,
                     layers=layers, ignored=[], nodes_added=fr.nodes_added)


# ---------------------------------------------------------------------------------------------
# The entry point


def _check_paths(
    in_path: str | os.PathLike[str], out_path: str | os.PathLike[str] | None, dry_run: bool
) -> tuple[Path, Path | None]:
    """The input graph (it must exist) and the output path (needed unless ``dry_run``; never the input)."""
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
    return in_path, out


def _load_input(in_path: Path, out: Path | None, dry_run: bool) -> tuple[ir.Model, list[ExternalDataRef]]:
    """The input graph (weights left on disk) and its checked external data files; refuses an
    output that is one of those files or that may not be replaced, before any pass runs."""
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
    return model, refs


def _data_mode(refs: list[ExternalDataRef], data: DataMode, in_path: Path, out: Path | None) -> str:
    """How the external weights reach the output: ``inline`` without any, ``share`` for
    ``auto`` in the input's folder, else ``data`` (``auto`` elsewhere: reflink, hard link or copy)."""
    if not refs:
        return "inline"
    if data not in ("auto", "share", *PLACEMENT):
        raise ConfigError(f"data={data!r}: expected one of auto, share, copy, link.")
    same_dir = out is None or os.path.realpath(out.parent) == os.path.realpath(in_path.parent)
    if data == "auto" and same_dir:
        return "share"
    if data == "share" and not same_dir:
        assert out is not None
        raise ConfigError(
            "data='share' needs the output in the input's folder (its weights are referenced "
            f"by relative location); {out.parent} is another folder. Use data='auto' (reflink, "
            "hard link or copy) or data='copy' (a standalone copy)."
        )
    return data


def _write_output(
    model: ir.Model, in_path: Path, out: Path, refs: list[ExternalDataRef], mode: str, progress: Progress | None
) -> tuple[list[Path], list[str], list[str]]:
    """Write the graph and its weights (``_write``), then mark what it wrote as ours."""
    from var_export.outputs import claim, write_error

    try:
        data_files, data_how, data_why = _write(model, in_path, out, refs, mode, progress)
    except OSError as exc:  # disk full, read-only, ...: a clear error; _write removed its temp files
        raise write_error(exc, [out]) from exc
    claim([out, *(p for p in data_files if p.parent == out.parent)])  # ours: replaceable next time
    return data_files, data_how, data_why


def rewrite_decoder(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str] | None,
    settings: VarSettings,
    *,
    heads: Iterable[Sequence[int]] | None = None,
    calibration: str | os.PathLike[str] | dict[str, Any] | None = None,
    dry_run: bool = False,
    data: DataMode = "auto",
    progress: Progress | None = None,
    formulation: Formulation = "auto",
) -> RewriteResult:
    """Bake VAR into the decoder graph ``in_path`` and write it to ``out_path``.

    ``heads``: calibrated (layer, head) pairs for static/hybrid; default: the calibration's
    ``heads``. ``calibration``: a ``calibration.json`` path or its parsed dict (heads and a
    fingerprint check against the graph). ``dry_run``: plan only, nothing written.
    ``data``: how external weights reach the output (module docstring): ``auto`` shares them
    when ``out_path`` is in the input's folder, else reflinks, hard-links (same filesystem) or
    copies them; ``copy`` never hard-links; ``link`` prefers a hard link.
    ``progress(done, total)``: bytes of a weight copy (over all data files; links report none).
    ``formulation``: ``auto`` (ONNX Attention graphs: fused-qk; GroupQueryAttention /
    MultiHeadAttention graphs: ``CONTRIB_AUTO``; others: naive), ``naive``, ``fused-qk``,
    ``fused-mask`` or ``kernel`` (:func:`resolve_formulation`; impossible ones are refused).
    """
    t0 = time.perf_counter()
    in_path, out = _check_paths(in_path, out_path, dry_run)
    model, refs = _load_input(in_path, out, dry_run)
    mode = _data_mode(refs, data, in_path, out)  # before any pass: a bad mode is refused first

    cal = load_calibration(calibration) if isinstance(calibration, (str, os.PathLike)) else calibration
    head_list = [(int(a), int(b)) for a, b in heads] if heads is not None else calibration_heads(cal)

    num_layers = graph_num_layers(model)
    inputs_before = [v.name for v in model.graph.inputs]
    outputs_before = [v.name for v in model.graph.outputs]
    report, notes, chosen = _apply(model, settings, head_list, num_layers, cal, formulation)
    added_in = [v.name for v in model.graph.inputs if v.name not in inputs_before]
    added_out = [v.name for v in model.graph.outputs if v.name not in outputs_before]

    data_files = [r.path for r in refs]
    data_how: list[str] = []
    data_why: list[str] = []
    if not refs and not _onnx_checkable(model):
        _check_loads_in_ort(model)
    if not dry_run:
        assert out is not None
        data_files, data_how, data_why = _write_output(model, in_path, out, refs, mode, progress)
        log.info("wrote %s (%d VAR layers, weights %s)", out, len(report.var_layers), mode)
    return RewriteResult(
        in_path=in_path, out_path=None if dry_run else out, dry_run=dry_run, report=report,
        data_mode=mode, data_files=data_files, added_inputs=added_in,
        added_outputs=added_out, seconds=time.perf_counter() - t0, notes=notes, data_how=data_how,
        data_why=data_why, data_sources=[r.path for r in refs],
        formulation=chosen,
    )
