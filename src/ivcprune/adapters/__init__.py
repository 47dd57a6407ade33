"""Architecture adapters: where the image spans, rotary positions, values, layers and cache live."""

from __future__ import annotations

from torch import nn

from .base import Adapter, RopeInfo, Span, UnsupportedModelError
from .qwen_vl import QwenVLAdapter

_ADAPTERS: dict[str, type[Adapter]] = {t: QwenVLAdapter for t in QwenVLAdapter.MODEL_TYPES}

SUPPORTED_MODEL_TYPES = tuple(_ADAPTERS)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or :class:`UnsupportedModelError` naming what is supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"ivcprune does not support {type(model).__name__} (model_type={model_type!r}); supported model "
            f"types: {', '.join(SUPPORTED_MODEL_TYPES)} (e.g. Qwen2_5_VLForConditionalGeneration, "
            "Qwen2VLForConditionalGeneration)"
        )
    return cls(model)


__all__ = ["Adapter", "RopeInfo", "Span", "UnsupportedModelError", "get_adapter", "SUPPORTED_MODEL_TYPES"]
