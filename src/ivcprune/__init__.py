"""ivcprune: IVC-Prune visual token pruning for vision-language models on stock transformers.

    from ivcprune import IVCPrune
    pruner = IVCPrune(layer=16, budget=0.5)
    with pruner(model):
        out = model.generate(**inputs, max_new_tokens=128)
    pruner.last_reports   # one report per batch row
"""

from .families import SUPPORTED_MODEL_TYPES, UnsupportedModelError, get_adapter
from .methods import (
    DART,
    REGISTRY,
    CDPruner,
    DivPrune,
    FastV,
    IVCPrune,
    PDrop,
    Preset,
    PruningMethod,
    RandomPrune,
    VisionZip,
    make_method,
    preset_for,
    register,
)
from .report import PruneReport, SpanReport
from .runtime import Needs, RowInput, SpanInput, SpanSelection, UnsupportedCacheError

__version__ = "0.1.0"

__all__ = [
    "IVCPrune",
    "RandomPrune",
    "FastV",
    "PDrop",
    "DART",
    "VisionZip",
    "DivPrune",
    "CDPruner",
    "PruningMethod",
    "make_method",
    "register",
    "REGISTRY",
    "Needs",
    "RowInput",
    "PruneReport",
    "SpanReport",
    "SpanInput",
    "SpanSelection",
    "Preset",
    "preset_for",
    "get_adapter",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "UnsupportedCacheError",
    "__version__",
]
