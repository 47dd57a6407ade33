"""Gemma 3 (transformers' ``Gemma3ForConditionalGeneration``, e.g. ``google/gemma-3-12b-it``): everything about it.

An image is ``<start_of_image>`` + ``mm_tokens_per_image`` (256) image soft tokens + ``<end_of_image>``: the
SigLIP tower's 64x64 patches average-pooled to a 16x16 grid. Pan-and-scan crops are images of their own (each
its own span, each a 16x16 grid).

Three things of the decoder make a cut sequence differ from a plain causal one, and all three are kept exact
here (the pruned model equals the unpruned one with the pruned tokens masked out from layer K on):

- image tokens attend to each other bidirectionally inside their image (``token_type_ids``; only when the
  caller passes them, as the processor and ``generate``'s prefill do);
- sliding-window layers (5 local : 1 global) see keys less than ``sliding_window`` positions back. The window
  is measured in *original* positions: the cut masks carry each slot's original index;
- sliding layers' cache (``DynamicSlidingWindowLayer``) keeps the last ``sliding_window - 1`` slots and a
  ``cumulative_length``. After the cut it keeps the last ``sliding_window - 1`` kept slots and the kept length.
  Every key a later query can see (original distance below the window) is among them, so decoding past the
  window stays exact too.

Each layer type has its rotary (local base 10 000, global base 1 000 000 with linear scaling); the layers get
theirs and the runtime captures them per layer. IVC's rotation statistic uses the global layers' rotary by
default (:attr:`Gemma3.ivc_rotary`).

Flash attention cannot take the bidirectional image blocks with a cut (it reads a 2-D padding mask): pruning a
flash model is refused; use sdpa or eager.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..cut import is_flash
from ..tiny import TOKEN_IDS as TINY_TOKEN_IDS
from .base import (
    AttentionCut,
    Rope1DFamily,
    RopeInfo,
    Span,
    UnsupportedModelError,
    letter_mcq_prompt,
    override_spec,
    token_runs,
)

FULL, SLIDING = "full_attention", "sliding_attention"

# google/gemma-3-12b-it's text config: 48 layers, 5 sliding : 1 global, two rotaries
_GEMMA3_12B = dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                   num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                   hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
                   query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
                   rope_parameters={FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                    SLIDING: {"rope_type": "default", "rope_theta": 10000.0}})
# SigLIP so400m at 896 px, patches of 14: 64x64 patches, no pooling head
_SIGLIP_896 = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                   num_attention_heads=16, image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False)
_GEMMA3_TOKENS = dict(image_token_id=262144, boi_token_id=255999, eoi_token_id=256000, mm_tokens_per_image=256,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
_TINY_TOKENS = dict(image_token_id=TINY_TOKEN_IDS["image_token_id"],
                    boi_token_id=TINY_TOKEN_IDS["vision_start_token_id"],
                    eoi_token_id=TINY_TOKEN_IDS["vision_end_token_id"], mm_tokens_per_image=16,
                    bos_token_id=TINY_TOKEN_IDS["bos_token_id"], eos_token_id=TINY_TOKEN_IDS["eos_token_id"],
                    pad_token_id=TINY_TOKEN_IDS["pad_token_id"])
# tiny: sliding and global layers alternating (1:1, so that 4 layers hold both on each side of K=2), a window of 8
# positions (shorter than the tests' prompts and images), query_pre_attn_scalar other than head_dim
_TINY_TEXT = dict(_GEMMA3_12B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                  sliding_window=8, sliding_window_pattern=2)
# 32-pixel images of 4-pixel patches: 8x8 patches pooled to 4x4 = 16 tokens
_TINY_VISION = dict(_SIGLIP_896, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=4)

IVC_ROTARIES = ("global", "local", "both")


def block_ids(token_type_ids: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` image block of every token: runs of ``token_type_ids == 1`` numbered from 0 per row, -1
    elsewhere (the tokens that attend to each other bidirectionally)."""
    image = token_type_ids == 1
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    return torch.where(image, starts.long().cumsum(1) - 1, torch.full_like(starts, -1, dtype=torch.long))


