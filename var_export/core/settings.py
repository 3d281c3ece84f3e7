"""VAR settings: the knobs of DESIGN.md §1, their validation and the two conventions.

This module is torch-free: the graph passes import it too.

Convention ("code", the default, as the released code MICV-yonsei/VisAttnSink):
  * ``p``   keep fraction of sink attention on a selected row (default 0.6);
  * ``rho`` a row is image-centric iff visual-sink portion <= rho (default 0.5).
Convention "paper" (arXiv 2503.03321) writes the same numbers as
  * ``p_paper = 1 - p`` (fraction taken away; paper 0.4 == code 0.6);
  * ``rho_paper = 1 - rho`` (visual non-sink ratio >= rho_paper; paper 0.8 == code 0.2).
Internally everything is stored in the code convention.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

from var_export.core.errors import ConfigError

HeadMode = Literal["dynamic", "static", "hybrid"]
SinkScope = Literal["prompt", "all"]
Convention = Literal["code", "paper"]

HEAD_MODES: tuple[str, ...] = ("dynamic", "static", "hybrid")
SINK_SCOPES: tuple[str, ...] = ("prompt", "all")
CONVENTIONS: tuple[str, ...] = ("code", "paper")

# Constants of the reference algorithm (DESIGN.md §1); not knobs.
RMS_EPS = 1e-6  # eps of the weightless RMS normalisation used for sink detection
PORTION_EPS = 1e-6  # added to every visual probability in the portion denominator


@dataclasses.dataclass(frozen=True)
class VarSettings:
    """Everything that decides what VAR does, in the released code's convention."""

    sink_dims: tuple[int, ...]  # hidden dims whose normalised magnitude marks a sink token
    tau: float = 20.0  # sink threshold on max |rmsnorm(x)[d]| over sink_dims
    rho: float = 0.5  # row selected iff visual-sink portion <= rho
    summ: float = 0.2  # ... and visual attention mass >= summ
    p: float = 0.6  # keep fraction of sink attention on selected rows
    layers: str = "2:"  # VAR layers, a slice "2:" / "2:-1" or a comma list "2,3,5"
    exclude_last_layer: bool = False  # drop the last decoder layer (paper) from `layers`
    sink_scope: SinkScope = "prompt"  # "prompt": generated tokens are never sinks
    heads: HeadMode = "hybrid"  # dynamic | static | hybrid (DESIGN.md §1)

    def __post_init__(self) -> None:
        validate_knobs(tau=self.tau, rho=self.rho, summ=self.summ, p=self.p)
        if not self.sink_dims:
            raise ConfigError(
                "sink_dims is empty: expected at least one hidden dimension index. "
                "Pass --sink-dims a,b or use a preset / calibration that defines them."
            )
        if any(int(d) != d or d < 0 for d in self.sink_dims):
            raise ConfigError(f"sink_dims must be non-negative integers, found {list(self.sink_dims)}.")
        if self.sink_scope not in SINK_SCOPES:
            raise ConfigError(f"sink_scope must be one of {SINK_SCOPES}, found {self.sink_scope!r}.")
        if self.heads not in HEAD_MODES:
            raise ConfigError(f"heads must be one of {HEAD_MODES}, found {self.heads!r}.")
        _check_layers_syntax(self.layers)  # the range is checked against a model later

    def check_model(self, num_layers: int, hidden_size: int) -> None:
        """Raise ConfigError when sink dims or layers do not fit a model of this size."""
        bad = [d for d in self.sink_dims if d >= hidden_size]
        if bad:
            raise ConfigError(
                f"sink dims {bad} are out of range for hidden size {hidden_size} "
                f"(expected 0..{hidden_size - 1}). Check --sink-dims or the preset for this model."
            )
        if not self.var_layers(num_layers):
            raise ConfigError(
                f"--layers {self.layers!r} selects no decoder layer of a {num_layers}-layer model."
            )

    def var_layers(self, num_layers: int) -> list[int]:
        """The decoder layers that get sink detection and redistribution."""
        layers = parse_layers(self.layers, num_layers)
        if self.exclude_last_layer:
            layers = [i for i in layers if i != num_layers - 1]
        return layers

    def replace(self, **changes: Any) -> VarSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sink_dims"] = [int(x) for x in self.sink_dims]
        d["convention"] = "code"
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VarSettings:
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        if "sink_dims" in kw:
            kw["sink_dims"] = tuple(int(x) for x in kw["sink_dims"])
        if d.get("convention", "code") == "paper":
            kw.update(from_paper_convention(p=kw.get("p", 0.4), rho=kw.get("rho", 0.5)))
        return cls(**kw)


