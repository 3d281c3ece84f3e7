"""Typed schemas (pydantic) of every JSON file var-export reads back.

One model per document; :func:`parse_json_file` / :func:`validate_document` turn any problem
(not JSON, NaN/Infinity, a wrong type, a missing key, a value out of range) into ONE error of
the caller's ``VarExportError`` subclass that names the field, e.g.
``manifest.json: files.decoder_model_merged.onnx.bytes: expected an integer >= 0, found -3``.

* :class:`BundleManifest` — ``manifest.json`` of a bundle (var_export.bundle).
* :class:`CalibrationFile` — ``calibration.json`` (var_export.core.calibration_schema).
* :class:`EngineManifest` — the manifest written beside TensorRT engines (var_export.trt).
* :class:`ProcessorFiles` — the keys the runtime relies on in ``processor_config.json`` /
  ``preprocessor_config.json`` / ``tokenizer_config.json``.
* :class:`OwnedMarker` — ``.var-export-owned`` (var_export.outputs).

Documents keep unknown keys (``extra="allow"``): newer writers may add fields; only what this
version relies on is checked. torch-free; imports nothing else of the project but errors.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from var_export.core.errors import VarExportError

__all__ = [
    "BundleManifest",
    "CalibrationFile",
    "EngineManifest",
    "FileEntry",
    "OwnedMarker",
    "ProcessorFiles",
    "parse_json_file",
    "validate_document",
]

M = TypeVar("M", bound=BaseModel)

NonNegInt = Annotated[int, Field(ge=0, strict=True)]
PosInt = Annotated[int, Field(gt=0, strict=True)]
Unit = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# ---------------------------------------------------------------------------------------------
# Pieces


class VarSettingsDoc(_Doc):
    """``VarSettings.to_dict()`` as stored in manifests and calibration files."""

    sink_dims: list[NonNegInt] = Field(min_length=1)
    tau: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    rho: Unit
    summ: Unit
    p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)]
    layers: str | list[int] | None = None
    exclude_last_layer: bool = False
    sink_scope: Literal["prompt", "all"] = "prompt"
    heads: Literal["dynamic", "static", "hybrid"] = "hybrid"
    convention: Literal["code", "paper"] = "code"


class FileEntry(_Strict):
    sha256: Sha256
    bytes: NonNegInt


class GraphIO(_Doc):
    inputs: list[Name]
    outputs: list[Name] = Field(min_length=1)


HeadPair = tuple[NonNegInt, NonNegInt]


# ---------------------------------------------------------------------------------------------
# Documents


class BundleManifest(_Doc):
    """``manifest.json`` (DESIGN.md §3); external data files are listed in ``files`` too."""

    schema_version: Literal[1]
    model_id: Name
    fingerprint: dict[str, Any] | Name
    var: VarSettingsDoc | None = None
    var_layers: list[NonNegInt] = Field(default_factory=list)
    head_mode: Literal["dynamic", "static", "hybrid"] | None = None
    heads: list[HeadPair] = Field(default_factory=list)
    opset: Annotated[int, Field(ge=7, le=40)] | None = None
    dtype: Literal["fp32", "fp16", "bf16"] | None = None
    max_position_embeddings: PosInt | None = None
    image_token_id: NonNegInt | None = None
    eos_token_id: NonNegInt | list[NonNegInt] | None = None
    io: dict[Name, GraphIO]
    files: dict[Name, FileEntry] = Field(min_length=1)
    tool_versions: dict[str, str | None] = Field(default_factory=dict)
    created: str | None = None

    @model_validator(mode="after")
    def _var_consistent(self) -> BundleManifest:
        if self.var is not None and self.head_mode is not None and self.var.heads != self.head_mode:
            raise ValueError(f"head_mode {self.head_mode!r} differs from var.heads {self.var.heads!r}")
        return self


class CalibrationLayer(_Doc):
    layer: NonNegInt
    image_centric_score: list[Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None] = Field(
        default_factory=list
    )
    sink_count: NonNegInt | None = None
    eligible_rows: NonNegInt | None = None


class CalibrationFile(_Doc):
    """``calibration.json`` (DESIGN.md §2). ``partial=True`` in :func:`validate_document` context
    (graph rewriting) makes the model-identity fields optional."""

    schema_version: Literal[1]
    model_id: Name
    fingerprint: dict[str, Any] | Name
    settings: dict[str, Any]
    sink_dims: list[NonNegInt]
    layers: list[CalibrationLayer]
    heads: list[HeadPair] | None
    head_threshold: Unit | None = None
    num_samples: NonNegInt | None = None

    @field_validator("settings")
    @classmethod
    def _finite_settings(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("tau", "rho", "summ", "p"):
            x = v.get(key)
            if x is None:
                continue
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise ValueError(f"settings.{key} must be a finite number, found {x!r}")
            if key != "tau" and not 0 <= x <= 1:
                raise ValueError(f"settings.{key} must be in [0, 1], found {x!r}")
            if key == "tau" and x <= 0:
                raise ValueError(f"settings.tau must be > 0, found {x!r}")
        return v


class PartialCalibrationFile(CalibrationFile):
    """A calibration read for a graph rewrite: only the fields present are checked."""

    schema_version: Literal[1] | None = None  # type: ignore[assignment]
    model_id: Name | None = None  # type: ignore[assignment]
    fingerprint: dict[str, Any] | Name | None = None  # type: ignore[assignment]
    settings: dict[str, Any] = Field(default_factory=dict)
    sink_dims: list[NonNegInt] = Field(default_factory=list)
    layers: list[CalibrationLayer] = Field(default_factory=list)
    heads: list[HeadPair] | None = None


class EngineEntry(_Doc):
    """One TensorRT engine in an engine manifest."""

    file: Name
    sha256: Sha256
    bytes: NonNegInt
    onnx: Name
    onnx_sha256: Sha256
    profiles: list[dict[str, Any]] = Field(default_factory=list)


class EngineManifest(_Doc):
    """The engine manifest written beside TensorRT engines (flavour, version, targets, ...)."""

    schema_version: Literal[1]
    flavor: Literal["tensorrt", "tensorrt_rtx"]
    tensorrt_version: Name
    precision: Literal["fp32", "fp16", "bf16", "strongly-typed"]
    targets: list[Name] = Field(default_factory=list)
    engines: dict[Name, EngineEntry] = Field(min_length=1)
    bundle: str | None = None


class ProcessorFiles(_Doc):
    """Keys of processor/tokenizer configs the runtime relies on (when present)."""

    image_token: Name | None = None
    patch_size: PosInt | None = None
    num_additional_image_tokens: NonNegInt | None = None
    model_max_length: Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0)] | None = None
    size: dict[str, PosInt] | PosInt | None = None
    crop_size: dict[str, PosInt] | PosInt | None = None
    image_mean: list[Annotated[float, Field(allow_inf_nan=False)]] | float | None = None
    image_std: list[Annotated[float, Field(gt=0, allow_inf_nan=False)]] | float | None = None


class OwnedMarker(_Strict):
    """``.var-export-owned``: the files var-export wrote in a folder."""

    tool: Literal["var-export"] = "var-export"
    version: Literal[1] = 1
    files: list[Name]


# ---------------------------------------------------------------------------------------------
# Reading


def _nonfinite_path(doc: Any, path: str = "") -> str | None:
    """The dotted path of the first NaN/Infinity in a parsed JSON value, else None."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return path or "(document)"
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        found = _nonfinite_path(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _loads(text: str, path: Path, error: type[VarExportError], fix: str) -> Any:
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise error(f"{path} is not a readable JSON file ({exc}). {fix}".rstrip()) from None
    bad = _nonfinite_path(doc)
    if bad:
        raise error(f"{path}: {bad}: expected a finite number, found NaN or Infinity. {fix}".rstrip())
    return doc


_UNION_TAG = re.compile(
    r"^(constrained-\w+|function-\w+(\[.*\])?|[a-z_]+\[.*\]|str|int|float|bool|none|list|dict|tuple|"
    r"lax-or-strict|json-or-python|[A-Z]\w*Doc|FileEntry|GraphIO)$"
)


def _loc(loc: tuple[Any, ...]) -> str:
    """The field path of an error; pydantic's union-member tags (``dict[str,any]``) left out."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p))]
    return ".".join(parts) or "(document)"


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    found = err.get("input")
    shown = repr(found)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    msg = err["msg"][0].lower() + err["msg"][1:] if err["msg"] else "invalid"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    if err["type"] == "missing":
        return f"{_loc(err['loc'])}: required field missing{more}"
    return f"{_loc(err['loc'])}: {msg}, found {shown}{more}"


def validate_document(
    doc: Any, model: type[M], error: type[VarExportError], *, where: str, fix: str = ""
) -> M:
    """``model`` from an already parsed JSON value; ``error`` naming the first bad field."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise error(f"{where}: {_first_error(exc)}. {fix}".rstrip()) from None


def parse_json_file(
    path: str | os.PathLike[str], model: type[M], error: type[VarExportError], *, fix: str = ""
) -> M:
    """Read ``path`` (UTF-8 JSON, no NaN/Infinity) and validate it as ``model``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path} does not exist. {fix}".rstrip()) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path} cannot be read as UTF-8 text ({exc}). {fix}".rstrip()) from None
    doc = _loads(text, path, error, fix)
    return validate_document(doc, model, error, where=str(path), fix=fix)


def load_json_object(path: str | os.PathLike[str], error: type[VarExportError], *, fix: str = "") -> dict:
    """A JSON object from ``path`` (no NaN/Infinity), without a schema."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path} cannot be read as UTF-8 text ({exc}). {fix}".rstrip()) from None
    doc = _loads(text, path, error, fix)
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, found {type(doc).__name__}. {fix}".rstrip())
    return doc
