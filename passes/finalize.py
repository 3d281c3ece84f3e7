"""Finalize: shape inference, onnx.checker, VAR metadata and the re-application marker."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator

import onnx_ir as ir
from onnx_ir.passes.common import CheckerPass, ShapeInferencePass

from var_export.core.errors import AlreadyAppliedError, GraphPatternError
from var_export.core.settings import VarSettings
from var_export.passes import _ir

__all__ = ["FinalizePass", "check_not_applied"]

logger = logging.getLogger(__name__)

MARKER_VERSION = "1"


def check_not_applied(model: ir.Model) -> None:
    """Raise AlreadyAppliedError if VAR (or part of it) is already in ``model``."""
    props = model.metadata_props
    if _ir.APPLIED_KEY in props:
        raise AlreadyAppliedError(
            f"VAR is already baked into this graph (metadata {_ir.APPLIED_KEY}={props[_ir.APPLIED_KEY]!r}, "
            f"settings {props.get(_ir.SETTINGS_KEY, '?')}). Expected a graph without VAR: "
            "rewrite the original export (or `var-export export --no-var`), not a VAR bundle."
        )
    if _ir.graph_output(model.graph, _ir.PRESENT_SINK_MASK) is not None:
        raise AlreadyAppliedError(
            f"the graph already has the VAR output {_ir.PRESENT_SINK_MASK!r} (a partial VAR "
            "rewrite without the marker). Start again from the graph without VAR."
        )


class FinalizePass(ir.passes.InPlacePass):
    """Write metadata + marker, then shape inference and onnx.checker."""

    def __init__(
        self,
        settings: VarSettings,
        var_layers: Iterable[int],
        heads: Iterable[tuple[int, int]] | None = None,
        *,
        shape_inference: bool = True,
        check: bool = True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.var_layers = [int(x) for x in var_layers]
        self.heads = None if heads is None else sorted({(int(a), int(b)) for a, b in heads})
        self.shape_inference = shape_inference
        self.check = check

    def requires(self, model: ir.Model) -> None:
        if _ir.APPLIED_KEY in model.metadata_props:
            check_not_applied(model)
        if _ir.graph_output(model.graph, _ir.PRESENT_SINK_MASK) is None:
            raise GraphPatternError(
                f"output {_ir.PRESENT_SINK_MASK!r} missing: FinalizePass runs after the VAR passes."
            )

    def ensures(self, model: ir.Model) -> None:
        assert model.metadata_props.get(_ir.APPLIED_KEY) == MARKER_VERSION

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        props = model.metadata_props
        props[_ir.SETTINGS_KEY] = json.dumps(self.settings.to_dict(), sort_keys=True)
        props[_ir.LAYERS_KEY] = json.dumps(self.var_layers)
        if self.heads is not None and self.settings.heads != "dynamic":
            props[_ir.HEADS_KEY] = json.dumps([list(h) for h in self.heads])
        props[_ir.APPLIED_KEY] = MARKER_VERSION
        model.graph.sort()
        if self.shape_inference:
            ShapeInferencePass(strict_mode=False)(model)
        if self.check:
            with _external_data_hidden(model):
                CheckerPass()(model)
        return ir.passes.PassResult(model, modified=True)


@contextlib.contextmanager
def _external_data_hidden(model: ir.Model) -> Iterator[None]:
    """Initializers stored in external data are handed to onnx.checker as plain inputs (their
    type and shape, no data), then restored. onnx_ir's CheckerPass keeps initializers up to 1 KB
    in the proto it checks; an external one of them would be resolved against the working
    directory (an in-memory proto has no model folder) and fail as "not regular file", although
    the file is beside the model (graphs saved with every tensor external, size_threshold=0).
    The checker never reads weights either way."""
    hidden = {}
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            hidden[value] = value.const_value
            value.shape = value.shape or value.const_value.shape
            value.dtype = value.dtype or value.const_value.dtype
            value.const_value = None
    try:
        yield
    finally:
        for value, tensor in hidden.items():
            value.const_value = tensor
