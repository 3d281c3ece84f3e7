"""The TensorRT runtime without a GPU: feeds built and checked from the engine manifest, the
generation loop shared with ONNX Runtime, and a clear error where no GPU is present.

Executing engines needs an NVIDIA GPU; here an engine session is driven through the very code
that runs engines (:class:`EngineSession`) with ONNX Runtime standing in for the CUDA device,
so everything but the device calls is exercised against ORT's own greedy decoding.
"""

from __future__ import annotations

import numpy as np
import pytest

from var_export.core.errors import BundleError, ConfigError, TensorRTUnavailableError
from var_export.trt.runtime import EngineSession, engine_sessions

ENTRY = {
    "io": {
        "inputs": [
            {"name": "input_ids", "shape": [-1, -1], "dtype": "int64"},
            {"name": "past", "shape": [-1, 2, -1, 4], "dtype": "float32"},
            {"name": "mask", "shape": [-1, -1], "dtype": "bool"},
        ],
        "outputs": [{"name": "out", "shape": [-1, -1, 8], "dtype": "float16"}],
    },
    "profiles": [{
        "input_ids": [[1, 1], [1, 1], [2, 16]],
        "past": [[1, 2, 0, 4], [1, 2, 8, 4], [2, 2, 16, 4]],
        "mask": [[1, 1], [1, 9], [2, 32]],
    }],
}


def test_feeds_follow_the_engine_io_and_profile(tmp_path):
    s = EngineSession(tmp_path / "e.plan", ENTRY)
    meta = {m.name: m for m in s.get_inputs()}
    assert meta["past"].shape == ["dyn0", 2, "dyn2", 4] and meta["past"].type == "tensor(float)"
    assert meta["mask"].type == "tensor(bool)" and s.get_outputs()[0].type == "tensor(float16)"
    feeds = s.feeds({
        "input_ids": np.array([[3, 4]], np.int32),  # cast to the engine's int64
        "past": np.zeros((1, 2, 0, 4)),  # float64 -> float32, empty cache allowed
        "mask": np.array([[1, 1]]),
    })
    assert feeds["input_ids"].dtype == np.int64 and feeds["past"].dtype == np.float32
    assert feeds["mask"].dtype == np.bool_ and all(v.flags.c_contiguous for v in feeds.values())
    with pytest.raises(BundleError, match=r"no value for engine input\(s\) \['mask'\]"):
        s.feeds({"input_ids": feeds["input_ids"], "past": feeds["past"]})
    with pytest.raises(ConfigError, match=r"input past has shape \[1, 3, 0, 4\]; the engine expects"):
        s.feeds({**feeds, "past": np.zeros((1, 3, 0, 4), np.float32)})
    with pytest.raises(ConfigError, match=r"input input_ids has shape \[3, 2\], outside the engine's profile"):
        s.feeds({**feeds, "input_ids": np.zeros((3, 2), np.int64)})
    with pytest.raises(TensorRTUnavailableError, match="no GPU"):
        s.run(None, feeds)


def test_no_gpu_is_a_clear_error():
    from var_export.trt.runtime import CudaDevice

    with pytest.raises(TensorRTUnavailableError, match="expected an NVIDIA GPU") as info:
        CudaDevice()
    assert "ahead of time" in str(info.value) and "var-export run BUNDLE" in str(info.value)


class _OrtDevice:
    """Stands in for CudaDevice: 'loads' the engine's ONNX source with ONNX Runtime."""

    def __init__(self, onnx_path):
        self.onnx_path, self.calls = onnx_path, []

    def load(self, flavour, path):
        from var_export.runtime import make_session

        return None, make_session(self.onnx_path)

    def execute(self, context, feeds, outputs, dtypes):
        self.calls.append({k: v.shape for k, v in feeds.items()})
        return context.run(list(outputs), dict(feeds))


@pytest.mark.skipif(not __import__("var_export.trt", fromlist=["x"]).available_flavours(),
                    reason="no TensorRT installed to build the engine manifest")
def test_generation_loop_is_shared_with_onnx_runtime(tiny_llama_var_decoder, tmp_path):
    """Greedy decoding (batch 2, left padding, KV + sink caches) through EngineSession equals
    ORT's, on a VAR decoder whose engine manifest comes from a real TensorRT-RTX build."""
    from var_export import trt
    from var_export.runtime import greedy_decode_numpy, make_session

    decoder = tiny_llama_var_decoder
    config = trt.BuildConfig(flavour="tensorrt-rtx", targets="86", max_batch=2, max_seq=8, max_past=16)
    engines = trt.build_engines(decoder, tmp_path / "e.plan", config)

    device = _OrtDevice(decoder)
    session = engine_sessions(tmp_path / "e.plan", engines.manifest, None)["decoder_model_merged.onnx"]
    session.device, session.flavour = device, object()
    hidden = session.get_inputs()[0].shape[2]
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((2, 6, hidden)).astype(np.float32)
    embeds[:, 2, 1] = 60.0  # a sink in the sink dim
    mask = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int64)
    visual = np.zeros((2, 6), bool)
    visual[:, 2:5] = True
    table = rng.standard_normal((50, hidden)).astype(np.float32)

    def embed(ids):
        return table[ids % 50]

    kw = dict(visual_token_mask=visual)
    want = greedy_decode_numpy(make_session(decoder), embed, embeds, mask, 4, **kw)
    got = greedy_decode_numpy(session, embed, embeds, mask, 4, **kw)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.steps == want.steps == 3
    # prefill with an empty cache, then one token a step against a growing cache
    assert device.calls[0]["past_sink_mask"][2] == 0 and device.calls[-1]["attention_mask"] == (2, 9)
    with pytest.raises(ConfigError, match="outside the engine's profile"):
        greedy_decode_numpy(session, embed, np.zeros((2, 12, hidden), np.float32),
                            np.ones((2, 12), np.int64), 1)

    (tmp_path / "e.plan").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="missing or differs"):
        engine_sessions(tmp_path / "e.plan", engines.manifest, None)
