"""Shared fixtures, built once per test session and used across files:

* ``tiny_llava_path`` / ``tiny_loaded``: the embedded tiny-llava (built once per machine, cached);
* ``parity_results``: max |Δlogits| per parity case, printed in the terminal summary;
* ``tiny_llava_graphs`` (alias ``tiny_trt_graphs``): tiny-llava's plain graphs and its naive /
  fused / fp16 decoders, each exported once; ``tiny_llama_plain``: a random LLaMA decoder, once;
* ``tiny_bundles``: tiny-llava's plain graphs made into two bundles, VAR (hybrid, planted heads) and
  ``--no-var``, with the torch model, its processor and a synthetic image (runtime, bench, ...);
* ``tiny_qwen_graphs`` / ``tiny_qwen_bundle``: tiny-qwen2.5-vl's plain graphs and a hybrid VAR
  bundle (runtime, serving); ``tiled``: the tiled families (tests/tiled_fixtures.py).
"""

from __future__ import annotations

import functools

import pytest


def tiny_settings():
    from var_export.calibration.tiny_llava import TINY_SINK_DIMS
    from var_export.core.settings import VarSettings

    return VarSettings(sink_dims=TINY_SINK_DIMS, heads="hybrid", layers="2:")


PARITY = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def parity_results(request) -> dict[str, float]:
    """case -> max |Δlogits| (ORT vs the PyTorch reference), shown after the run."""
    return request.config.stash.setdefault(PARITY, {})


def pytest_terminal_summary(terminalreporter, config) -> None:
    results = config.stash.get(PARITY, {})
    if results:
        terminalreporter.section("parity: max |Δlogits| of ONNX Runtime vs the PyTorch reference")
        for name, value in sorted(results.items()):
            terminalreporter.write_line(f"{name:55s} {value:.2e}")


@pytest.fixture(scope="session")
def tiny_llava_path():
    from var_export.calibration.tiny_llava import tiny_llava_dir

    return tiny_llava_dir()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llava_path):
    from var_export.models import load_llava, resolve_model

    return load_llava(resolve_model("tiny-llava"))


class _TinyLlavaGraphs:
    """tiny-llava's graphs, each exported on first use, then shared by the whole session:

    * ``plain``: the three fp32 graphs (``export_graphs``), also named ``vision_encoder``,
      ``embed_tokens`` and ``naive-novar`` (the plain eager decoder);
    * the decoders ``<form>-novar`` / ``<form>-<var>`` (VAR hybrid with the planted heads):
      ``naive`` and ``fp16`` (eager export, ``-var``), ``fused`` and ``fused16`` (SDPA export, ONNX
      Attention, opset 23, fp32 / fp16; ``-qk`` and ``-mask``: the fused formulation with either
      score shift).

    Nobody writes into these files: tests copy them or read them."""

    FORMS = {  # form -> (export_decoder options, VAR variants)
        "naive": ({}, ("var",)),
        "fp16": ({"dtype": "fp16"}, ("var",)),
        "fused": ({"fused": True}, ("qk", "mask")),
        "fused16": ({"fused": True, "dtype": "fp16"}, ("qk", "mask")),
    }

    def __init__(self, out, model):
        self.out, self.model, self.paths = out, model, {}

    @functools.cached_property
    def plain(self):
        from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
        from var_export.export import export_graphs

        result = export_graphs(self.model, self.out / "graphs")
        self.paths.update({"vision_encoder": result.paths[VISION_ENCODER], "embed_tokens": result.paths[EMBED_TOKENS],
                           "naive-novar": result.paths[DECODER]})
        return result

    def __getitem__(self, name):
        if name not in self.paths:
            if name in ("vision_encoder", "embed_tokens", "naive-novar"):
                _ = self.plain
            else:
                self._export_decoders(name.split("-")[0])
        return self.paths[name]

    def _export_decoders(self, form):
        import onnx_ir as ir

        from var_export.calibration import tiny_llava as tl
        from var_export.core.settings import VarSettings
        from var_export.export import export_decoder
        from var_export.passes.fused_var import apply_fused_var
        from var_export.passes.pipeline import apply_var, save_model

        options, variants = self.FORMS[form]
        if form == "naive":  # the plain export's decoder
            base = self["naive-novar"]
        else:
            base = self.out / f"{form}-novar" / "decoder_model_merged.onnx"
            base.parent.mkdir()
            export_decoder(self.model, base, **options)
            self.paths[f"{form}-novar"] = base
        settings = VarSettings(sink_dims=tl.TINY_SINK_DIMS, heads="hybrid", layers="2:")
        heads = sorted(set(tl.PLANTED_IMAGE_CENTRIC_HEADS) | set(tl.PLANTED_MIXED_HEADS))
        for variant in variants:
            if options.get("fused"):
                var_model, _ = apply_fused_var(ir.load(str(base)), settings, heads, num_layers=4, shift=variant)
            else:
                var_model, _ = apply_var(ir.load(str(base)), settings, heads, num_layers=4)
            path = self.out / f"{form}-{variant}" / "decoder_model_merged.onnx"
            path.parent.mkdir()
            save_model(var_model, path)
            self.paths[f"{form}-{variant}"] = path


