"""Loading LLaVA-NeXT, LLaVA-OneVision and InternVL: presets (hub ids, sink dims unpublished),
local HF directories (save_pretrained + processor), hub ids from the HF cache, offline errors."""

from __future__ import annotations

import shutil

import pytest

from var_export.configs import load_preset
from var_export.core.errors import ModelLoadError
from var_export.families import family_of
from var_export.models import load_llava, resolve_model

TINY = {  # tiny variant -> (hub preset of the same family, model class name)
    "tiny-llava-next": ("llava-next", "LlavaNextForConditionalGeneration"),
    "tiny-llava-onevision": ("llava-onevision", "LlavaOnevisionForConditionalGeneration"),
    "tiny-internvl": ("internvl", "InternVLForConditionalGeneration"),
}


@pytest.mark.parametrize("preset", ["llava-next", "llava-onevision", "internvl"])
def test_hub_presets_leave_sink_dims_to_calibration(preset):
    data = load_preset(preset)
    assert data["hf_id"] and data["sink_dims"] is None and data["verified"] is False
    assert "calibration discovers" in data["description"]
    spec = resolve_model(preset)
    assert spec.kind == "hub" and spec.hf_id == data["hf_id"] and spec.sink_dims is None
    from var_export.pipeline import BuildOptions, _needs_calibration

    assert _needs_calibration(BuildOptions(out=None, heads="dynamic"), spec.preset)  # type: ignore[arg-type]


@pytest.mark.parametrize("preset", ["llava-next", "llava-onevision", "internvl"])
def test_hub_preset_offline_fails_fast(preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_llava(preset)
    msg = str(e.value)
    assert load_preset(preset)["hf_id"] in msg and "hf download" in msg and "--model DIR" in msg


@pytest.mark.parametrize("variant", list(TINY))
def test_local_dir_and_hub_cache(variant, tmp_path, monkeypatch):
    """The tiny variant's save_pretrained directory loads as --model DIR, and as a hub id (the
    preset's) from a hand-made HF cache, offline; the family, class and processor follow config.json."""
    src = resolve_model(variant).path
    local = tmp_path / "local"
    shutil.copytree(src, local)
    loaded = load_llava(str(local))
    preset, cls = TINY[variant]
    assert loaded.spec.kind == "local" and type(loaded.model).__name__ == cls
    assert family_of(loaded.model).name == family_of(loaded.config).name
    assert loaded.processor.image_token_id == loaded.config.image_token_id

    hf_id = load_preset(preset)["hf_id"]
    repo = tmp_path / "hub" / ("models--" + hf_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = load_llava(preset)
    assert hub.spec.kind == "hub" and hub.spec.preset["name"] == preset and hub.path == repo / "snapshots" / commit


def test_unsupported_architecture_names_the_families(tmp_path):
    import json

    src = resolve_model("tiny-internvl").path
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "idefics3"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"internvl.*llava_next.*llava_onevision"):
        load_llava(str(d))