def validate_knobs(*, tau: float, rho: float, summ: float, p: float) -> None:
    """Range checks shared by the CLI, calibration and the passes."""
    for name, value in (("tau", tau), ("rho", rho), ("summ", summ), ("p", p)):
        if not isinstance(value, (int, float)) or math.isnan(value):
            raise ConfigError(f"{name} must be a number, found {value!r}.")
    if not tau > 0:
        raise ConfigError(f"tau must be > 0 (sink threshold, default 20), found {tau}.")
    if not 0 < p <= 1:
        raise ConfigError(
            f"p must be in (0, 1] (keep fraction of sink attention, code convention; default 0.6), "
            f"found {p}. With --convention paper pass the paper's p (fraction removed, default 0.4)."
        )
    if not 0 <= rho <= 1:
        raise ConfigError(f"rho must be in [0, 1] (default 0.5), found {rho}.")
    if not 0 <= summ <= 1:
        raise ConfigError(f"summ must be in [0, 1] (default 0.2), found {summ}.")


def from_paper_convention(*, p: float, rho: float) -> dict[str, float]:
    """Map the paper's (p, rho) to the code convention used everywhere internally."""
    for name, value in (("p", p), ("rho", rho)):
        if not 0 <= value <= 1:
            raise ConfigError(f"paper-convention {name} must be in [0, 1], found {value}.")
    if p >= 1:
        raise ConfigError("paper-convention p must be < 1 (it is the fraction removed from sinks).")
    return {"p": round(1.0 - p, 12), "rho": round(1.0 - rho, 12)}


def to_paper_convention(*, p: float, rho: float) -> dict[str, float]:
    return {"p": round(1.0 - p, 12), "rho": round(1.0 - rho, 12)}


def _check_layers_syntax(spec: str | Sequence[int]) -> None:
    """Raise ConfigError when ``spec`` is neither a slice nor a comma list (no model needed)."""
    if not isinstance(spec, str):
        return
    if ":" in spec:
        parse_layers(spec, 1)  # a slice parses the same for every layer count
        return
    try:
        if not [int(x) for x in spec.split(",") if x.strip()]:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"--layers {spec!r} is not a slice like '2:' / '2:-1' or a comma list like '0,1,5'."
        ) from None


