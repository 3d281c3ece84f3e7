"""torch.onnx (dynamo) export of a LLaVA-family HF model into the three graphs of DESIGN.md §3.

    vision_encoder.onnx         pixel_values [B,3,H,W]            -> image_features [B,N,D]
    embed_tokens.onnx           input_ids [B,S] int64              -> inputs_embeds [B,S,D]
    decoder_model_merged.onnx   inputs_embeds [B,S,D], attention_mask [B,T] int64,
                                position_ids [B,S] int64, past_key_values.{i}.key|value [B,KV,P,hd]
                                -> logits [B,S,V], present.{i}.key|value [B,KV,T,hd]

T = P + S; one decoder graph serves prefill (P = 0) and decode. The decoder is exported with
EAGER attention so each layer keeps ``MatMul(Q, K^T) -> Add(mask) -> Softmax -> MatMul(., V)``:
the VAR passes (``passes/``) rewrite the Softmax output. ``fused=True`` exports SDPA attention
at opset 23 instead: one ONNX ``Attention`` node per layer (with ``RotaryEmbedding`` and
``RMSNormalization``), the fastest graph without VAR and the input of the fused VAR formulation
(``passes/fused_var.py``); same wrapper, IO names and dynamic axes.

The caller builds ``inputs_embeds`` by scattering ``image_features`` into the image-token
positions (:func:`embed_and_merge` in torch, :func:`merge_image_features` in numpy).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
from var_export.core.errors import ConfigError, ExportError

if TYPE_CHECKING:  # torch is imported lazily: `import var_export.export` stays cheap
    import torch
    from torch import nn

log = logging.getLogger(__name__)


DTYPES: tuple[str, ...] = ("fp32", "fp16")
DEFAULT_OPSET = 18
FUSED_OPSET = 23  # fused=True: first opset with Attention / RotaryEmbedding / RMSNormalization
# Above this many bytes of weights in one graph, weights go to an external data file
# (protobuf caps a single .onnx file at 2 GiB).
EXTERNAL_DATA_THRESHOLD_BYTES = 1_500_000_000

# Names of the symbolic axes in the exported graphs.
AXIS_BATCH = "batch"
AXIS_SEQUENCE = "sequence"
AXIS_PAST = "past_sequence"
AXIS_TOTAL = "total_sequence"

# progress(event, done, total): called before ("vision_encoder.onnx", i, 3) and after
# ("vision_encoder.onnx", i + 1, 3) each graph.
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass
class GraphIO:
    inputs: list[str]
    outputs: list[str]


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_graphs` wrote."""

    out_dir: Path
    paths: dict[str, Path]  # graph file name -> path of the .onnx file
    data_files: dict[str, list[Path]]  # graph file name -> its external data files ([] if none)
    io: dict[str, GraphIO]  # graph file name -> input / output names
    seconds: dict[str, float]  # graph file name -> export wall time
    dtype: str
    opset: int
    num_layers: int

    @property
    def decoder(self) -> Path:
        return self.paths[DECODER]

    @property
    def vision_encoder(self) -> Path:
        return self.paths[VISION_ENCODER]

    @property
    def embed_tokens(self) -> Path:
        return self.paths[EMBED_TOKENS]

    def all_files(self) -> list[Path]:
        """Every file written: graphs and external data files."""
        out: list[Path] = []
        for name, path in self.paths.items():
            out.append(path)
            out.extend(self.data_files.get(name, []))
        return out


# ---------------------------------------------------------------------------------------------
# IO names


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names of the plain decoder graph (DESIGN.md §3), in graph order."""
    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    return inputs, outputs


VISION_IO = GraphIO(inputs=["pixel_values"], outputs=["image_features"])
EMBED_IO = GraphIO(inputs=["input_ids"], outputs=["inputs_embeds"])


# ---------------------------------------------------------------------------------------------
# Model access: the parts of a LLaVA-family model the graphs need


def _parts(model: Any) -> Any:
    """The family's :class:`~var_export.families.base.DecoderParts` of ``model``."""
    from var_export.families import family_of

    return family_of(model).parts(model)


def vision_io(model: Any) -> GraphIO:
    """Input / output names of ``vision_encoder.onnx`` for ``model``'s family."""
    from var_export.families import family_of

    fam = family_of(model)
    return GraphIO(inputs=list(fam.vision_inputs), outputs=list(fam.vision_outputs))


def num_decoder_layers(model: Any) -> int:
    return int(_parts(model).text_config.num_hidden_layers)


def _torch_dtype(dtype: str) -> torch.dtype:
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {DTYPES}, found {dtype!r}.")
    return {"fp32": torch.float32, "fp16": torch.float16}[dtype]


