"""Qwen3-VL, dense and MoE (transformers' ``Qwen3VL*`` / ``Qwen3VLMoe*`` classes): everything about them.

What differs from Qwen2.5-VL (whose :class:`~ivcprune.families.qwen_vl.QwenVL` base this reuses):

- **Interleaved M-RoPE.** The rotary module gives head-dimension frequency ``j`` to the h axis when
  ``j % 3 == 1`` and ``j < 3 * mrope_section[1]``, to the w axis when ``j % 3 == 2`` and ``j < 3 *
  mrope_section[2]``, to t otherwise (``[24, 20, 20]``: t, h, w round-robin over the first 60 frequencies, the
  last 4 to t), not in contiguous sections. :meth:`Qwen3VL.rope_info` hands the selection that
  frequency->axis map (:func:`interleaved_axes`), so the ``applied`` IVC statistic follows the rotation the
  model really applies; the ``authors`` statistic (all axes, all frequencies) does not depend on it.
- **DeepStack.** The vision tower's intermediate features are added to the hidden states of the visual
  positions after the first ``len(vision_config.deepstack_visual_indexes)`` decoder layers (0..2 on the
  released checkpoints), with a mask over the whole, uncut sequence. While a pruner is applied, the family
  takes those additions over (:meth:`Qwen3VL.cut_hooks`): the language model's own are switched off and
  the same sums are made after each of those layers at the visual positions still in the sequence, with
  the matching rows of the features. So a cut before any layer (FastV at K=2, DivPrune / CDPruner before
  layer 0) runs exactly as the unpruned model with the pruned tokens masked: kept tokens get their
  additions, pruned ones are gone.
- **Videos.** The processor writes every frame (temporal patch) as its own ``<|vision_start|> ...
  <|vision_end|>`` block, preceded by a text timestamp (``<0.5 seconds>``); the model splits
  ``video_grid_thw`` per frame. Each frame is one span with grid ``(1, h, w)``.
- **Boxes** are answered as JSON ``bbox_2d`` in a 0-1000 frame of the image (Qwen2.5-VL: pixels).
- 16-pixel patches (32 pixels per merged token); ``mm_token_type_ids`` is required with media.

The IVC-Prune preset is by analogy, not validated on real checkpoints (see ``methods/ivc.py``).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from ..tiny import TOKEN_IDS as TINY_TOKEN_IDS
from .base import RopeInfo
from .qwen_vl import _QWEN_TOKENS, QwenVL
from .qwen_vl import _text as qwen_text

_PX = 32 * 32  # pixels of one merged visual token (16-pixel patches, 2x2 merge)


def _text(vocab, hidden, ffn, layers, heads, kv_heads, head_dim, max_pos, tied, theta=5000000.0,
          section=(24, 20, 20), **extra):
    """Qwen2.5-VL's text spec with Qwen3-VL's differences: an explicit head size, interleaved M-RoPE sections."""
    spec = qwen_text(vocab, hidden, ffn, layers, heads, kv_heads, max_pos, tied, theta=theta, section=section)
    spec["rope_parameters"]["mrope_interleaved"] = True
    return {**spec, "head_dim": head_dim, **extra}


# The Qwen3-VL vision tower (SigLIP-2 sized, 16-pixel patches, learned position grid of 48x48, DeepStack mergers
# after blocks 8, 16, 24); `out_hidden_size` follows the LLM width.
_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, patch_size=16,
               spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
               deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh")
# Tiny models: three DeepStack layers as the released ones (after decoder layers 0..2), 8 frequencies per head
# so that the interleaved map has its tail on t as [24, 20, 20] has ([4, 2, 2]: t 0,3,6,7; h 1,4; w 2,5).
_TINY_VISION = dict(_VISION, depth=3, hidden_size=32, intermediate_size=64, num_heads=2, num_position_embeddings=64,
                    deepstack_visual_indexes=[0, 1, 2])
_TINY_TEXT = _text(512, 64, 128, 4, 4, 2, 16, 4096, False, theta=10000.0, section=(4, 2, 2))


def interleaved_axes(mrope_section, n_freq: int) -> tuple[int, ...]:
    """Axis (0 t, 1 h, 2 w) of each of the ``n_freq`` rotary frequencies under interleaved M-RoPE: h takes
    frequencies ``1, 4, 7, ...`` below ``3 * mrope_section[1]``, w ``2, 5, 8, ...`` below ``3 *
    mrope_section[2]``, t the rest."""
    axes = [0] * n_freq
    for axis in (1, 2):
        for j in range(axis, min(n_freq, 3 * int(mrope_section[axis])), 3):
            axes[j] = axis
    return tuple(axes)


class Qwen3VL(QwenVL):
    """Qwen3-VL (dense): interleaved M-RoPE, DeepStack, per-frame video blocks, boxes in a 0-1000 frame."""

    model_type = "qwen3_vl"
    display_name = "Qwen3-VL"
    # Qwen3-VL's own grounding examples: locate the object, bbox coordinates in JSON (answers: "bbox_2d", 0-1000)
    grounding_prompt = "Locate {ref} in the image and output its bbox coordinates in JSON format."
    box_format = "bbox_2d"
    box_frame = "1000"
    image_patch_size = 16
    vision_out_key = "out_hidden_size"
    random_configs = {
        # Qwen/Qwen3-VL-8B-Instruct
        "qwen3-vl-8b": dict(text=_text(151936, 4096, 12288, 36, 32, 8, 128, 262144, False), vision=_VISION,
                            tokens=_QWEN_TOKENS),
        "tiny-qwen3-vl": dict(text=_TINY_TEXT, vision=_TINY_VISION, tokens=dict(TINY_TOKEN_IDS)),
    }

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        """As Qwen-VL; a vision tower made shallower than its DeepStack layers (``--set vision.depth=4``) keeps as
        many DeepStack layers at the same relative depths (``[8, 16, 24]`` of 27 -> ``[1, 2, 3]`` of 4), so that
        reduced random models still add visual features after the first decoder layers."""
        config = super().build_config(spec, overrides)
        vc = config.vision_config
        indexes = list(vc.deepstack_visual_indexes or ())
        if indexes and max(indexes) >= vc.depth:
            full = int(spec["vision"]["depth"])
            scaled = sorted({min(vc.depth - 1, round(i * vc.depth / full)) for i in indexes})
            vc.deepstack_visual_indexes = scaled if len(scaled) == len(indexes) else list(range(min(len(indexes),
                                                                                                    vc.depth)))
        return config

    @classmethod
    def model_classes(cls):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration

    @classmethod
    def pixel_bounds(cls, config, task: str) -> tuple[int, int]:
        """qwen-vl-utils' bounds for 16-pixel patches: 4 to 16384 merged tokens of 32x32 pixels, every task (no
        evaluation of the authors to follow)."""
        return 4 * _PX, 16384 * _PX

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.deepstack_layers = len(self.config.vision_config.deepstack_visual_indexes or ())
        self._local = threading.local()

    @property
    def feature_layers(self) -> int:
        return self.deepstack_layers

    # -- spans ---------------------------------------------------------------------------------
    def grid_queues(self, entry_kwargs: dict) -> dict[str, list]:
        """Images as Qwen-VL; a video's ``(t, h, w)`` grid is ``t`` frames of ``(1, h, w)``, each its own span."""
        queues = super().grid_queues(entry_kwargs)
        queues["video"] = [(1, h, w) for t, h, w in queues["video"] for _ in range(t)]
        return queues

    def rope_info(self) -> RopeInfo:
        info = super().rope_info()
        section = info.mrope_section
        if section is None:
            return info
        return RopeInfo(info.inv_freq, info.attention_scaling, section, info.dtype,
                        axis_of_freq=interleaved_axes(section, info.inv_freq.numel()))

    # -- DeepStack ------------------------------------------------------------------------------
    def cut_hooks(self, current_cut):
        """The DeepStack additions, made by the family so that they follow the cut (see the module notes): a
        pre-hook on the language model takes ``visual_pos_masks`` / ``deepstack_visual_embeds`` out of its call,
        and a hook after each DeepStack layer adds the features at the visual positions of the current (cut or
        uncut) sequence, as the model's own ``_deepstack_process`` does on the uncut one."""
        local = self._local

        def take(module, args, kwargs):
            embeds = kwargs.get("deepstack_visual_embeds")
            mask = kwargs.get("visual_pos_masks")
            local.deepstack = (mask, embeds) if embeds is not None and mask is not None else None
            if embeds is None and mask is None:
                return None
            return args, {**kwargs, "deepstack_visual_embeds": None, "visual_pos_masks": None}

        def add(idx):
            def hook(module, args, kwargs, output):
                feats = getattr(local, "deepstack", None)
                if feats is None or idx >= len(feats[1]):
                    return None
                return deepstack_add(output, feats[0], feats[1][idx], current_cut())

            return hook

        def done(module, args, kwargs, output):
            local.deepstack = None
            return None

        hooks = [(self.language_model, "pre", take), (self.language_model, "post", done)]
        hooks += [(self.layers[i], "post", add(i)) for i in range(min(self.deepstack_layers, self.num_layers))]
        return hooks


