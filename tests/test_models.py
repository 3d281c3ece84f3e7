"""Resolving and loading --model: presets, hub ids (offline fast-fail, cache hit), local dirs, errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from var_export.calibration import tiny_llava as tl
from var_export.core.errors import ModelLoadError, UnsafeInputError, VarExportError
from var_export.models import (
    LoadedModel,
    ModelSpec,
    load_llava,
    model_fingerprint,
    resolve_model,
    text_config_dims,
)


@pytest.fixture(scope="module")
def tiny_llava_path() -> Path:
    return tl.tiny_llava_dir()


@pytest.fixture
def copy_of(tmp_path, tiny_llava_path):
    def make(name: str = "m") -> Path:
        dst = tmp_path / name
        shutil.copytree(tiny_llava_path, dst)
        return dst

    return make


def test_resolve_default_is_embedded_tiny_llava(tiny_llava_path):
    spec = resolve_model(None)
    assert spec.kind == "preset" and spec.name == "tiny-llava"
    assert spec.path == tiny_llava_path and (spec.path / "config.json").is_file()
    assert spec.sink_dims == list(tl.TINY_SINK_DIMS)
    assert spec.verified is True


def test_resolve_presets_hub_and_local(tmp_path):
    llava = resolve_model("llava")
    assert (llava.kind, llava.hf_id) == ("hub", "llava-hf/llava-1.5-7b-hf")
    assert llava.sink_dims == [1415, 2533]
    by_id = resolve_model("llava-hf/llava-1.5-13b-hf")
    assert by_id.kind == "hub" and by_id.preset is not None and by_id.preset["name"] == "llava-13b"
    other = resolve_model("someone/some-model")
    assert other.kind == "hub" and other.preset is None and other.verified is False
    local = resolve_model(str(tmp_path))
    assert local.kind == "local" and local.path == tmp_path.resolve()


@pytest.mark.parametrize("bad", ["no-such-preset", "./does/not/exist", "/nonexistent/dir/x"])
def test_resolve_unknown(bad):
    with pytest.raises(ModelLoadError) as e:
        resolve_model(bad)
    assert bad in str(e.value)


def test_resolve_file_is_not_a_model(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model(str(f))


def test_load_tiny_and_fingerprint(tiny_llava_path):
    loaded = load_llava(None)
    assert isinstance(loaded, LoadedModel)
    assert not loaded.model.training
    assert loaded.model.config._attn_implementation == "eager"
    assert text_config_dims(loaded.config) == (
        tl.NUM_LAYERS, tl.NUM_HEADS, tl.NUM_KV_HEADS, tl.HEAD_DIM, tl.HIDDEN_SIZE
    )
    fp = model_fingerprint(loaded.config)
    # independent: hash of the text config json as written on disk, same exclusions
    text = json.loads((tiny_llava_path / "config.json").read_text())["text_config"]
    assert fp["hidden_size"] == text["hidden_size"] and fp["vocab_size"] == text["vocab_size"]
    assert fp["num_kv_heads"] == text["num_key_value_heads"]
    assert len(fp["config_sha256"]) == 64 and int(fp["config_sha256"], 16) >= 0
    # dtype does not change the fingerprint; a different text config does
    half = load_llava(None, dtype="fp16")
    assert next(half.model.parameters()).dtype == torch.float16
    assert model_fingerprint(half.config) == fp
    cfg2 = type(loaded.config).from_dict(loaded.config.to_dict())
    cfg2.text_config.rms_norm_eps = 1e-5
    assert model_fingerprint(cfg2)["config_sha256"] != fp["config_sha256"]
    # the canonical text is stable: recompute from the dict by hand
    d = {k: v for k, v in loaded.config.text_config.to_dict().items()
         if not k.startswith("_") and k not in ("transformers_version", "_name_or_path", "dtype",
                                                 "torch_dtype", "architectures", "use_cache")}
    expect = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode())
    assert fp["config_sha256"] == expect.hexdigest()


def test_load_local_copy(copy_of):
    d = copy_of()
    loaded = load_llava(str(d))
    assert loaded.spec.kind == "local" and loaded.path == d.resolve()
    ref = load_llava(None)
    a = dict(loaded.model.named_parameters())
    assert all(torch.equal(p, a[n]) for n, p in ref.model.named_parameters())


def test_missing_config(copy_of):
    d = copy_of()
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_llava(str(d))


def test_corrupt_config(copy_of):
    d = copy_of()
    (d / "config.json").write_text('{"model_type": "llava", ')
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_llava(str(d))


def test_corrupt_weights(copy_of):
    d = copy_of()
    w = next(d.glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: 4096])  # truncated download
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_llava(str(d))


def test_not_llava(copy_of):
    d = copy_of()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    cfg["architectures"] = ["BertModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="not a supported model"):
        load_llava(str(d))


def test_pickle_refused_unless_allowed(copy_of):
    d = copy_of()
    w = next(d.glob("*.safetensors"))
    from safetensors.torch import load_file

    torch.save(load_file(w), d / "pytorch_model.bin")
    w.unlink()
    with pytest.raises(UnsafeInputError, match="allow-pickle"):
        load_llava(str(d))
    assert issubclass(UnsafeInputError, VarExportError)
    loaded = load_llava(str(d), allow_pickle=True)
    ref = load_llava(None)
    assert torch.equal(
        loaded.model.lm_head.weight, ref.model.lm_head.weight
    )


def test_no_weights(copy_of):
    d = copy_of()
    next(d.glob("*.safetensors")).unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_llava(str(d))


def test_hub_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_llava("llava")
    msg = str(e.value)
    assert "llava-hf/llava-1.5-7b-hf" in msg and "hf download" in msg and "--model DIR" in msg


def test_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # 10.255.255.1 is not routed (a black hole: connect hangs until the probe timeout);
    # port 9 on localhost refuses at once. Both must fail in seconds.
    for endpoint in ("http://10.255.255.1", "http://127.0.0.1:9"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with pytest.raises(ModelLoadError, match="unreachable"):
            load_llava("someone/some-model")


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tiny_llava_path):
    """A hub id already in the HF cache loads offline (cache layout built by hand)."""
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_llava_path, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_llava("someone/tiny")
    assert loaded.spec.kind == "hub" and loaded.path == repo / "snapshots" / commit


def test_spec_is_a_plain_dataclass():
    spec = ModelSpec(kind="hub", name="x/y", hf_id="x/y")
    assert spec.model_id == "x/y" and spec.sink_dims is None


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_llava(None, dtype="int3")