@pytest.fixture(scope="session")
def tiny_llava_graphs(tmp_path_factory, tiny_loaded):
    """tiny-llava's graphs (:class:`_TinyLlavaGraphs`), each exported once per session and shared by
    the parity, fused-VAR, bundle (``tiny_bundles``) and TensorRT tests."""
    return _TinyLlavaGraphs(tmp_path_factory.mktemp("tiny_llava_graphs"), tiny_loaded.model)


@pytest.fixture(scope="session")
def tiny_trt_graphs(tiny_llava_graphs):
    """The TensorRT tests' name for ``tiny_llava_graphs``."""
    return tiny_llava_graphs


@pytest.fixture(scope="session")
def tiny_llama_plain(tmp_path_factory):
    """A dynamo-exported random LLaMA decoder (decoder contract I/O, ``passes_fixtures.LlamaSpec()``),
    exported once per session (the LLaMA pass tests and the TensorRT tests)."""
    pytest.importorskip("torch")
    from passes_fixtures import LlamaSpec, export_tiny_llama

    return export_tiny_llama(tmp_path_factory.mktemp("llama") / "decoder.onnx", LlamaSpec())


@pytest.fixture(scope="session")
def tiny_llama_var_decoder(tmp_path_factory, tiny_llama_plain):
    """A dynamo-exported LLaMA decoder (decoder contract I/O, passes_fixtures.LlamaSpec()) with
    VAR baked in (dynamic heads, sink dim 1, layers 1:), shared by the TensorRT tests."""
    import onnx_ir as ir
    from passes_fixtures import LlamaSpec

    from var_export.core.settings import VarSettings
    from var_export.passes.pipeline import apply_var, save_model

    tmp = tmp_path_factory.mktemp("trt_llama")
    spec = LlamaSpec()
    plain = tiny_llama_plain
    settings = VarSettings(sink_dims=(1,), heads="dynamic", layers="1:")
    model, _ = apply_var(ir.load(str(plain)), settings, None, num_layers=spec.layers)
    out = tmp / "decoder_model_merged.onnx"
    save_model(model, out)
    return out