def cut_mask(cut: AttentionCut, window: int | None, blocks: torch.Tensor | None, offset: int = 0):
    """The mask of a cut forward for one layer type, over the keys that layer's cache hands it.

    Keys: every slot (global layers), or the last ``min(window - 1, past) + q_len`` slots (sliding layers: their
    cache keeps ``window - 1``). A query sees a valid key at an earlier-or-equal original position, or any key of
    its own image block (``blocks``: ``(B, S)`` block ids of the unpruned chunk starting at original index
    ``offset``), and in a sliding layer only keys less than ``window`` original positions back. Padding queries
    see themselves only. sdpa: a 4-D bool mask; eager: 4-D additive float."""
    valid, origin, q = cut.valid_kv.to(cut.device), cut.origin_kv.to(cut.device), cut.q_len
    T = valid.shape[1]
    n = T if window is None else min(window - 1, T - q) + q
    kv_valid, kv_origin, q_origin = valid[:, T - n:], origin[:, T - n:], origin[:, T - q:]
    allowed = kv_origin[:, None, :] <= q_origin[:, :, None]
    if blocks is not None:
        blocks = blocks.to(origin.device)

        def block_of(o):
            local = o - offset
            inside = (local >= 0) & (local < blocks.shape[1])
            return torch.where(inside, torch.gather(blocks, 1, local.clamp(0, blocks.shape[1] - 1)), -1)

        bq, bk = block_of(q_origin), block_of(kv_origin)
        allowed |= (bq[:, :, None] == bk[:, None, :]) & (bq[:, :, None] >= 0)
    if window is not None:
        allowed &= (q_origin[:, :, None] - kv_origin[:, None, :]) < window
    allowed &= kv_valid[:, None, :]
    own = torch.zeros_like(allowed)
    own[:, torch.arange(q, device=own.device), torch.arange(n - q, n, device=own.device)] = True
    allowed |= own & ~valid[:, T - q:, None]
    allowed = allowed[:, None]  # (B, 1, q, n)
    if cut.attn_implementation == "sdpa":
        return allowed
    out = torch.zeros(allowed.shape, dtype=cut.dtype, device=allowed.device)
    return out.masked_fill_(~allowed, torch.finfo(cut.dtype).min)


