"""Model families: one file per family, one table keyed by ``config.model_type``.

Adding a family is one file (a :class:`Family` subclass) plus one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Adapter, AttentionCut, Family, RopeInfo, Span, UnsupportedModelError
from .gemma3 import Gemma3
from .internvl import InternVL
from .llava import Llava
from .llava_onevision import LlavaOnevision
from .qwen3_vl import Qwen3VL, Qwen3VLMoe
from .qwen_vl import Qwen2VL, Qwen25VL

FAMILIES: dict[str, type[Family]] = {cls.model_type: cls for cls in (Qwen25VL, Qwen2VL, Llava, InternVL, Gemma3)}
FAMILIES.update({cls.model_type: cls for cls in (Qwen3VL, Qwen3VLMoe)})
FAMILIES[LlavaOnevision.model_type] = LlavaOnevision

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_class(model_type: str | None) -> type[Family]:
    """The family of ``config.model_type``, or :class:`UnsupportedModelError` naming what is supported."""
    cls = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if cls is None:
        raise UnsupportedModelError(
            f"ivcprune does not support model_type={model_type!r}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} "
            f"({', '.join(c.model_classes()[1].__name__ for c in FAMILIES.values())})"
        )
    return cls


def get_adapter(model: nn.Module) -> Family:
    """The family of ``model``, bound to it (what the runtime asks about a loaded model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        cls = family_class(model_type)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{type(model).__name__}: {e}") from None
    return cls(model)


def random_spec(name: str) -> tuple[type[Family], dict[str, Any]]:
    """``(family, spec)`` of a ``random:NAME`` configuration."""
    for cls in FAMILIES.values():
        if name in cls.random_configs:
            return cls, cls.random_configs[name]
    names = [n for cls in FAMILIES.values() for n in cls.random_configs]
    raise ValueError(f"unknown random config {name!r}; choose from {', '.join(names)}")


__all__ = ["Adapter", "AttentionCut", "Family", "FAMILIES", "RopeInfo", "Span", "UnsupportedModelError", "family_class",
           "get_adapter", "random_spec", "SUPPORTED_MODEL_TYPES"]
