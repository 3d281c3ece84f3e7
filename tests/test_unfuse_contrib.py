"""passes/unfuse_contrib.py on the genai and ORT-optimizer fixtures, without VAR: the unfused
graph computes what the fused one does (prefill + decode), and restore() puts the fused ops back."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tests.fixtures.foreign import tiny_llama as tl
from tests.fixtures.foreign.make_fixtures import GRAPHS
from var_export.core.errors import GraphPatternError
from var_export.passes.locate import locate_layers
from var_export.passes.unfuse_contrib import contrib_attention_layers, normalize_contrib, restore

LAYERS = tl.CONFIG["num_hidden_layers"]


def _session(model: ir.Model) -> ort.InferenceSession:
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])


def _generate(sess: ort.InferenceSession, ids: np.ndarray, steps: int = 3) -> list[np.ndarray]:
    """Greedy prefill + ``steps`` decode steps; unpadded rows (feeds by the graph's input names)."""
    have = {i.name for i in sess.get_inputs()}
    names = [o.name for o in sess.get_outputs()]
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64), "position_ids": np.arange(s)[None].repeat(b, 0)}
    feeds.update({f"past_key_values.{i}.{k}": np.zeros((b, 2, 0, tl.HEAD_DIM), np.float32)
                  for i in range(LAYERS) for k in ("key", "value")})
    logits = []
    for _ in range(steps + 1):
        out = dict(zip(names, sess.run(None, {k: v for k, v in feeds.items() if k in have})))
        logits.append(out["logits"])
        t = feeds["attention_mask"].shape[1]
        feeds = {"input_ids": out["logits"][:, -1].argmax(-1)[:, None], "attention_mask": np.ones((b, t + 1), np.int64),
                 "position_ids": np.full((b, 1), t)}
        feeds.update({f"past_key_values.{i}.{k}": out[f"present.{i}.{k}"] for i in range(LAYERS) for k in ("key", "value")})
    return logits


@pytest.mark.parametrize("graph", ["genai", "ortopt"])
def test_unfused_graph_computes_what_the_fused_one_does(graph):
    ids = np.array([[1, 20, 7, 30, 31, 11, 32, 21], [1, 25, 26, 7, 11, 40, 41, 22]])
    fused = ir.load(str(GRAPHS[graph]))
    unfused = ir.load(str(GRAPHS[graph]))
    replaced = normalize_contrib(unfused, range(LAYERS))
    kinds = sorted({r.op_type for r in replaced})
    assert kinds == (["GroupQueryAttention", "SkipSimplifiedLayerNormalization"] if graph == "genai"
                     else ["SkipSimplifiedLayerNormalization"])
    if graph == "genai":
        assert contrib_attention_layers(unfused) == {}
    assert [m.layer for m in locate_layers(unfused).matches] == list(range(LAYERS))  # locate reads every layer
    a, b = _generate(_session(fused), ids), _generate(_session(unfused), ids)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=2e-5)


def test_restore_puts_the_fused_ops_back_on_the_given_layers():
    model = ir.load(str(GRAPHS["genai"]))
    before = sorted((n.domain, n.op_type) for n in model.graph)
    replaced = normalize_contrib(model, [1, 2])
    assert sorted(contrib_attention_layers(model)) == [0]
    assert restore(model, [r for r in replaced if r.layer == 1]) == 2  # GQA + skip norm of layer 1
    assert sorted(contrib_attention_layers(model)) == [0, 1]
    restore(model, [r for r in replaced if r.layer == 2])
    assert sorted((n.domain, n.op_type) for n in model.graph) == before
    assert not [n for n in model.graph.initializers if n.startswith("unfused/")]
    ids = np.array([[1, 20, 7, 30, 31, 11]])
    for x, y in zip(_generate(_session(ir.load(str(GRAPHS["genai"]))), ids), _generate(_session(model), ids)):
        np.testing.assert_array_equal(x, y)


def test_unsupported_gqa_attributes_are_refused_by_name():
    model = ir.load(str(GRAPHS["genai"]))
    node = contrib_attention_layers(model)[1]
    node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", 16)
    with pytest.raises(GraphPatternError, match="local_window_size"):
        normalize_contrib(model, [1])