def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Parse ``--layers``: a Python slice ("2:", "2:-1", "::2") or a comma list ("0,1,5").

    Negative indices count from the end as in Python. Returns sorted unique indices.
    """
    if not isinstance(spec, str):
        items = [int(i) for i in spec]
        spec_str = ",".join(str(i) for i in items)
    else:
        spec_str = spec.strip()
    if not spec_str:
        raise ConfigError("--layers is empty: expected a slice like '2:' or a list like '2,3,5'.")
    try:
        if ":" in spec_str:
            parts = spec_str.split(":")
            if len(parts) > 3:
                raise ValueError
            vals = [int(x) if x.strip() else None for x in parts] + [None] * (3 - len(parts))
            if vals[2] == 0:
                raise ValueError
            return sorted(set(range(num_layers)[slice(*vals)]))
        idx = [int(x) for x in spec_str.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"--layers {spec_str!r} is not a slice like '2:' / '2:-1' or a comma list like '0,1,5'."
        ) from None
    out = set()
    for i in idx:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise ConfigError(
                f"--layers names layer {i}, but the model has {num_layers} decoder layers "
                f"(valid: 0..{num_layers - 1} or negative from the end)."
            )
        out.add(j)
    return sorted(out)


def parse_sink_dims(spec: str | Sequence[int]) -> tuple[int, ...]:
    """Parse ``--sink-dims 1415,2533``."""
    if isinstance(spec, str):
        try:
            dims = tuple(int(x) for x in spec.split(",") if x.strip())
        except ValueError:
            raise ConfigError(
                f"--sink-dims {spec!r}: expected comma-separated integers like 1415,2533."
            ) from None
    else:
        dims = tuple(int(x) for x in spec)
    if not dims:
        raise ConfigError("--sink-dims is empty: expected comma-separated integers like 1415,2533.")
    if any(d < 0 for d in dims):
        raise ConfigError(f"--sink-dims must be non-negative, found {list(dims)}.")
    return dims


def check_overrides(overrides: dict[str, Any], convention: Convention = "code") -> None:
    """Range-check the knobs the user gave (None = not given) before any work: a model load or
    an import of torch. Missing knobs take the defaults; sink dims need not be known yet."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention must be one of {CONVENTIONS}, found {convention!r}.")
    given = {k: v for k, v in overrides.items() if v is not None and k in ("tau", "rho", "summ", "p")}
    if convention == "paper" and ("p" in given or "rho" in given):
        paper = from_paper_convention(p=given.get("p", 0.4), rho=given.get("rho", 0.5))
        given.update({k: paper[k] for k in ("p", "rho") if k in given})
    defaults = {f.name: f.default for f in dataclasses.fields(VarSettings) if f.name in ("tau", "rho", "summ", "p")}
    validate_knobs(**{**defaults, **given})
    if overrides.get("sink_dims") is not None:
        parse_sink_dims(overrides["sink_dims"])


def resolve_settings(
    *,
    preset: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    convention: Convention = "code",
) -> VarSettings:
    """Merge VAR knobs: built-in defaults < preset < calibration < explicit overrides.

    ``overrides`` holds the user's values (None = not given); ``p``/``rho`` there are read
    in ``convention`` and stored in the code convention. ``sink_dims`` may be a string
    ("1415,2533") or a sequence.
    """
    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention must be one of {CONVENTIONS}, found {convention!r}.")
    merged: dict[str, Any] = {}
    if preset:
        merged.update(preset.get("var", {}))
        if preset.get("sink_dims"):
            merged["sink_dims"] = preset["sink_dims"]
    if calibration:
        cal_settings = dict(calibration.get("settings", {}))
        if cal_settings.get("convention", "code") == "paper":
            cal_settings.update(
                from_paper_convention(p=cal_settings.get("p", 0.4), rho=cal_settings.get("rho", 0.5))
            )
        for key in ("tau", "rho", "summ", "p", "layers", "sink_scope", "exclude_last_layer"):
            if key in cal_settings:
                merged[key] = cal_settings[key]
        if calibration.get("sink_dims"):
            merged["sink_dims"] = calibration["sink_dims"]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    fields = {f.name for f in dataclasses.fields(VarSettings)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ConfigError(f"unknown VAR setting(s) {unknown}; known: {sorted(fields)}.")
    if "sink_dims" in given and merged.get("sink_dims") is not None and calibration:
        user, cal_dims = parse_sink_dims(given["sink_dims"]), tuple(int(d) for d in merged["sink_dims"])
        if user != cal_dims:
            logging.getLogger(__name__).warning(
                "--sink-dims %s differs from the calibration's %s; using %s", list(user), list(cal_dims), list(user)
            )
    if convention == "paper" and ("p" in given or "rho" in given):
        paper = from_paper_convention(p=given.get("p", 0.4), rho=given.get("rho", 0.5))
        for key in ("p", "rho"):
            if key in given:
                given[key] = paper[key]
    if given.get("exclude_last_layer") is False:
        given.pop("exclude_last_layer")
    merged.update(given)
    if "sink_dims" not in merged:
        raise ConfigError(
            "no sink dims known for this model: expected --sink-dims a,b, a preset that defines "
            "them, or a calibration.json (run `var-export calibrate`)."
        )
    merged["sink_dims"] = parse_sink_dims(merged["sink_dims"])
    merged["exclude_last_layer"] = bool(merged.get("exclude_last_layer", False))
    return VarSettings(**{k: v for k, v in merged.items() if k in fields})