@pytest.fixture(scope="session")
def tiny_qwen_loaded():
    """The embedded tiny Qwen2.5-VL (built once per machine, cached), loaded once per session."""
    from var_export.models import load_llava

    return load_llava("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_qwen_graphs(tiny_qwen_loaded, tmp_path_factory):
    """The three plain graphs of tiny-qwen2.5-vl, exported once per session."""
    from var_export.export import export_graphs

    return export_graphs(tiny_qwen_loaded.model, tmp_path_factory.mktemp("tiny-qwen") / "graphs")


def tiny_qwen_settings():
    """VAR settings and heads of the tiny-qwen2.5-vl hybrid bundle (the planted sinks / heads)."""
    from var_export.calibration import tiny_qwen as tq
    from var_export.core.settings import VarSettings

    return VarSettings(sink_dims=tq.TINY_SINK_DIMS, layers="2:", heads="hybrid"), list(tq.PLANTED_IMAGE_CENTRIC_HEADS)


@pytest.fixture(scope="session")
def tiny_qwen_bundle(tiny_qwen_loaded, tiny_qwen_graphs, tmp_path_factory):
    """A hybrid VAR bundle of tiny-qwen2.5-vl (family qwen2_5_vl, M-RoPE) from the session's plain
    graphs, with the manifest facts the pipeline writes; written once per session."""
    from var_export.bundle import write_bundle
    from var_export.calibration import tiny_qwen as tq
    from var_export.core.contract import DECODER, EMBED_TOKENS, VISION_ENCODER
    from var_export.models import model_fingerprint
    from var_export.passes.pipeline import apply_var, load_model, save_model
    from var_export.pipeline import _family_facts, _token_facts

    settings, heads = tiny_qwen_settings()
    tmp = tmp_path_factory.mktemp("tiny-qwen-bundle")
    model, report = apply_var(load_model(tiny_qwen_graphs.paths[DECODER]), settings, heads, num_layers=tq.NUM_LAYERS)
    (tmp / "var").mkdir()
    save_model(model, tmp / "var" / DECODER)
    cfg = tiny_qwen_loaded.config
    graphs = {VISION_ENCODER: tiny_qwen_graphs.paths[VISION_ENCODER],
              EMBED_TOKENS: tiny_qwen_graphs.paths[EMBED_TOKENS], DECODER: tmp / "var" / DECODER}
    fields = {  # the pipeline's own facts (family, M-RoPE, spatial_merge_size, tokens, positions)
        "model_id": "tiny-qwen2.5-vl", "fingerprint": model_fingerprint(cfg),
        "var": settings.to_dict(), "var_layers": list(report.var_layers), "head_mode": "hybrid",
        "heads": [list(h) for h in heads], "opset": tiny_qwen_graphs.opset, **_token_facts(cfg), **_family_facts(cfg),
    }
    return write_bundle(tmp / "bundle", graphs=graphs, manifest_fields=fields, calibration=None,
                        processor=tiny_qwen_loaded.processor)


@pytest.fixture(scope="session")
def tiled(tmp_path_factory):
    """variant -> TiledModel for tiny-llava-next, tiny-llava-onevision, tiny-internvl: loaded once, the three
    plain graphs exported once, a hybrid VAR bundle written once (lazily, per variant)."""
    from tests.tiled_fixtures import TiledModel

    cache: dict[str, TiledModel] = {}

    def get(variant: str) -> TiledModel:
        if variant not in cache:
            cache[variant] = TiledModel(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_llava_path, tiny_llava_graphs):
    """tiny-llava (torch, eager), its processor, and two bundles: VAR (hybrid) and --no-var."""
    import onnx_ir as ir
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from var_export.bundle import write_bundle
    from var_export.calibration import tiny_llava as tl
    from var_export.core.contract import DECODER
    from var_export.hf_layout import hf_config_files
    from var_export.passes.pipeline import apply_var, save_model

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_path, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_path)
    tmp = tmp_path_factory.mktemp("tiny_bundles")
    exported = tiny_llava_graphs.plain  # the session's export of the same weights
    settings = tiny_settings()
    heads = sorted(tl.PLANTED_IMAGE_CENTRIC_HEADS + tl.PLANTED_MIXED_HEADS)
    var_model, report = apply_var(ir.load(str(exported.decoder)), settings, heads, num_layers=exported.num_layers)
    (tmp / "var").mkdir()
    save_model(var_model, tmp / "var" / DECODER)
    fields = {"model_id": "tiny-llava", "fingerprint": {"test": 1}, "opset": exported.opset}
    hf_files = hf_config_files(model.config, tmp / "hf")  # config.json, generation_config.json
    plain = write_bundle(
        tmp / "plain", graphs=dict(exported.paths), manifest_fields=fields, calibration=None,
        processor=processor, extra_files=hf_files,
    )
    var = write_bundle(
        tmp / "var_bundle", graphs={**exported.paths, DECODER: tmp / "var" / DECODER}, calibration=None,
        processor=processor, extra_files=hf_files,
        manifest_fields={**fields, "var": settings.to_dict(), "var_layers": report.var_layers,
                         "head_mode": "hybrid", "heads": [list(h) for h in heads]},
    )
    images = []
    for i, im in enumerate(tl.synthetic_images(3, seed=7)):
        images.append(tmp / ("image.png" if i == 0 else f"image{i}.png"))
        im.save(images[-1])
    return {"model": model, "processor": processor, "plain": plain, "var": var, "image": images[0],
            "images": images, "tmp": tmp, "novar": plain, "hybrid": var}


