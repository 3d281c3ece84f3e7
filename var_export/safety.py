"""Untrusted graphs: refuse external-data references that leave the model's folder.

An ONNX file names its external weight files by ``location`` (TensorProto.external_data),
resolved against the folder of the ``.onnx`` file. A graph downloaded from the internet can
name ``/etc/passwd``, ``../../home/u/.ssh/id_rsa`` or a symlink that points outside its
folder; whatever reads the weights (ONNX Runtime, TensorRT, a copy step) would then read or
copy that file. :func:`check_external_data` reads only the graph's protobuf (never the
weights) and refuses such references *before* anything else touches the graph.

Rules, for every tensor stored externally (initializers, ``Constant`` attributes, sparse
initializers, subgraphs of ``If``/``Loop``/``Scan``):

* ``location`` is a non-empty relative path (no ``/abs``, ``C:\\``, ``\\\\server``);
* it stays inside the model's folder as written (``a/../b`` is fine, ``../x`` is not)
  and after resolving symlinks (a symlink inside the folder pointing outside is refused);
* the file exists, is a regular file, and ``offset + length`` fits in it.

This module is torch-free (it only imports ``onnx``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx

from var_export.core.errors import ModelLoadError, UnsafeInputError

__all__ = ["ExternalDataRef", "check_external_data", "external_tensors"]

log = logging.getLogger(__name__)

_WINDOWS_ABS = re.compile(r"^([A-Za-z]:|[\\/]{2})")


@dataclasses.dataclass(frozen=True)
class ExternalDataRef:
    """One external data file referenced by a graph (all its tensors together)."""

    location: str  # as written in the graph, relative to the model's folder
    path: Path  # model folder / location (not symlink-resolved)
    size: int  # file size in bytes (sparse files count their apparent size)
    tensors: int  # number of tensors stored in it
    end: int  # largest offset + length used (<= size)


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model whose data lives in an external file."""
    for tensor in _all_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            yield from _attr_tensors(attr)


def _attr_tensors(attr: onnx.AttributeProto) -> Iterator[onnx.TensorProto]:
    if attr.HasField("t"):
        yield attr.t
    yield from attr.tensors
    if attr.HasField("sparse_tensor"):
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    if attr.HasField("g"):
        yield from _all_tensors(attr.g)
    for g in attr.graphs:
        yield from _all_tensors(g)


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _refuse(model_path: Path, tensor: str, location: str, why: str) -> UnsafeInputError:
    return UnsafeInputError(
        f"{model_path}: tensor {tensor!r} stores its data at external location {location!r}, "
        f"which {why}. Expected a relative path to a file inside the model's folder "
        f"{str(model_path.parent)!r}. Refusing to read this graph: it may come from an untrusted "
        "source. If the layout is legitimate (e.g. a Hugging Face cache snapshot whose files are "
        "symlinks into blobs/), copy the model folder with its files resolved (`cp -rL`) and "
        "rewrite the copy."
    )


def _load_graph(model_path: Path) -> onnx.ModelProto:
    """The graph protobuf of ``model_path``, without its weights (a clear error if unreadable)."""
    try:
        return onnx.load(os.fspath(model_path), load_external_data=False)
    except FileNotFoundError:
        raise ModelLoadError(f"ONNX file {str(model_path)!r} not found.") from None
    except Exception as exc:  # protobuf DecodeError and friends
        raise ModelLoadError(
            f"{model_path} is not a readable ONNX model ({type(exc).__name__}: {exc})."
        ) from exc


def _safe_location(model_path: Path, tensor: str, location: str, base: str, base_real: str) -> tuple[str, str]:
    """(joined, real) path of a tensor's external ``location``; refuses one that is empty,
    absolute, or escapes the model's folder ``base`` (directly or through a symlink)."""
    if not location:
        raise ModelLoadError(
            f"{model_path}: tensor {tensor!r} is marked external but names no location."
        )
    if os.path.isabs(location) or _WINDOWS_ABS.match(location) or location.startswith("~"):
        raise _refuse(model_path, tensor, location, "is an absolute path")
    if "\x00" in location:
        raise _refuse(model_path, tensor, location, "contains a NUL byte")
    joined = os.path.normpath(os.path.join(base, location))
    if not _within(joined, base) or joined == base:
        raise _refuse(model_path, tensor, location, f"escapes it (resolves to {joined!r})")
    real = os.path.realpath(joined)
    if not _within(real, base_real) or real == base_real:
        raise _refuse(
            model_path, tensor, location,
            f"is a symlink (or passes through one) resolving to {real!r}, outside the folder",
        )
    return joined, real


def _data_file_size(model_path: Path, tensor: str, location: str, base: str, real: str) -> int:
    """The size of the external data file at ``real``: it must exist and be a regular file."""
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise ModelLoadError(
            f"{model_path}: external data file {location!r} (for tensor {tensor!r}) "
            f"not found in {base!r}. Copy the model together with its data file(s)."
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(model_path, tensor, location, "is not a regular file")
    return st.st_size


def _tensor_end(model_path: Path, tensor: str, info: dict[str, str], size: int) -> int:
    """The end offset of a tensor's bytes in its data file (``size`` bytes): integer, not
    negative, within the file."""
    location = info.get("location", "")
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(
            f"{model_path}: tensor {tensor!r} has a non-integer external offset/length "
            f"{info.get('offset')!r}/{info.get('length')!r}."
        ) from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(
            f"{model_path}: tensor {tensor!r} has a negative external offset/length."
        )
    end = offset + (length if length is not None else 0)
    if end > size:
        raise ModelLoadError(
            f"{model_path}: tensor {tensor!r} needs bytes {offset}..{end} of {location!r}, "
            f"but the file has {size} bytes (truncated or mismatched data file)."
        )
    return end


def check_external_data(
    model_path: str | os.PathLike[str], model: onnx.ModelProto | None = None
) -> list[ExternalDataRef]:
    """Refuse external-data locations that are absolute or escape the model's folder.

    Reads the graph protobuf of ``model_path`` (or uses ``model``, its already parsed proto)
    without loading any weights. Returns one :class:`ExternalDataRef` per data file, in
    first-use order. Raises ``UnsafeInputError`` for absolute locations, ``..`` escapes and
    symlinks resolving outside the folder (or to something that is not a regular file), and
    ``ModelLoadError`` for missing or truncated data files.
    """
    model_path = Path(model_path)
    if model is None:
        model = _load_graph(model_path)
    base = os.path.normpath(os.path.abspath(model_path.parent))
    base_real = os.path.realpath(base)
    refs: dict[str, dict] = {}
    for tensor in external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        joined, real = _safe_location(model_path, tensor.name, location, base, base_real)
        entry = refs.get(joined)
        if entry is None:
            size = _data_file_size(model_path, tensor.name, location, base, real)
            entry = refs[joined] = {"location": location, "size": size, "tensors": 0, "end": 0}
        end = _tensor_end(model_path, tensor.name, info, entry["size"])
        entry["tensors"] += 1
        entry["end"] = max(entry["end"], end)
    out = [
        ExternalDataRef(e["location"], Path(p), e["size"], e["tensors"], e["end"])
        for p, e in refs.items()
    ]
    if out:
        log.debug("external data of %s: %s", model_path, [r.location for r in out])
    return out
