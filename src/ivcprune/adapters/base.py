"""What the runtime needs to know about one architecture family."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


@dataclass(frozen=True)
class Span:
    """A run of visual tokens inside one forward's input chunk."""

    start: int  # index in the chunk
    length: int
    kind: str  # "image" or "video"
    grid: tuple[int, int, int] | None = None  # (t, h, w) tokens after merging


@dataclass(frozen=True)
class RopeInfo:
    inv_freq: torch.Tensor
    attention_scaling: float
    mrope_section: tuple[int, ...] | None  # frequencies per axis for M-RoPE, None for 1-D RoPE


class Adapter:
    """Base class: one subclass per architecture family.

    Attributes set by subclasses:
        model_type: ``config.model_type`` of the family.
        entry: the module whose forward receives ``input_ids`` (and the cache) for every call.
        layers: the decoder layers, in order.
        rotary: the module computing rotary cos/sin from position ids.
        num_kv_heads, head_dim: shapes of the value projection output.
    """

    model_type: str
    entry: nn.Module
    layers: nn.ModuleList
    rotary: nn.Module
    num_kv_heads: int
    head_dim: int

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- spans and positions -------------------------------------------------------------------
    def find_spans(self, input_ids: torch.Tensor, entry_kwargs: dict) -> list[Span]:
        raise NotImplementedError

    def axes_positions(self, rotary_position_ids: torch.Tensor) -> torch.Tensor:
        """``(A, S)`` position ids of batch row 0, from what the rotary module received."""
        raise NotImplementedError

    def rope_info(self) -> RopeInfo:
        raise NotImplementedError

    def span_grid(self, positions: torch.Tensor) -> tuple[int, int, int] | None:
        """(t, h, w) token grid of a span from its ``(A, L)`` position ids, when they encode one."""
        return None

    def decode_position_ids(self, unpruned_past: int, q_len: int, device: torch.device) -> torch.Tensor:
        """Position ids for ``q_len`` new tokens after ``unpruned_past`` prompt+generated tokens."""
        raise NotImplementedError

    # -- values ---------------------------------------------------------------------------------
    def value_module(self, layer_idx: int) -> nn.Module:
        """Module whose output is the value projection of decoder layer ``layer_idx``."""
        raise NotImplementedError

    def split_heads(self, value_out: torch.Tensor) -> torch.Tensor:
        """``(1, S, H*d)`` value projection output -> ``(H, S, d)`` for batch row 0."""
        return value_out[0].reshape(value_out.shape[1], self.num_kv_heads, self.head_dim).transpose(0, 1)

    # -- per-layer tensors that carry the sequence dimension -----------------------------------
    def cut_position_embeddings(self, pe, keep: torch.Tensor):
        """Cut rotary (cos, sin) to the kept tokens (sequence is dim -2)."""
        return tuple(t.index_select(-2, keep.to(t.device)) for t in pe)