@pytest.fixture(scope="session")
def tiny_var_bundle(tiny_bundles):
    """The tiny-llava VAR bundle (hybrid, the planted heads, layers 2:) and three images: what the
    serving tests generate from (the same export as ``tiny_bundles``)."""
    return {"bundle": tiny_bundles["var"], "images": tiny_bundles["images"]}


# Under pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): every test that uses one of these
# session exports runs on the worker of its group, so each model is exported once per run; a test
# using two of them (the family serving tests: tiny-qwen and the tiled variants) joins their groups.
# A test using a module fixture is grouped with its file (the fixture runs once); any other test is a
# unit of its own, free to fill whichever worker is idle (xdist sends the big groups first).
_SHARED_EXPORTS = {
    "tiny_llava_graphs": "tiny-llava", "tiny_qwen_graphs": "families", "tiled": "families",
    "tiny_llama_plain": "tiny-llama",
}


def _uses_module_fixture(item) -> bool:
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    return any(d.scope in ("module", "class", "package") for fixturedefs in defs.values() for d in fixturedefs)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items) -> None:
    if not getattr(config.option, "loadgroup", False):  # set on the workers of --dist loadgroup
        return
    items = [item for item in items if item.get_closest_marker("xdist_group") is None]
    uses = {item: sorted({g for name, g in _SHARED_EXPORTS.items() if name in item.fixturenames}) for item in items}
    merged: dict[str, str] = {}  # group -> the group it joined

    def root(group: str) -> str:
        while merged.get(group, group) != group:
            group = merged[group]
        return group

    for first, *rest in (groups for groups in uses.values() if groups):
        for other in rest:
            if root(other) != root(first):
                merged[root(other)] = root(first)
    for item, groups in uses.items():
        if groups:
            item.add_marker(pytest.mark.xdist_group(root(groups[0])))
        elif _uses_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.name))


class _LoadgroupShim:
    """pytest-xdist 3.8's loadgroup tags a test's group onto ``item._nodeid``, which pytest >= 9.2 no
    longer reads (structured node ids): the marks would be ignored and the groups spread over the
    workers (pytest-dev/pytest-xdist#1386, fix proposed in #1388). After xdist's hook, this sets the
    suffix where it did not take; it does nothing once xdist does it itself."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items) -> None:
        if not getattr(config.option, "loadgroup", False):
            return
        for item in items:
            names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                            for m in item.iter_markers("xdist_group")})
            if names and "@" not in item.nodeid and hasattr(item, "_id"):
                from _pytest.nodeid import NodeId

                item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


def pytest_configure(config) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_LoadgroupShim(), "var-export-loadgroup-shim")
    import os

    # Two workers on two cores: one torch thread each and ONNX Runtime threads that do not spin (measured
    # on the suite: 198-207 s as before; 178-183 s with one torch thread; 169-173 s without spinning too).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        _ort_without_spinning()


def _ort_without_spinning() -> None:
    """ONNX Runtime's intra-op threads spin while they wait; two workers on two cores then burn each
    other's time. Every session a worker opens gets ``allow_spinning = 0`` (same threads, same
    partitioning of the work: the numbers do not change)."""
    import onnxruntime as ort

    original = ort.InferenceSession.__init__
    if getattr(original, "_var_export_no_spin", False):
        return

    def init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options if sess_options is not None else ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        original(self, path_or_bytes, options, *args, **kwargs)

    init._var_export_no_spin = True
    ort.InferenceSession.__init__ = init


def pytest_sessionfinish(session) -> None:
    """An xdist worker hands its parity numbers to the controller, which prints the summary."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["parity_results"] = dict(session.config.stash.get(PARITY, {}))


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    results = getattr(node, "workeroutput", {}).get("parity_results", {})
    node.config.stash.setdefault(PARITY, {}).update(results)
