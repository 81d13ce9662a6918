"""Images for the VLM: `qwen_vl_utils.process_vision_info`, importable without torchvision.

qwen_vl_utils imports torchvision at module level although its image path needs only PIL, and
torchvision has no CPU build on PyPI. When it is missing, the import runs against a throwaway stub
that is removed right after, so transformers still sees no torchvision and keeps its PIL processor.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from functools import cache
from typing import Any

from PIL import Image


def _drop(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def _stub_torchvision() -> None:
    def module(name: str) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        sys.modules[name] = m
        return m

    def unavailable(*args, **kwargs):
        raise RuntimeError("video input needs torchvision, which is not installed")

    tv = module("torchvision")
    tv.__version__ = "0.0.0+stub"
    tv.io = module("torchvision.io")
    tv.io.read_video = unavailable
    tv.transforms = module("torchvision.transforms")
    tv.transforms.InterpolationMode = types.SimpleNamespace(
        NEAREST="nearest", BILINEAR="bilinear", BICUBIC="bicubic"
    )
    tv.transforms.functional = types.SimpleNamespace(resize=unavailable)


@cache
def _qwen_vl_utils():
    try:
        import qwen_vl_utils
    except ImportError:
        _drop("qwen_vl_utils")
        _stub_torchvision()
        try:
            import qwen_vl_utils
        finally:
            _drop("torchvision")
    return qwen_vl_utils


def image_part(image: Image.Image, min_pixels: int, max_pixels: int) -> dict[str, Any]:
    """One image of a chat message; process_vision_info resizes it into [min_pixels, max_pixels]."""
    return {"type": "image", "image": image, "min_pixels": min_pixels, "max_pixels": max_pixels}


def images_of(conversations: list[list[dict[str, Any]]]) -> list[Image.Image] | None:
    """Every image of the conversations, in order, resized as the model expects (None when there are none)."""
    images, _ = _qwen_vl_utils().process_vision_info(conversations)
    return images
