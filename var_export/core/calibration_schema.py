"""calibration.json (DESIGN.md §2): the schema version, atomic writing and checked reading.

torch-free, so graph-side code (``var-export rewrite``) reads calibration files without torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from var_export.core.errors import CalibrationError

SCHEMA_VERSION = 1  # bump on any incompatible change of calibration.json
REQUIRED_FIELDS = ("model_id", "fingerprint", "settings", "sink_dims", "layers", "heads")


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def write_calibration(cal: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``cal`` as JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cal, f, indent=1)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _describe(fp: Any) -> str:
    if not isinstance(fp, Mapping):
        return repr(fp)
    keys = ("num_layers", "num_heads", "num_kv_heads", "hidden_size")
    short = ", ".join(f"{k}={fp[k]}" for k in keys if k in fp)
    return short or json.dumps(fp, sort_keys=True)[:120]


def load_calibration(
    path: str | os.PathLike, *, fingerprint: Mapping[str, Any] | None = None, strict: bool = True
) -> dict[str, Any]:
    """Read and check a calibration.json; with ``fingerprint``, check it was made for this model.

    ``strict=False`` (graph rewriting, where no HF config exists to fingerprint) accepts a partial
    file: only the fields present are checked.
    """
    from var_export.core.schemas import (
        CalibrationFile,
        PartialCalibrationFile,
        load_json_object,
        validate_document,
    )

    path = Path(path)
    fix = "Re-run `var-export calibrate` with this version of var-export."
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist; run `var-export calibrate`.")
    cal = load_json_object(path, CalibrationError, fix=fix)
    validate_document(cal, CalibrationFile if strict else PartialCalibrationFile, CalibrationError,
                      where=str(path), fix=fix)
    if fingerprint is not None and jsonable(dict(fingerprint)) != cal.get("fingerprint"):
        raise CalibrationError(
            f"{path} was made for model {cal.get('model_id')!r} ({_describe(cal.get('fingerprint'))}), "
            f"not for this model ({_describe(fingerprint)}). Re-run `var-export calibrate` for this model."
        )
    return cal


def calibration_heads(calibration: Mapping[str, Any] | None) -> list[tuple[int, int]] | None:
    """The calibrated (layer, head) pairs, or None when the calibration lists none."""
    if not calibration or calibration.get("heads") is None:
        return None
    return [(int(a), int(b)) for a, b in calibration["heads"]]
