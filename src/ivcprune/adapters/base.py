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

    @property
    def attn_implementation(self) -> str | None:
        return getattr(self.model.config, "_attn_implementation", None)

    # -- spans and positions -------------------------------------------------------------------
    def grid_queues(self, entry_kwargs: dict) -> dict[str, list]:
        """Per media kind, the token grids of this forward's media in prompt order (all rows, row by row);
        :meth:`find_spans` consumes them row after row. Empty where the inputs carry none."""
        return {}

    def find_spans(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[Span]:
        """Visual spans of one row's real tokens (1-D ``input_ids``, padding removed)."""
        raise NotImplementedError

    def axes_positions(self, rotary_position_ids: torch.Tensor) -> torch.Tensor:
        """``(A, B, S)`` position ids, from what the rotary module received (on the CPU)."""
        raise NotImplementedError

    def rope_info(self) -> RopeInfo:
        raise NotImplementedError

    def span_grid(self, positions: torch.Tensor) -> tuple[int, int, int] | None:
        """(t, h, w) token grid of a span from its ``(A, L)`` position ids, when they encode one."""
        return None

    def decode_position_ids(self, start: torch.Tensor, q_len: int, device: torch.device) -> torch.Tensor:
        """Position ids for ``q_len`` new tokens of each row, after ``start`` ``(B,)`` real prompt + generated
        tokens of that row (what the row would get unpruned)."""
        raise NotImplementedError

    # -- values ---------------------------------------------------------------------------------
    def value_module(self, layer_idx: int) -> nn.Module:
        """Module whose output is the value projection of decoder layer ``layer_idx``."""
        raise NotImplementedError

    def split_heads(self, value_out: torch.Tensor) -> torch.Tensor:
        """``(B, S, H*d)`` value projection output -> ``(B, H, S, d)``."""
        B, S = value_out.shape[:2]
        return value_out.reshape(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