# ---------------------------------------------------------------------------------------------
# The wrapped modules that are exported


def _make_modules() -> tuple[type, type]:
    """The export wrappers; defined lazily so that importing this module does not import torch."""
    from torch import nn
    from transformers import DynamicCache

    class EmbedTokens(nn.Module):
        def __init__(self, parts: Any) -> None:
            super().__init__()
            self.embed_tokens = parts.embed_tokens

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.embed_tokens(input_ids)  # (B, S, D)

    class Decoder(nn.Module):
        """Language model + lm_head over a flat KV cache (transformers 5 DynamicCache inside)."""

        def __init__(self, parts: Any) -> None:
            super().__init__()
            self.language_model = parts.language_model
            self.lm_head = parts.lm_head
            self.text_config = parts.text_config
            self.num_layers = int(parts.text_config.num_hidden_layers)

        def forward(
            self,
            inputs_embeds: torch.Tensor,  # (B, S, D)
            attention_mask: torch.Tensor,  # (B, T) int64, T = P + S
            position_ids: torch.Tensor,  # (B, S) int64, or (3, B, S) for M-RoPE (Qwen-VL)
            past_key_values: tuple[torch.Tensor, ...],  # 2L x (B, KV, P, hd): k0, v0, k1, ...
        ) -> tuple[torch.Tensor, ...]:
            layers = [
                (past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)
            ]
            cache = DynamicCache(ddp_cache_data=layers, config=self.text_config)
            out = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            logits = self.lm_head(out.last_hidden_state)  # (B, S, V)
            present: list[torch.Tensor] = []
            for layer in out.cache.layers:
                present += [layer.keys, layer.values]  # (B, KV, T, hd) each
            return (logits, *present)

    return EmbedTokens, Decoder


# ---------------------------------------------------------------------------------------------
# Export helpers


@contextlib.contextmanager
def _attention(model: Any, implementation: str) -> Iterator[None]:
    """Force ``implementation`` ("eager": MatMul -> Softmax -> MatMul in the graph; "sdpa":
    torch exports it to the ONNX ``Attention`` op at opset 23) in the language model."""
    candidates = [model.config, model.config.get_text_config(decoder=True)]
    candidates += [getattr(mod, "config", None) for mod in _parts(model).language_model.modules()]
    configs: list[tuple[Any, Any]] = []
    for cfg in candidates:
        if cfg is None or not hasattr(cfg, "_attn_implementation"):
            continue
        if all(cfg is not c for c, _ in configs):  # identity: configs compare equal by value
            configs.append((cfg, cfg._attn_implementation))
    try:
        for cfg, _ in configs:
            cfg._attn_implementation = implementation
        yield
    finally:
        for cfg, old in configs:
            cfg._attn_implementation = old


def _param_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    import torch

    seen: set[int] = set()
    total = 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * (itemsize if t.is_floating_point() else t.element_size())
    return total


def _rename_axes(model_ir: Any, renames: dict[str, str]) -> None:
    """Rename symbolic dims (``s53``, ``past_sequence + sequence``) everywhere in an onnx-ir model."""
    import onnx_ir as ir

    def fix(value: Any) -> None:
        shape = value.shape
        if shape is None:
            return
        dims = list(shape.dims)
        changed = False
        for k, d in enumerate(dims):
            if isinstance(d, ir.SymbolicDim) and d.value in renames:
                dims[k] = renames[d.value]
                changed = True
        if changed:
            value.shape = ir.Shape(dims)

    graph = model_ir.graph
    for v in list(graph.inputs) + list(graph.outputs):
        fix(v)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            fix(v)


def _softmax_in_dtype(self: Any, dim: int, dtype: int = -1) -> Any:
    """``aten.softmax(x, dim, dtype)`` as ``Softmax(Cast(x, dtype))``.

    torchlib translates it as ``Cast(Softmax(x), dtype)`` (softmax in the input precision), and
    the optimizer then drops the Cast pair, so an fp16 export would compute the softmax in fp16.
    HF eager attention asks for an fp32 softmax; with this translation an fp16 decoder keeps
    ``Cast(fp32) -> Softmax -> Cast(fp16) -> MatMul`` (an fp32 export keeps ``Softmax -> MatMul``:
    the identity Cast is folded away).
    """
    from onnxscript import opset18 as op

    if dtype != -1:
        self = op.Cast(self, to=dtype)
    return op.Softmax(self, axis=dim)


