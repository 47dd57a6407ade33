"""Qwen2-VL and Qwen2.5-VL (transformers' ``Qwen2VL*`` / ``Qwen2_5_VL*`` classes): everything about them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..tiny import TOKEN_IDS as TINY_TOKEN_IDS
from .base import Family, RopeInfo, Span, override_spec, token_runs

_PX = 28 * 28  # pixels of one merged visual token (14-pixel patches, 2x2 merge)

_QWEN_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
    bos_token_id=151643,
    eos_token_id=151645,
)


def _text(vocab, hidden, ffn, layers, heads, kv_heads, max_pos, tied, theta=1000000.0, section=(16, 24, 24)):
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": list(section)},
        tie_word_embeddings=tied,
    )


# Qwen2.5-VL vision tower (window attention, SwiGLU); the merger's output width follows the LLM.
_QWEN25_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
# Qwen2-VL vision tower (full attention, QuickGELU MLP); `hidden_size` is the merger's output width.
_QWEN2_VISION = dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2, hidden_act="quick_gelu")
# Tiny models (tests, demo without the embedded model) use the ids of the project's own tokenizer.
_TINY_TEXT = _text(512, 64, 128, 4, 4, 2, 4096, False, theta=10000.0, section=(2, 3, 3))


class QwenVL(Family):
    """Image/video tokens are runs of ``image_token_id`` / ``video_token_id``; the LLM uses M-RoPE
    with (t, h, w) position ids; values come from ``self_attn.v_proj``."""

    vision_out_key = "hidden_size"  # the vision config field that must equal the LLM width

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        spec = override_spec(spec, overrides)
        if f"vision.{cls.vision_out_key}" not in (overrides or {}):  # the merger projects to the LLM width
            spec["vision"][cls.vision_out_key] = spec["text"]["hidden_size"]
        config_cls, _ = cls.model_classes()
        tokens = spec["tokens"]
        text_tokens = {k: tokens[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tokens}
        return config_cls(text_config={**spec["text"], **text_tokens}, vision_config=spec["vision"], **tokens)

    @classmethod
    def synthetic_inputs(cls, config, image_tokens: int, text_tokens: int, seed: int = 0):
        """The token layout Qwen-VL's processor produces (``... <vision_start> <image_pad>*N <vision_end>
        question ...``) around one image of about ``image_tokens`` merged tokens; pixel values are noise of
        the shape the vision tower expects. ``(inputs, (h, w))``, on the CPU."""
        vc = config.vision_config
        merge = vc.spatial_merge_size
        gh = max(1, int(image_tokens**0.5))
        while image_tokens % gh:
            gh -= 1
        gw = image_tokens // gh
        g = torch.Generator().manual_seed(seed)
        high = min(config.get_text_config().vocab_size, config.image_token_id, config.vision_start_token_id) - 1
        text = torch.randint(10, high, (text_tokens + 8,), generator=g)
        pre = text[:4].tolist() + [config.vision_start_token_id]
        post = [config.vision_end_token_id] + text[4:].tolist()
        ids = torch.tensor([pre + [config.image_token_id] * (gh * gw) + post])
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn((gh * merge) * (gw * merge), patch_dim, generator=g),
            "image_grid_thw": torch.tensor([[1, gh * merge, gw * merge]]),
            "mm_token_type_ids": (ids == config.image_token_id).int(),
        }
        return inputs, (gh, gw)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        self.model_type = self.config.model_type
        self.bind_language_model("a Qwen-VL model")
        self.image_token_id = self.config.image_token_id
        self.video_token_id = self.config.video_token_id
        self.merge = self.config.vision_config.spatial_merge_size

    def grid_queues(self, entry_kwargs: dict) -> dict[str, list]:
        return {
            "image": _grid_rows(entry_kwargs.get("image_grid_thw"), self.merge),
            "video": _grid_rows(entry_kwargs.get("video_grid_thw"), self.merge),
        }

    def find_spans(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[Span]:
        ids = input_ids.reshape(-1)
        grids = {kind: grids.setdefault(kind, []) for kind in ("image", "video")}
        spans: list[Span] = []
        for kind, token_id in (("image", self.image_token_id), ("video", self.video_token_id)):
            for start, length in token_runs(ids == token_id):
                # Split runs by the grids when they are known (adjacent media without separators).
                while length > 0:
                    grid = grids[kind].pop(0) if grids[kind] else None
                    n = grid[0] * grid[1] * grid[2] if grid else length
                    if grid is None or n > length:
                        spans.append(Span(start, length, kind, grid if grid and n == length else None))
                        break
                    spans.append(Span(start, n, kind, grid))
                    start, length = start + n, length - n
        return sorted(spans, key=lambda s: s.start)

    def axes_positions(self, rotary_position_ids: torch.Tensor) -> torch.Tensor:
        p = rotary_position_ids.cpu()
        if p.dim() == 2:  # (bs, S): text-only positions, expanded to the three axes by the model
            return p.unsqueeze(0).expand(3, -1, -1)
        return p  # (3, bs, S)

    def rope_info(self) -> RopeInfo:
        section = self.rotary.mrope_section
        return RopeInfo(
            inv_freq=self.rotary.inv_freq,
            attention_scaling=float(self.rotary.attention_scaling),
            mrope_section=tuple(int(s) for s in section) if section is not None else None,
            dtype=self.layers[0].self_attn.v_proj.weight.dtype,
        )

    def span_grid(self, positions: torch.Tensor) -> tuple[int, int, int] | None:
        # M-RoPE ids of a span are (t0 + k*interval, h0 + row, w0 + col): distinct values per axis
        # give the grid (generate does not pass image_grid_thw to the forward, positions always come).
        t, h, w = (int(torch.unique(positions[a]).numel()) for a in range(3))
        return (t, h, w) if t * h * w == positions.shape[1] else None

    def decode_position_ids(self, start: torch.Tensor, q_len: int, device: torch.device) -> torch.Tensor:
        text = (start.view(-1, 1) + torch.arange(q_len)).to(device)  # (B, q)
        deltas = self.entry.rope_deltas
        delta = deltas.to(device).view(-1, 1) if deltas is not None else 0
        mrope = (text + delta).unsqueeze(0).expand(3, -1, -1)
        return torch.cat([text.unsqueeze(0), mrope], dim=0)  # [text; t; h; w] as generate builds them

    def value_module(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn.v_proj


class Qwen25VL(QwenVL):
    """Qwen2.5-VL: answers boxes as JSON ``bbox_2d`` in pixels of the resized image."""

    model_type = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    # the authors' VLMEvalKit fork (vlmeval/vlm/qwen2_vl/prompt.py, _build_vg_prompt): the text after the image
    authors_grounding_prompt = "\nLocate {ref} and output the bbox coordinates in JSON format."
    vision_out_key = "out_hidden_size"
    random_configs = {
        "qwen2.5-vl-7b": dict(text=_text(152064, 3584, 18944, 28, 28, 4, 128000, False), vision=_QWEN25_VISION,
                              tokens=_QWEN_TOKENS),
        "qwen2.5-vl-3b": dict(text=_text(151936, 2048, 11008, 36, 16, 2, 128000, True), vision=_QWEN25_VISION,
                              tokens=_QWEN_TOKENS),
        "tiny-qwen2.5-vl": dict(text=_TINY_TEXT, tokens=dict(TINY_TOKEN_IDS),
                                vision=dict(_QWEN25_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                            fullatt_block_indexes=[1], window_size=56)),
    }

    @classmethod
    def model_classes(cls):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    @classmethod
    def pixel_bounds(cls, config, task: str) -> tuple[int, int]:
        """The authors' evaluation: 4 to 16384 tokens for grounding; for VQA at most 6000 tokens (7B, 28
        layers) or 6384 (3B, 36 layers)."""
        if task == "grounding":
            return 4 * _PX, 16384 * _PX
        layers = config.get_text_config().num_hidden_layers
        return 4 * _PX, (6384 if layers == 36 else 6000) * _PX


class Qwen2VL(QwenVL):
    """Qwen2-VL: answers boxes as ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` in a 0-1000 frame."""

    model_type = "qwen2_vl"
    display_name = "Qwen2-VL"
    grounding_prompt = "Output the bounding box of <|object_ref_start|>{ref}<|object_ref_end|> in the image."
    # the authors' VLMEvalKit fork (vlmeval/vlm/qwen2_vl/prompt.py, _build_vg_prompt), with the expression
    # lower-cased and its last character dropped (:meth:`grounding_ref`)
    authors_grounding_prompt = "\n<|object_ref_start|>Detect {ref}<|object_ref_end|>"

    @classmethod
    def grounding_ref(cls, template: str, ref: str) -> str:
        """The authors' template gets ``ref`` lower-cased without its last character (their
        ``question[:-1].lower()``, written for expressions ending in a full stop); here the last character is
        dropped only when it is not a letter or digit, so an expression without a full stop loses nothing."""
        if template != cls.authors_grounding_prompt:
            return ref
        ref = ref[:-1] if ref and not ref[-1].isalnum() else ref
        return ref.lower()
    box_format = "box_tokens"
    box_frame = "1000"
    random_configs = {
        "qwen2-vl-7b": dict(text=_text(152064, 3584, 18944, 28, 28, 4, 32768, False), vision=_QWEN2_VISION,
                            tokens=_QWEN_TOKENS),
        "qwen2-vl-2b": dict(text=_text(151936, 1536, 8960, 28, 12, 2, 32768, True), vision=_QWEN2_VISION,
                            tokens=_QWEN_TOKENS),
        "tiny-qwen2-vl": dict(text=_TINY_TEXT, tokens=dict(TINY_TOKEN_IDS),
                              vision=dict(_QWEN2_VISION, depth=2, embed_dim=32, mlp_ratio=2, num_heads=2)),
    }

    @classmethod
    def model_classes(cls):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration

    @classmethod
    def pixel_bounds(cls, config, task: str) -> tuple[int, int]:
        """The authors' evaluation: 1280 to 16384 tokens, every task."""
        return 1280 * _PX, 16384 * _PX


def _grid_rows(grid_thw, merge: int) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
