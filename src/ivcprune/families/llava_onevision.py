"""LLaVA-OneVision (transformers' ``LlavaOnevision*`` classes, e.g. ``llava-hf/llava-onevision-qwen2-7b-ov-hf``):
everything about it.

An image's span (one run of ``image_token_id``) is an AnyRes layout (:class:`ivcprune.tiles.AnyResLayout`): the
base view (the whole image at the tower's size, ``side x side`` tokens, 27 x 27 for SigLIP-384/14), then the
high-resolution mosaic: the tiles of the best ``image_grid_pinpoints`` grid, unpadded to the image's aspect
ratio and bilinearly shrunk when larger than ``anyres_max_N`` tiles, a learned newline token (same id) after
every mosaic row. An image of a multi-image prompt (the processor's ``batch_num_images`` > 1) is its base view
and one newline. A video's span is its frames pooled to ``ceil(side / 2)²`` tokens each, then one newline.

The newlines are structure: every span lists them as ``fixed``, so that every method sees (and budgets) the
image's content tokens only and the runtime keeps every newline.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..tiles import AnyResLayout, unpadded_mosaic
from ..tiny import TOKEN_IDS as TINY_TOKEN_IDS
from .base import LlavaPrompts, Rope1DFamily, Span, override_spec, token_runs

# SigLIP so400m patch14-384 (the 7B's tower: all 27 layers, hidden states of the last, every patch kept)
_SIGLIP_SO400M = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                      num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
_QWEN2_7B = dict(model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False)
_OV_TOKENS = dict(image_token_id=151646, video_token_id=151647, bos_token_id=151643, eos_token_id=151645,
                  pad_token_id=151643)
# the processor's and the model's default grids: 1..6 x 1..6 tiles (of 384 pixels: image_grid_pinpoints)
_OV_GRIDS = [(r, c) for r in range(1, 7) for c in range(1, 7)]

_TINY_TOKENS = {k: TINY_TOKEN_IDS[k] for k in ("image_token_id", "video_token_id", "bos_token_id", "eos_token_id",
                                                "pad_token_id")}
_TINY_TEXT = dict(_QWEN2_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)
# 56-pixel tiles of 4 x 4 tokens; up to 3 x 3 tiles, shrunk beyond 4 tiles' worth of tokens (anyres_max_4)
_TINY_VISION = dict(_SIGLIP_SO400M, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=56)
_TINY_GRIDS = [(r, c) for r in range(1, 4) for c in range(1, 4)]

_LLAVA_GROUNDING = "Please provide the bounding box coordinate of the region this sentence describes: {ref}"


def vision_side(config) -> int:
    """Tokens per side of one tile (and of the base view)."""
    vc = config.vision_config
    return vc.image_size // vc.patch_size


def max_tiles(config) -> int:
    """N of ``vision_aspect_ratio="anyres_max_N"``."""
    text = str(getattr(config, "vision_aspect_ratio", "anyres_max_9"))
    if not text.startswith("anyres_max_"):
        raise ValueError(f"vision_aspect_ratio {text!r}: only anyres_max_N is supported")
    return int(text.removeprefix("anyres_max_"))


def tile_grid(image_hw: tuple[int, int], pinpoints, tile_px: int) -> tuple[int, int]:
    """``(rows, cols)`` of tiles the processor cuts an image of ``image_hw`` pixels into (the pinpoint resolution
    that keeps the most of the image at the least waste, transformers' ``select_best_resolution``)."""
    from transformers.image_processing_utils import select_best_resolution

    h, w = select_best_resolution([int(image_hw[0]), int(image_hw[1])], [list(p) for p in pinpoints])
    return h // tile_px, w // tile_px


def image_layout(config, image_hw: tuple[int, int] | None) -> AnyResLayout:
    """The span layout of one image of ``image_hw`` pixels (``None``: an image of a multi-image prompt, which the
    model does not tile: base view + newline)."""
    side = vision_side(config)
    if image_hw is None:
        return AnyResLayout(side, tiled=False)
    tiles = tile_grid(image_hw, config.image_grid_pinpoints, config.vision_config.image_size)
    rows, cols = unpadded_mosaic(image_hw, tiles, side, max_tiles(config))
    return AnyResLayout(side, rows, cols)


def video_side(config) -> int:
    """Tokens per side of a pooled video frame."""
    return math.ceil(vision_side(config) / 2)


class LlavaOnevision(LlavaPrompts, Rope1DFamily):
    """LLaVA-OneVision: AnyRes image spans (base view + unpadded mosaic with row newlines), pooled video frames,
    a Qwen2 decoder with 1-D RoPE."""

    model_type = "llava_onevision"
    display_name = "LLaVA-OneVision"
    grounding_prompt = _LLAVA_GROUNDING
    box_format = "list"
    box_frame = "square1"
    random_configs = {
        "llava-onevision-7b": dict(text=_QWEN2_7B, vision=_SIGLIP_SO400M, tokens=_OV_TOKENS, grids=_OV_GRIDS,
                                   aspect="anyres_max_9"),
        "tiny-llava-onevision": dict(text=_TINY_TEXT, vision=_TINY_VISION, tokens=_TINY_TOKENS, grids=_TINY_GRIDS,
                                     aspect="anyres_max_4"),
    }

    @classmethod
    def model_classes(cls):
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        spec = override_spec(spec, overrides)
        config_cls, _ = cls.model_classes()
        tokens = dict(spec["tokens"])
        image, video = tokens.pop("image_token_id"), tokens.pop("video_token_id")
        px = spec["vision"]["image_size"]  # the pinpoints are tile grids at the tower's size
        return config_cls(text_config={**spec["text"], **tokens}, vision_config=dict(spec["vision"]),
                          image_token_index=image, video_token_index=video, vision_feature_layer=-1,
                          vision_feature_select_strategy="full",
                          image_grid_pinpoints=[[r * px, c * px] for r, c in spec["grids"]],
                          vision_aspect_ratio=spec["aspect"], tie_word_embeddings=False)

    @classmethod
    def synthetic_inputs(cls, config, image_tokens: int, text_tokens: int, seed: int = 0):
        """One image of about ``image_tokens`` tokens: the image is a pinpoint resolution (no padding to remove),
        the grid of that many tiles (plus the base view) closest to a square; noise pixels. ``(inputs, (rows,
        cols))`` of the mosaic, on the CPU."""
        side, px = vision_side(config), config.vision_config.image_size
        want = max(1, round(image_tokens / (side * side)) - 1)
        grids = sorted(((r // px, c // px) for r, c in config.image_grid_pinpoints),
                       key=lambda g: (abs(g[0] * g[1] - want), abs(g[0] - g[1]), g))
        rows, cols = grids[0]
        g = torch.Generator().manual_seed(seed)
        inputs = anyres_prompt(config, [(rows * px, cols * px)], text_tokens, generator=g)
        layout = image_layout(config, (rows * px, cols * px))
        return inputs, (layout.rows, layout.cols)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        self.model_type = self.config.model_type
        self.bind_language_model("a LLaVA-OneVision model")
        self.image_token_id = self.config.image_token_id
        self.video_token_id = self.config.video_token_id
        self.side = vision_side(self.config)

    # -- layouts ---------------------------------------------------------------------------------------------
    def grid_queues(self, entry_kwargs: dict) -> dict[str, list]:
        """Per image its :class:`AnyResLayout` (from ``image_sizes`` and ``batch_num_images`` as the model reads
        them, or, when ``generate`` encoded the images before the prefill, from where the newline embedding sits
        in each image's features); per video its frame count."""
        encoded = entry_kwargs.get("mm_encoder_outputs") or {}
        images: list = []
        sizes = entry_kwargs.get("image_sizes")
        if entry_kwargs.get("pixel_values") is not None and sizes is not None:
            counts = entry_kwargs.get("batch_num_images")
            tiled = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
            images = [image_layout(self.config, tuple(int(v) for v in hw) if t else None)
                      for hw, t in zip(sizes.tolist(), tiled)]
        elif encoded.get("image") is not None:
            images = [self.layout_of_features(f) for f in encoded["image"].pooler_output]
        videos: list = []
        pixels = entry_kwargs.get("pixel_values_videos")
        p2 = video_side(self.config) ** 2
        if pixels is not None:
            videos = [int(pixels.shape[1])] * int(pixels.shape[0])
        elif encoded.get("video") is not None:
            out = encoded["video"].pooler_output
            videos = [(int(out.shape[1]) - 1) // p2] * int(out.shape[0])
        return {"image": images, "video": videos}

    def layout_of_features(self, features: torch.Tensor) -> AnyResLayout | None:
        """The layout of one image's packed features ``(L, D)``: its rows equal to the learned newline embedding
        are the newlines (``None`` when they form no AnyRes layout)."""
        newline = self.entry.image_newline.to(features.device, features.dtype)
        at = (features == newline).all(-1).nonzero().squeeze(1).cpu()
        n = self.side * self.side
        L = features.shape[0]
        rows = at.numel()
        if rows == 1 and L == n + 1 and int(at[0]) == n:
            return AnyResLayout(self.side, tiled=False)  # (a one-row mosaic would end in a column before it)
        if L < n + rows or (rows and (L - n - rows) % rows) or (not rows and L != n):
            return None
        layout = AnyResLayout(self.side, rows, (L - n - rows) // rows if rows else 0)
        return layout if torch.equal(layout.newline_index(), at) else None

    def find_spans(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[Span]:
        ids = input_ids.reshape(-1)
        queues = {kind: grids.setdefault(kind, []) for kind in ("image", "video")}
        p = video_side(self.config)
        spans: list[Span] = []
        for kind, token_id in (("image", self.image_token_id), ("video", self.video_token_id)):
            for start, length in token_runs(ids == token_id):
                while length > 0:  # adjacent media without text between them: split by their layouts
                    item = queues[kind].pop(0) if queues[kind] else None
                    if kind == "image":
                        n = item.length if item is not None else length
                    else:
                        n = item * p * p + 1 if item is not None else length
                    if item is None or n > length:
                        spans.append(self._span(start, length, kind, item if n == length else None))
                        break
                    spans.append(self._span(start, n, kind, item))
                    start, length = start + n, length - n
        return sorted(spans, key=lambda s: s.start)

    def _span(self, start: int, length: int, kind: str, item) -> Span:
        """A span with its newlines fixed (an image of unknown layout: a plain run, nothing fixed)."""
        if item is None:
            return Span(start, length, kind)
        if kind == "video":
            p = video_side(self.config)
            return Span(start, length, kind, (item, p, p), fixed=(length - 1,))
        grid = None if item.mosaic else (1, item.side, item.side)
        return Span(start, length, kind, grid, fixed=tuple(item.newline_index().tolist()), layout=item)


def anyres_prompt(config, sizes: list[tuple[int, int] | None], text_tokens: int = 8, *, generator: torch.Generator,
                  text_before: int = 4, frames: list[int] | None = None) -> dict[str, torch.Tensor]:
    """A batch-of-one LLaVA-OneVision prompt: ``text_before`` tokens, then per image (``(height, width)`` in
    pixels) its tokens and two text tokens, per video (``frames``) its tokens and two text tokens, then
    ``text_tokens`` more; noise pixels in the processor's shapes (``pixel_values`` ``(images, patches, C, H, W)``
    padded to the most patches, ``image_sizes``, ``batch_num_images``; ``pixel_values_videos``). Several images
    make a multi-image prompt (base views only), as the processor treats them."""
    vc = config.vision_config
    px, C = vc.image_size, vc.num_channels
    high = min(config.get_text_config().vocab_size, config.image_token_id, config.video_token_id) - 1

    def text(k):
        return torch.randint(10, high, (k,), generator=generator).tolist()

    multi = len(sizes) > 1
    ids, pixels = text(text_before), []
    for hw in sizes:
        layout = image_layout(config, None if multi else hw)
        ids += [config.image_token_id] * layout.length + text(2)
        patches = 1
        if not multi:
            rows, cols = tile_grid(hw, config.image_grid_pinpoints, px)
            patches = 1 + rows * cols
        pixels.append(torch.randn(patches, C, px, px, generator=generator))
    p = video_side(config)
    for f in frames or []:
        ids += [config.video_token_id] * (f * p * p + 1) + text(2)
    ids += text(text_tokens)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if pixels:
        most = max(x.shape[0] for x in pixels)
        out["pixel_values"] = torch.stack([torch.cat([x, x.new_zeros(most - x.shape[0], C, px, px)]) for x in pixels])
        out["image_sizes"] = torch.tensor([list(hw) for hw in sizes])
        out["batch_num_images"] = torch.tensor([len(sizes)])
    if frames:
        if len(set(frames)) > 1:
            raise ValueError("videos of one prompt need one frame count (they are stacked)")
        out["pixel_values_videos"] = torch.randn(len(frames), frames[0], C, px, px, generator=generator)
    return out
