"""LLaVA-1.5 (transformers' ``Llava*`` classes, e.g. ``llava-hf/llava-1.5-7b-hf``): everything about it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tiny import TOKEN_IDS as TINY_TOKEN_IDS
from .base import LlavaPrompts, Rope1DFamily, Span, UnsupportedModelError, override_spec, token_runs

# CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower; features of its second-to-last layer, CLS dropped: 576 tokens)
_CLIP_L336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_LLAMA2_7B = dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
_LLAVA_TOKENS = dict(image_token_id=32000, bos_token_id=1, eos_token_id=2, pad_token_id=32001)
_TINY_TOKENS = dict(image_token_id=TINY_TOKEN_IDS["image_token_id"], bos_token_id=TINY_TOKEN_IDS["bos_token_id"],
                    eos_token_id=TINY_TOKEN_IDS["eos_token_id"], pad_token_id=TINY_TOKEN_IDS["pad_token_id"])
_TINY_TEXT = dict(_LLAMA2_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2)

# VLMEvalKit's LLaVA grounding-style instruction (LLaVA-1.5 was trained on RefCOCO with it): boxes come back
# as [x1, y1, x2, y2] in 0-1, relative to the image padded to a square.
_LLAVA_GROUNDING = "Please provide the bounding box coordinate of the region this sentence describes: {ref}"


class Llava(LlavaPrompts, Rope1DFamily):
    """LLaVA-1.5: one run of ``image_token_id`` per image ((image_size / patch)² tokens, a square grid),
    a Llama decoder with 1-D RoPE."""

    model_type = "llava"
    display_name = "LLaVA-1.5"
    grounding_prompt = _LLAVA_GROUNDING
    box_format = "list"
    box_frame = "square1"
    random_configs = {
        "llava-1.5-7b": dict(text=_LLAMA2_7B, vision=_CLIP_L336, tokens=_LLAVA_TOKENS),
        "tiny-llava-1.5": dict(text=_TINY_TEXT, tokens=_TINY_TOKENS,
                               vision=dict(_CLIP_L336, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=112, projection_dim=32)),
    }

    @classmethod
    def model_classes(cls):
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        return LlavaConfig, LlavaForConditionalGeneration

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        spec = override_spec(spec, overrides)
        config_cls, _ = cls.model_classes()
        tokens = dict(spec["tokens"])
        image_token = tokens.pop("image_token_id")
        vision = spec["vision"]
        side = vision["image_size"] // vision["patch_size"]
        return config_cls(text_config={**spec["text"], **tokens}, vision_config=vision, image_token_index=image_token,
                          image_seq_length=side * side, **{k: v for k, v in tokens.items() if k == "pad_token_id"})

    @classmethod
    def synthetic_inputs(cls, config, image_tokens: int, text_tokens: int, seed: int = 0):
        """``... <image>*N question ...`` with N = the tower's tokens per image (``image_tokens`` is ignored:
        LLaVA-1.5 has one fixed size); noise pixels. ``(inputs, (h, w))``, on the CPU."""
        side = cls.grid_side(config)
        g = torch.Generator().manual_seed(seed)
        high = min(config.get_text_config().vocab_size, config.image_token_id) - 1
        text = torch.randint(10, high, (text_tokens + 4,), generator=g)
        ids = torch.tensor([text[:4].tolist() + [config.image_token_id] * side * side + text[4:].tolist()])
        size = config.vision_config.image_size
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values": torch.randn(1, config.vision_config.num_channels, size, size, generator=g)}
        return inputs, (side, side)

    @classmethod
    def grid_side(cls, config) -> int:
        vc = config.vision_config
        return vc.image_size // vc.patch_size

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        self.model_type = self.config.model_type
        self.bind_language_model("a LLaVA model")
        self.image_token_id = self.config.image_token_id
        self.side = self.grid_side(self.config)
        if self.config.vision_feature_select_strategy != "default":
            self.side = None  # CLS token kept: not a square grid

    def cls_attention_parts(self) -> tuple[nn.Module, nn.Module]:
        """CLIP's layer that produces the image features (``vision_feature_layer``, -2: the second to last) and
        the multimodal projector. Needs the default strategy (CLS dropped after the attention)."""
        if self.side is None:
            raise UnsupportedModelError("vision_feature_select_strategy='full' keeps CLS among the image tokens")
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise UnsupportedModelError("several vision feature layers: no single CLS attention")
        tower = self.entry.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers  # transformers 5 flattens CLIPVisionModel
        index = layer + len(layers) if layer < 0 else layer - 1  # hidden_states[i] is layer i-1's output
        return layers[index].self_attn, self.entry.multi_modal_projector

    def find_spans(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[Span]:
        spans: list[Span] = []
        per_image = self.side * self.side if self.side else None
        for start, length in token_runs(input_ids.reshape(-1) == self.image_token_id):
            # adjacent images without text between them form one run: split it by the tokens per image
            n = per_image if per_image and length % per_image == 0 else length
            for first in range(start, start + length, n):
                spans.append(Span(first, n, "image", (1, self.side, self.side) if n == per_image else None))
        return spans

