"""Qwen2-VL and Qwen2.5-VL (transformers' Qwen2VL* / Qwen2_5_VL* classes)."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, RopeInfo, Span, UnsupportedModelError


class QwenVLAdapter(Adapter):
    """Image/video tokens are runs of ``image_token_id`` / ``video_token_id``; the LLM uses M-RoPE
    with (t, h, w) position ids; values come from ``self_attn.v_proj``."""

    MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        self.model_type = self.config.model_type
        # ...ForConditionalGeneration wraps the base model as `.model`; accept the base model too.
        entry = model.model if hasattr(model, "lm_head") else model
        lm = getattr(entry, "language_model", None)
        if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected a Qwen-VL model with .language_model.layers and "
                ".language_model.rotary_emb (transformers 5.x layout)"
            )
        self.entry = entry
        self.layers = lm.layers
        self.rotary = lm.rotary_emb
        text = self.config.get_text_config()
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
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
            for start, length in _runs(ids == token_id):
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


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool tensor."""
    if not bool(mask.any()):
        return []
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _grid_rows(grid_thw, merge: int) -> list[tuple[int, int, int]]:
    if grid_thw is None:
        return []
    return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]
