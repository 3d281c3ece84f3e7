"""Processor loading without torchvision.

HF video processors need torchvision, which does not install beside the CPU torch wheel, and the
multimodal processors that carry one (LlavaOnevisionProcessor, InternVLProcessor,
Qwen2_5_VLProcessor, ...) can then be neither built nor loaded, although images never touch the
video processor. :func:`load_processor` tries ``AutoProcessor`` and falls back to the same
processor class without its video attribute (:func:`image_only_class`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from var_export.core.errors import ModelLoadError

log = logging.getLogger(__name__)


def image_only_class(cls: type) -> type:
    """A subclass of the HF processor class ``cls`` without its video processor attribute.

    Multimodal processors with a video attribute (LlavaOnevisionProcessor, InternVLProcessor, ...)
    cannot be built or loaded without a video processor, and HF video processors need
    torchvision, which does not install beside the CPU torch wheel. Images never touch the video
    processor: this subclass drops the attribute, so ``from_pretrained`` loads only the tokenizer
    and the image processor, and ``save_pretrained`` writes ``processor_class: <cls name>`` (a
    full ``AutoProcessor`` loads the directory where torchvision is installed).
    """
    attrs = [a for a in cls.get_attributes() if "video" not in a]

    class ImageOnly(cls):  # type: ignore[misc, valid-type]
        @classmethod
        def get_attributes(klass) -> list[str]:  # noqa: N805 - classmethod of a processor
            return list(attrs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__
    return ImageOnly


def load_processor(path: Path, cls: type, *, trust_remote_code: bool = False) -> Any:
    """The processor in ``path``: ``AutoProcessor`` when it loads, else ``cls`` without video."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # no torchvision: the video processor cannot be built
        import importlib.util

        if importlib.util.find_spec("torchvision") is not None:
            log.warning("AutoProcessor could not load %s (%s: %s); trying the image processor and "
                        "tokenizer alone", path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        else:
            log.warning("torchvision is not installed, so the video processor of %s cannot load: loading "
                        "its image processor and tokenizer only (images work, videos do not)", path)
    try:
        return image_only_class(cls).from_pretrained(path)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the processor (tokenizer + image processor) from {path}: "
            f"{type(exc).__name__}: {exc}. Expected the files written by {cls.__name__}.save_pretrained."
        ) from exc
