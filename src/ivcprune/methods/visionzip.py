"""VisionZip (Yang et al., CVPR 2025): before the LLM, keep the "dominant" visual tokens the vision
tower's CLS token attends to most, and merge the rest into a few "contextual" tokens."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..families import Adapter
from ..merging import VISIONZIP_CONTEXTUAL_SHARE, visionzip_counts, visionzip_select
from ..runtime import SpanInput, SpanSelection
from .base import PruningMethod, check_choice, check_ratio

MERGES = ("release", "mean")


@dataclass(repr=False, eq=False)
class VisionZip(PruningMethod):
    """VisionZip on LLaVA-1.5: per image, the CLS attention of the vision layer that produces the image
    features (heads summed) picks the dominant tokens; the remaining tokens are merged into contextual
    tokens (evenly spaced targets, each other token joining the target with the most similar key, keys of
    that layer averaged over heads); the merged features replace the target's before the projector, and the
    LLM never sees the other tokens (pruned before its first layer, ``layer=0``).

    Defaults from VisionZip's code (dvlab-research/VisionZip): the -2 CLIP layer, 10 of every 64 kept
    tokens contextual (54 + 10, 108 + 20, 162 + 30 for 64 / 128 / 192), the release's merge (target plus the
    mean of its members). Differences: VisionZip counts the CLS token among its dominant tokens; LLaVA-1.5's
    576 image tokens hold no CLS, so every kept slot here is a patch. Kept and merged tokens keep their
    original positions (a contextual token sits at its target's position; the release appends contextual
    tokens after the dominant ones and renumbers). The attention row is computed from the layer's
    queries and keys, so the tower keeps its attention implementation. Models whose vision tower has no
    CLS token (Qwen-VL) or whose tokens pool several patches (InternVL) are refused.
    """

    name = "visionzip"
    label = "VisionZip"
    min_layer = 0

    contextual_share: float = field(default=VISIONZIP_CONTEXTUAL_SHARE, metadata={
        "help": "VisionZip: share of the kept tokens that are merged contextual tokens"})
    merge: str = field(default="release", metadata={"choices": MERGES, "help": "VisionZip: how a contextual "
                                                    "token is built (release: target + mean of members)"})
    _images: threading.local = field(default_factory=threading.local, init=False, compare=False)

    def __post_init__(self):
        super().__post_init__()
        check_ratio("contextual_share", self.contextual_share, allow_zero=True)
        check_choice("merge", self.merge, MERGES)
        if self.layer not in (None, 0):
            raise ValueError(f"VisionZip acts before the LLM: layer must be 0, got {self.layer}")

    def default_layer(self, adapter: Adapter) -> int:
        return 0

    def resolve(self, adapter: Adapter) -> dict[str, Any]:
        adapter.cls_attention_parts()  # refuses families without a CLS token, before anything is installed
        return super().resolve(adapter)

    def model_hooks(self, adapter: Adapter, config: dict[str, Any]):
        attention, projector = adapter.cls_attention_parts()
        local = self._images

        def capture(module, args, kwargs):  # the CLS row and the keys of the feature layer
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            with torch.no_grad():
                B, S, _ = h.shape
                q = module.q_proj(h[:, :1]).view(B, 1, module.num_heads, module.head_dim).transpose(1, 2)
                k = module.k_proj(h).view(B, S, module.num_heads, module.head_dim).transpose(1, 2)
                cls = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * module.scale, dim=-1)[:, :, 0]
            local.cls, local.keys = cls[:, :, 1:], k[:, :, 1:]  # (B, heads, L), (B, heads, L, d): patches
            return None

        def merge(module, args, kwargs):  # replace each contextual target's features by its merged ones
            features = kwargs["image_features"] if "image_features" in kwargs else args[0]
            cls, keys = getattr(local, "cls", None), getattr(local, "keys", None)
            if cls is None or cls.shape[0] != features.shape[0] or cls.shape[-1] != features.shape[1]:
                raise RuntimeError("VisionZip: the CLS attention of this batch's images was not captured")
            features = features.clone()
            picks = []
            for i in range(features.shape[0]):
                dominant, contextual = self._counts(features.shape[1], config)
                pick = visionzip_select(cls[i], keys[i], features[i], dominant, contextual, merge=config["merge"])
                features[i, pick.targets] = pick.merged.to(features.dtype)
                picks.append(pick)
            local.cls = local.keys = None
            local.picks = picks
            if "image_features" in kwargs:
                kwargs["image_features"] = features
                return args, kwargs
            return (features, *args[1:]), kwargs

        return [(attention, "pre", capture), (projector, "pre", merge)]

    def _counts(self, length: int, config: dict[str, Any]) -> tuple[int, int]:
        return visionzip_counts(self.target_count(length, config), config["contextual_share"])

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection:
        picks = getattr(self._images, "picks", None)
        if picks is None or span.media_index >= len(picks):
            raise RuntimeError("VisionZip: no vision-tower selection for this image (pass pixel_values)")
        pick = picks[span.media_index]
        if span.media_index == len(picks) - 1:
            self._images.picks = None
        return SpanSelection(pick.kept, {"dominant": pick.dominant, "contextual": pick.targets})