@contextlib.contextmanager
def _quiet_onnx_ir() -> Iterator[None]:
    """onnx-ir's optimizer logs every deduplicated initializer at INFO; keep progress readable."""
    logger = logging.getLogger("onnx_ir")
    old = logger.level
    logger.setLevel(max(old, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(old)


def _sym(value: Any, axis: int) -> str | None:
    import onnx_ir as ir

    d = value.shape.dims[axis] if value.shape is not None else None
    return d.value if isinstance(d, ir.SymbolicDim) else None


def _export(
    module: nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_shapes: tuple[Any, ...],
    opset: int,
    external_data: bool,
    fix_axes: Callable[[Any], dict[str, str]] | None = None,
) -> tuple[list[Path], float]:
    """Export one wrapper module to ``path``; returns (external data files, seconds)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info("exporting %s (opset %d%s)", name, opset, ", external data" if external_data else "")
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_onnx_ir():
            warnings.simplefilter("ignore")  # torch.export chatter (torchvision ops, deprecations)
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=True,
                verbose=False,
                custom_translation_table={torch.ops.aten.softmax.int: _softmax_in_dtype},
            )
    except Exception as exc:  # torch.onnx raises many kinds; keep the cause chained
        raise ExportError(
            f"torch.onnx (dynamo) could not export {name}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Expected a transformers-5 LLaVA model "
            "with eager attention; see the chained traceback (-v) for the failing op."
        ) from exc
    model_ir = program.model
    got_in = [v.name for v in model_ir.graph.inputs]
    got_out = [v.name for v in model_ir.graph.outputs]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(
            f"{name}: expected inputs {list(input_names)} and outputs {list(output_names)}, found "
            f"{got_in} and {got_out}. This is a bug in var_export.export; please report it."
        )
    if fix_axes is not None:
        _rename_axes(model_ir, fix_axes(model_ir))
    model_ir.producer_name = "var-export"
    for old in path.parent.glob(path.name + ".data"):
        old.unlink()
    program.save(path, external_data=external_data)
    data_files = sorted(p for p in path.parent.glob(path.name + ".data") if p.exists())
    seconds = time.perf_counter() - t0
    log.info("exported %s in %.1f s", name, seconds)
    return data_files, seconds


def _resolve_external(external_data: bool | None, module: nn.Module, dtype: torch.dtype) -> bool:
    if external_data is not None:
        return bool(external_data)
    return _param_bytes(module, dtype) > EXTERNAL_DATA_THRESHOLD_BYTES


@contextlib.contextmanager
def _in_dtype(model: Any, dtype: str) -> Iterator[Any]:
    """The model in the export dtype: itself when it already is, else a converted copy."""

    tdtype = _torch_dtype(dtype)
    current = next(model.parameters()).dtype
    if current == tdtype:
        yield model
        return
    log.info(
        "converting a copy of the model from %s to %s for export (load it in %s to avoid the copy)",
        current,
        tdtype,
        dtype,
    )
    converted = copy.deepcopy(model).to(tdtype)
    try:
        yield converted
    finally:
        del converted


# ---------------------------------------------------------------------------------------------
# Public: the three graphs


def export_vision_encoder(
    model: Any,
    path: Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> tuple[list[Path], float]:
    """Export ``vision_encoder.onnx`` as the model's family defines it (var_export.families):
    LLaVA pixel_values [B,3,H,W] -> image_features [B,N,D] (H, W static, B dynamic); Qwen-VL
    pixel_values [N_patches, C*T*P*P] + image_grid_thw [n_images, 3] -> image_features [N/4, D].
    Returns (external data files, seconds).
    """
    from var_export.families import family_of

    with _in_dtype(model, dtype) as m:
        spec = family_of(m).vision_export(m, _torch_dtype(dtype))
        return _export(
            spec.module,
            spec.args,
            Path(path),
            name=VISION_ENCODER,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            opset=opset,
            external_data=_resolve_external(external_data, spec.module, _torch_dtype(dtype)),
        )


def export_embed_tokens(
    model: Any,
    path: Path,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> tuple[list[Path], float]:
    """Export ``embed_tokens.onnx``: input_ids [B,S] int64 -> inputs_embeds [B,S,D]."""
    import torch
    from torch.export import Dim

    EmbedTokens, _ = _make_modules()
    with _in_dtype(model, dtype) as m:
        parts = _parts(m)
        module = EmbedTokens(parts).eval()
        vocab = int(parts.text_config.vocab_size)
        input_ids = torch.randint(0, vocab, (2, 5), dtype=torch.int64)
        return _export(
            module,
            (input_ids,),
            Path(path),
            name=EMBED_TOKENS,
            input_names=EMBED_IO.inputs,
            output_names=EMBED_IO.outputs,
            dynamic_shapes=({0: Dim(AXIS_BATCH), 1: Dim(AXIS_SEQUENCE)},),
            opset=opset,
            external_data=_resolve_external(external_data, module, _torch_dtype(dtype)),
        )


def resolve_opset(opset: int | None, *, fused: bool = False) -> int:
    """The opset to export at: ``opset``, else 23 (fused) or 18; fused needs >= 23."""
    if opset is None:
        return FUSED_OPSET if fused else DEFAULT_OPSET
    if fused and int(opset) < FUSED_OPSET:
        raise ConfigError(
            f"the fused export needs opset >= {FUSED_OPSET} (ONNX Attention op), found {opset}. "
            "Export without fused=True (eager attention) for older opsets."
        )
    return int(opset)


def export_decoder(
    model: Any,
    path: Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    external_data: bool | None = None,
    fused: bool = False,
) -> tuple[list[Path], float]:
    """Export ``decoder_model_merged.onnx`` (language model + lm_head, KV cache in and out).

    Eager attention is forced during the export (restored afterwards); ``fused=True`` forces
    SDPA instead (ONNX ``Attention`` ops; opset default 23 instead of 18). Dynamic axes: batch,
    sequence, past_sequence, total_sequence (= past_sequence + sequence). Returns
    (external data files, seconds).
    """
    opset = resolve_opset(opset, fused=fused)
    _, Decoder = _make_modules()
    tdtype = _torch_dtype(dtype)
    with _in_dtype(model, dtype) as m, _attention(m, "sdpa" if fused else "eager"):
        parts = _parts(m)
        module = Decoder(parts).eval()
        num_layers = int(parts.text_config.num_hidden_layers)
        example, dynamic_shapes = _decoder_example(parts.text_config, tdtype, m)
        in_names, out_names = decoder_io_names(num_layers)
        return _export(
            module,
            example,
            Path(path),
            name=DECODER,
            input_names=in_names,
            output_names=out_names,
            dynamic_shapes=dynamic_shapes,
            opset=opset,
            external_data=_resolve_external(external_data, module, tdtype),
            fix_axes=_total_axis_fixer(num_layers),
        )


def _decoder_example(tc: Any, tdtype: Any, model: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Example decoder inputs and their dynamic shapes for torch.export.

    Shapes are all distinct and > 1 so that torch.export specialises nothing. Position ids are
    (B, S), or (3, B, S) for M-RoPE families.
    """
    import torch
    from torch.export import Dim

    from var_export.families import family_of

    family = family_of(model)

    num_layers = int(tc.num_hidden_layers)
    hidden = int(tc.hidden_size)
    kv_heads = int(getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads)
    head_dim = int(getattr(tc, "head_dim", None) or hidden // tc.num_attention_heads)
    batch, seq, past = 2, 3, 4
    inputs_embeds = torch.randn(batch, seq, hidden, dtype=tdtype)  # (B, S, D)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.int64)  # (B, P + S)
    position_ids = family.example_position_ids(batch, seq, past)  # (B, S) or (3, B, S)
    past_kv = tuple(
        torch.randn(batch, kv_heads, past, head_dim, dtype=tdtype)  # (B, KV, P, hd)
        for _ in range(2 * num_layers)
    )
    b, s, p = Dim(AXIS_BATCH), Dim(AXIS_SEQUENCE), Dim(AXIS_PAST)
    dynamic_shapes = (
        {0: b, 1: s},
        {0: b, 1: Dim.AUTO},  # T = P + S, derived by torch.export
        {1: b, 2: s} if family.mrope else {0: b, 1: s},
        tuple({0: b, 2: p} for _ in range(2 * num_layers)),
    )
    return (inputs_embeds, attention_mask, position_ids.clone(), past_kv), dynamic_shapes


def _total_axis_fixer(num_layers: int) -> Callable[[Any], dict[str, str]]:
    """Names the derived T axis of ``attention_mask`` and ``present.*`` ``total_sequence``."""

    def fix_axes(model_ir: Any) -> dict[str, str]:
        renames: dict[str, str] = {}
        mask_t = _sym(model_ir.graph.inputs[1], 1)
        if mask_t is not None:
            renames[mask_t] = AXIS_TOTAL
        if num_layers:
            present_t = _sym(model_ir.graph.outputs[1], 2)
            if present_t is not None:
                renames[present_t] = AXIS_TOTAL
        return renames

    return fix_axes


def _checked_opset(opset: int | None, fused: bool) -> int:
    """The opset to export with (default by formulation), within the exporter's 7..23."""
    opset = resolve_opset(opset, fused=fused)
    if not 7 <= opset <= 23:
        raise ConfigError(
            f"--opset must be between 7 and 23 (default {DEFAULT_OPSET}), found {opset}."
        )
    return opset


def _graph_jobs(
    model: Any, num_layers: int, fused: bool
) -> list[tuple[str, Callable[..., tuple[list[Path], float]], GraphIO]]:
    """(file name, exporter, I/O names) of the three graphs, in export order."""
    return [
        (VISION_ENCODER, export_vision_encoder, vision_io(model)),
        (EMBED_TOKENS, export_embed_tokens, EMBED_IO),
        (DECODER, functools.partial(export_decoder, fused=fused), GraphIO(*decoder_io_names(num_layers))),
    ]


def export_graphs(
    model: Any,
    out_dir: Path,
    *,
    dtype: str = "fp32",
    opset: int | None = None,
    external_data: bool | None = None,
    progress: ProgressFn | None = None,
    fused: bool = False,
) -> ExportResult:
    """Export the three graphs of DESIGN.md §3 into ``out_dir`` (created if needed).

    ``opset``: default 18, or 23 with ``fused`` (the decoder with SDPA attention, ONNX
    ``Attention`` ops: the input of ``passes.fused_var``, not of ``passes.pipeline.apply_var``).

    ``dtype``: "fp32" (default) or "fp16" (weights and activations; the decoder computes the
    softmax in fp32 and casts its output to fp16 before the MatMul with V, as HF eager does).
    ``external_data``: None = automatic (weights of a graph > ~1.5 GB go to ``<graph>.onnx.data``),
    True/False forces it.
    """
    _torch_dtype(dtype)  # validate before any work
    opset = _checked_opset(opset, fused)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_layers = num_decoder_layers(model)
    with _in_dtype(model, dtype) as m:  # convert once, not once per graph
        jobs = _graph_jobs(model, num_layers, fused)
        result = ExportResult(
            out_dir=out_dir,
            paths={},
            data_files={},
            io={},
            seconds={},
            dtype=dtype,
            opset=int(opset),
            num_layers=num_layers,
        )
        for i, (name, fn, io) in enumerate(jobs):
            if progress is not None:
                progress(name, i, len(jobs))
            path = out_dir / name
            data, seconds = fn(m, path, dtype=dtype, opset=opset, external_data=external_data)
            result.paths[name] = path
            result.data_files[name] = data
            result.io[name] = io
            result.seconds[name] = seconds
            if progress is not None:
                progress(name, i + 1, len(jobs))
    log.info(
        "exported %d graphs to %s in %.1f s",
        len(jobs),
        out_dir,
        sum(result.seconds.values()),
    )
    return result


# ---------------------------------------------------------------------------------------------
# Building inputs_embeds (shared by every parity test and the runtime)


def embed_and_merge(
    model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, **vision_inputs: torch.Tensor
) -> torch.Tensor:
    """``inputs_embeds`` (B, S, D) exactly as the HF model builds it: token embeddings with the
    image features scattered (row-major, ``masked_scatter``) into the positions where
    ``input_ids == config.image_token_id``. ``vision_inputs``: e.g. ``image_sizes`` (LLaVA-NeXT)."""
    import torch

    from var_export.calibration.reference import multimodal_embeds

    with torch.no_grad():
        return multimodal_embeds(model, input_ids, pixel_values, **vision_inputs)


def merge_image_features(
    inputs_embeds: np.ndarray,
    image_features: np.ndarray,
    input_ids: np.ndarray,
    image_token_id: int,
) -> np.ndarray:
    """Numpy twin of :func:`embed_and_merge` for the ONNX Runtime path.

    inputs_embeds (B, S, D), image_features (I, N, D) (or (I*N, D)), input_ids (B, S). Image
    feature rows fill the image-token positions in row-major order (sample by sample), as
    torch ``masked_scatter`` does. Returns a new array.
    """
    mask = np.asarray(input_ids) == image_token_id  # (B, S)
    d = inputs_embeds.shape[-1]
    rows = np.asarray(image_features).reshape(-1, d)  # (I*N, D)
    n_tokens = int(mask.sum())
    if n_tokens != rows.shape[0]:
        raise ConfigError(
            f"the prompt has {n_tokens} image tokens but the images give {rows.shape[0]} feature "
            "rows; expected them equal. Build the prompt with the model's processor."
        )
    out = np.array(inputs_embeds, copy=True)
    out[mask] = rows.astype(out.dtype, copy=False)
    return out
