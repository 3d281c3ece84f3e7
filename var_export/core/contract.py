"""The ONNX contract of a bundle (DESIGN.md §3), written once.

Every file name, graph input/output name and naming prefix that two modules must agree on
lives here; the rest of the project imports it from this module.
"""

from __future__ import annotations

# Bundle files -----------------------------------------------------------------------------
VISION_ENCODER = "vision_encoder.onnx"  # pixel_values [B,3,H,W] -> image_features [B,N,D]
EMBED_TOKENS = "embed_tokens.onnx"  # input_ids [B,S] int64 -> inputs_embeds [B,S,D]
DECODER = "decoder_model_merged.onnx"  # the language model + lm_head, KV and sink caches
GRAPH_FILES: tuple[str, ...] = (VISION_ENCODER, EMBED_TOKENS, DECODER)
MANIFEST = "manifest.json"  # the bundle's manifest (schema version, io names, sha256)
CALIBRATION = "calibration.json"  # the calibration the bundle was built from
OWNED_MARKER = ".var-export-owned"  # lists the files var-export wrote in a folder (var_export.outputs)
STAGE_PREFIX = ".var-export-tmp-"  # temporary siblings of outputs being written (pid-stamped)

# Graph I/O names --------------------------------------------------------------------------
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
ATTENTION_MASK = "attention_mask"  # [B, T] int64
POSITION_IDS = "position_ids"  # [B, S] int64
LOGITS = "logits"  # [B, S, V]
PAST_KEY_FMT = "past_key_values.{i}.key"  # [B, KV, P, hd]
PAST_VALUE_FMT = "past_key_values.{i}.value"
PRESENT_KEY_FMT = "present.{i}.key"  # [B, KV, T, hd]
PRESENT_VALUE_FMT = "present.{i}.value"
VISUAL_MASK = "visual_token_mask"  # VAR decoder input [B, T] bool
PAST_SINK_MASK = "past_sink_mask"  # VAR decoder input [B, Lv, P] bool
PRESENT_SINK_MASK = "present_sink_mask"  # VAR decoder output [B, Lv, T] bool
VAR_INPUTS: tuple[str, ...] = (VISUAL_MASK, PAST_SINK_MASK)
VAR_OUTPUTS: tuple[str, ...] = (PRESENT_SINK_MASK,)

# Naming inside VAR graphs -----------------------------------------------------------------
VAR_PREFIX = "var/"  # every value and node the passes add is named var/...
APPLIED_KEY = "var_export.applied"  # metadata_props marker: VAR is baked in (re-applying fails)

# The kernel formulation's custom op (var_export/kernels/var_attention.cc) ------------------
KERNEL_DOMAIN = "var_export"  # ONNX domain of VarAttention
KERNEL_OP = "VarAttention"  # attention + VAR in one ONNX Runtime CPU kernel
KERNEL_OPSET = 1