class Gemma3(Rope1DFamily):
    """Gemma 3: one run of image soft tokens per image or pan-and-scan crop (a square grid), a decoder with
    sliding-window and global layers, bidirectional attention inside each image."""

    model_type = "gemma3"
    display_name = "Gemma 3"
    box_format = "bbox_2d"
    box_frame = "pixels"
    image_patch_size = 14
    # which rotary IVC's rotation statistic uses: the global layers' ("global", base 1e6 with linear scaling,
    # like the Qwen2.5-VL rotary the paper validated), the sliding layers' ("local", base 1e4), or both tables
    # together ("both": the mean over every frequency of the two)
    ivc_rotary: ClassVar[str] = "global"
    random_configs = {
        "gemma-3-12b": dict(text=_GEMMA3_12B, vision=_SIGLIP_896, tokens=_GEMMA3_TOKENS),
        "tiny-gemma3": dict(text=_TINY_TEXT, vision=_TINY_VISION, tokens=_TINY_TOKENS),
    }

    @classmethod
    def model_classes(cls):
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        return Gemma3Config, Gemma3ForConditionalGeneration

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        spec = override_spec(spec, overrides)
        config_cls, _ = cls.model_classes()
        tokens = dict(spec["tokens"])
        special = {k: tokens.pop(k) for k in ("image_token_id", "boi_token_id", "eoi_token_id", "mm_tokens_per_image")}
        return config_cls(text_config={**spec["text"], **tokens}, vision_config=spec["vision"],
                          mm_tokens_per_image=special["mm_tokens_per_image"],
                          image_token_index=special["image_token_id"], boi_token_index=special["boi_token_id"],
                          eoi_token_index=special["eoi_token_id"])

    @classmethod
    def init_random_weights(cls, model: nn.Module, std: float) -> None:
        """transformers initialises the projector's matrix to zeros (every image token would embed alike):
        random normal here, like the other weights."""
        entry = model.model if hasattr(model, "lm_head") else model
        with torch.no_grad():
            entry.multi_modal_projector.mm_input_projection_weight.normal_(0.0, std)

    @classmethod
    def grid_side(cls, config) -> int:
        return int(round(config.mm_tokens_per_image**0.5))

    @classmethod
    def synthetic_inputs(cls, config, image_tokens: int, text_tokens: int, seed: int = 0):
        """``... <start_of_image> <image>*N <end_of_image> question ...`` with N = ``mm_tokens_per_image``
        (``image_tokens`` is ignored: Gemma 3 has one fixed size per image), ``token_type_ids`` as the processor
        makes them, noise pixels. ``(inputs, (h, w))``, on the CPU."""
        side = cls.grid_side(config)
        g = torch.Generator().manual_seed(seed)
        high = min(config.get_text_config().vocab_size, config.boi_token_id, config.image_token_id) - 1
        text = torch.randint(10, high, (text_tokens + 4,), generator=g).tolist()
        image = [config.boi_token_id] + [config.image_token_id] * side * side + [config.eoi_token_id]
        ids = torch.tensor([text[:4] + image + text[4:]])
        size = config.vision_config.image_size
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "token_type_ids": (ids == config.image_token_id).long(),
                  "pixel_values": torch.randn(1, config.vision_config.num_channels, size, size, generator=g)}
        return inputs, (side, side)

    @classmethod
    def mcq_prompt(cls, question: str, options: dict[str, str], hint: str | None = None) -> str:
        """A letter multiple-choice prompt (VLMEvalKit's generic one)."""
        return letter_mcq_prompt(question, options, hint)

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        lm = self.bind_language_model("a Gemma 3 model")
        text = self.config.get_text_config()
        if getattr(text, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with use_bidirectional_attention (an encoder) has no causal "
                                        "decoding to prune for")
        self.layer_types = list(text.layer_types)
        self.sliding_window = text.sliding_window
        self.image_token_id = self.config.image_token_id
        self.side = self.grid_side(self.config)
        self.rotary_module = lm.rotary_emb

    # -- spans and rotary --------------------------------------------------------------------------------
    def find_spans(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[Span]:
        spans: list[Span] = []
        per_image = self.side * self.side
        for start, length in token_runs(input_ids.reshape(-1) == self.image_token_id):
            n = per_image if length % per_image == 0 else length
            for first in range(start, start + length, n):
                spans.append(Span(first, n, "image", (1, self.side, self.side) if n == per_image else None))
        return spans

    def rope_info(self) -> RopeInfo:
        """The rotary of :attr:`ivc_rotary` (its inverse frequencies as the model computes them, scaling
        included)."""
        choice = self.ivc_rotary
        if choice not in IVC_ROTARIES:
            raise ValueError(f"Gemma3.ivc_rotary must be one of {IVC_ROTARIES}, got {choice!r}")
        kinds = {"global": [FULL], "local": [SLIDING], "both": [FULL, SLIDING]}[choice]
        inv = torch.cat([getattr(self.rotary, f"{k}_inv_freq") for k in kinds])
        scales = {float(getattr(self.rotary, f"{k}_attention_scaling")) for k in kinds}
        if len(scales) != 1:
            raise ValueError("ivc_rotary='both' needs both rotaries to scale cos/sin alike")
        return RopeInfo(inv_freq=inv, attention_scaling=scales.pop(), mrope_section=None,
                        dtype=self.layers[0].self_attn.v_proj.weight.dtype)

    # -- masks and caches of a cut forward ---------------------------------------------------------------
    def mask_context(self, entry_kwargs: dict) -> Any:
        types = entry_kwargs.get("token_type_ids")
        return None if types is None else block_ids(types.cpu())

    def mask_kind(self, layer_idx: int) -> Any:
        return self.layer_types[layer_idx]

    def _check_implementation(self, cut: AttentionCut) -> None:
        if is_flash(cut.attn_implementation) or cut.attn_implementation not in ("sdpa", "eager"):
            raise UnsupportedModelError(
                f"Gemma 3 with attn_implementation={cut.attn_implementation!r} cannot be pruned exactly (its "
                "cut masks need bidirectional image blocks and sliding windows in original positions); load it "
                "with attn_implementation='sdpa' or 'eager'"
            )

    def _window(self, kind: str) -> int | None:
        return self.sliding_window if kind == SLIDING else None

    def layer_attention_mask(self, layer_idx: int, mask: Any, cut: AttentionCut) -> Any:
        self._check_implementation(cut)
        past = cut.valid_kv.shape[1] - cut.q_len
        return cut_mask(cut, self._window(self.layer_types[layer_idx]), cut.context, offset=past)

    def decode_attention_mask(self, mask: torch.Tensor | None, cut: AttentionCut) -> Any:
        """Both layer types' masks over the cut cache (the window in original positions), as a dict the model
        uses as it is."""
        self._check_implementation(cut)
        return {kind: cut_mask(cut, self._window(kind), None) for kind in sorted(set(self.layer_types))}

    def attention_window(self, layer: nn.Module) -> int | None:
        attn = layer.self_attn
        return attn.sliding_window if getattr(attn, "is_sliding", False) else None

    def cache_layer_supported(self, layer: Any) -> bool:
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        if type(layer) is DynamicSlidingWindowLayer:
            return not layer.record_past
        return type(layer) is DynamicLayer

    def cut_cache_layer(self, layer: Any, index: torch.Tensor) -> None:
        """A sliding layer holds the last ``window - 1`` slots of the unpruned sequence: it keeps the last
        ``window - 1`` cut slots; those it no longer holds are further back than any later query's window (their
        keys are a placeholder, always masked). Its ``cumulative_length`` becomes the cut length."""
        from transformers.cache_utils import DynamicSlidingWindowLayer

        if type(layer) is not DynamicSlidingWindowLayer:
            return super().cut_cache_layer(layer, index)
        total, held = layer.cumulative_length, layer.keys.shape[2]
        keep = index[:, -min(layer.sliding_window - 1, index.shape[1]):] - (total - held)
        super().cut_cache_layer(layer, keep.clamp(min=0))
        layer.cumulative_length = index.shape[1]