def deepstack_add(hidden: torch.Tensor, mask: torch.Tensor, embeds: torch.Tensor, cut) -> torch.Tensor:
    """``hidden`` ``(B, M, D)`` with ``embeds`` (one row per True of ``mask``, ``(B, S)`` over the uncut sequence,
    row-major) added at the visual positions; ``cut``: ``(index, valid)`` ``(B, M)`` of the current sequence's
    slots over the uncut one (``None``: uncut), so that only the kept visual positions get their rows."""
    mask = mask.to(hidden.device)
    embeds = embeds.to(hidden.device, hidden.dtype)
    if cut is not None:
        index, valid = (t.to(hidden.device) for t in cut)
        ordinal = (mask.reshape(-1).long().cumsum(0) - 1).view_as(mask)  # each visual position's row in embeds
        kept = mask.gather(1, index) & valid
        embeds = embeds[ordinal.gather(1, index)[kept]]
        mask = kept
    out = hidden.clone()
    out[mask, :] = out[mask, :] + embeds
    return out


class Qwen3VLMoe(Qwen3VL):
    """Qwen3-VL MoE: the dense family's layout with sparse MoE feed-forward blocks; values still come from the
    attention block's ``v_proj``."""

    model_type = "qwen3_vl_moe"
    display_name = "Qwen3-VL-MoE"
    random_configs = {
        # Qwen/Qwen3-VL-30B-A3B-Instruct: 128 experts, 8 per token
        "qwen3-vl-30b-a3b": dict(
            text=_text(151936, 2048, 6144, 48, 32, 4, 128, 262144, False, moe_intermediate_size=768, num_experts=128,
                       num_experts_per_tok=8, decoder_sparse_step=1),
            vision=_VISION, tokens=_QWEN_TOKENS),
        "tiny-qwen3-vl-moe": dict(
            text=dict(_TINY_TEXT, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      decoder_sparse_step=1),
            vision=_TINY_VISION, tokens=dict(TINY_TOKEN_IDS)),
    }

    @classmethod
    def model_classes(cls):
        from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

