"""Everything ivcprune knows about one model family, behind one class.

A family class answers two kinds of questions:

- facts (class level, no model needed): the transformers classes, the ``random:NAME`` shapes and the tiny
  test config, prompts per task, the answer / box format and frame, image size bounds of the authors'
  evaluation;
- the runtime's questions about a loaded model (an instance wraps the model): where the visual spans,
  rotary positions, value projections, decoder layers and decode positions are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no family."""


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
    dtype: torch.dtype = torch.float32  # the model's: rotary cos/sin are cast to it (authors' numerics)


MCQ_INSTRUCTION = {"en": "Please select the correct answer from the options above.", "zh": "请直接回答选项字母。"}
YESNO_SUFFIX = " Please answer yes or no."


class Family:
    """Base class: one subclass per model family (registered in :mod:`ivcprune.families`).

    Class attributes (facts):
        model_type: ``config.model_type`` of the family.
        display_name: e.g. ``"Qwen2.5-VL"``.
        grounding_prompt: this project's grounding prompt template (``{ref}``), ``--grounding-prompt ivcprune``.
        authors_grounding_prompt: the template of the authors' evaluation (``--grounding-prompt authors``, the
            default); ``None`` where they had none (this project's is used).
        box_format: how answers spell boxes (a parser name of :mod:`ivcprune.boxes`).
        box_frame: ``"pixels"`` (the resized image the model saw) or ``"1000"`` (0-1000 relative).
        image_patch_size: pixels per vision patch (qwen-vl-utils resizes to multiples of twice this).
        random_configs: ``random:NAME`` specs of released checkpoints' shapes (and ``tiny-*`` test models).

    Attributes of an instance (set by subclasses from the wrapped model):
        entry: the module whose forward receives ``input_ids`` (and the cache) for every call.
        layers: the decoder layers, in order.
        rotary: the module computing rotary cos/sin from position ids.
        num_kv_heads, head_dim: shapes of the value projection output.
    """

    model_type: ClassVar[str]
    display_name: ClassVar[str]
    grounding_prompt: ClassVar[str] = "Locate {ref} in the image and output its bbox coordinates in JSON format."
    authors_grounding_prompt: ClassVar[str | None] = None
    box_format: ClassVar[str] = "bbox_2d"
    box_frame: ClassVar[str] = "pixels"
    image_patch_size: ClassVar[int] = 14
    random_configs: ClassVar[dict[str, dict[str, Any]]] = {}

    entry: nn.Module
    layers: nn.ModuleList

    @classmethod
    def grounding_prompts(cls) -> dict[str, str]:
        """Grounding templates by name: ``authors`` (their evaluation's) and ``ivcprune`` (this project's)."""
        return {"authors": cls.authors_grounding_prompt or cls.grounding_prompt, "ivcprune": cls.grounding_prompt}

    @classmethod
    def grounding_ref(cls, template: str, ref: str) -> str:
        """The referring expression as ``template`` gets it (unchanged here)."""
        return ref
    rotary: nn.Module
    num_kv_heads: int
    head_dim: int

    def __init__(self, model: nn.Module):
        self.model = model

    # -- facts -------------------------------------------------------------------------------------
    @classmethod
    def model_classes(cls) -> tuple[type, type]:
        """``(config class, model class)`` of transformers for this family."""
        raise NotImplementedError

    @classmethod
    def pixel_bounds(cls, config, task: str) -> tuple[int, int]:
        """``(min_pixels, max_pixels)`` of images for ``task`` (``grounding``, ``mcq``, ``yesno``)."""
        return 4 * 28 * 28, 16384 * 28 * 28

    @classmethod
    def mcq_prompt(cls, question: str, options: dict[str, str], hint: str | None = None) -> str:
        """The multiple-choice prompt (VLMEvalKit's for Qwen-VL models)."""
        text = f"Hint: {hint}\n" if hint else ""
        text += f"Question: {question}\n"
        if options:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
            text += MCQ_INSTRUCTION["zh" if re.search("[\u4e00-\u9fff]", text) else "en"]
        return text.rstrip()

    @classmethod
    def yesno_prompt(cls, question: str) -> str:
        """A yes/no question, asked for a yes or no unless it already asks (MME)."""
        q = question.rstrip()
        return q if re.search(r"yes\s+or\s+no", q, re.I) else q + YESNO_SUFFIX

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        """A transformers config from a :attr:`random_configs` spec, plus ``FIELD`` / ``vision.FIELD`` overrides."""
        raise NotImplementedError

    @classmethod
    def synthetic_inputs(cls, config, image_tokens: int, text_tokens: int, seed: int = 0):
        """``(inputs, (h, w))``: a batch-of-one prompt with one image of about ``image_tokens`` visual tokens
        in the family's token layout, noise pixels (benchmarks of models without a processor)."""
        raise NotImplementedError

    # -- a loaded model ----------------------------------------------------------------------------

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


Adapter = Family  # the runtime's name for a family bound to a model
