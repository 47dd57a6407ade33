"""Everything ivcprune knows about one model family, behind one class.

A family class answers two kinds of questions:

- facts (class level, no model needed): the transformers classes, the ``random:NAME`` shapes and the tiny
  test config, prompts per task, the answer / box format and frame, image size bounds of the authors'
  evaluation;
- the runtime's questions about a loaded model (an instance wraps the model): where the visual spans,
  rotary positions, value projections, decoder layers and decode positions are.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import cut as _cut
from ..tiles import TileLayout


class UnsupportedModelError(ValueError):
    """The model's architecture has no family."""


@dataclass(frozen=True)
class Span:
    """A run of visual tokens inside one forward's input chunk."""

    start: int  # index in the chunk
    length: int
    kind: str  # "image" or "video"
    grid: tuple[int, int, int] | None = None  # (t, h, w) tokens after merging
    tiles: TileLayout | None = None  # high-resolution tiles (+ thumbnail) of a tiled image
    # structure tokens inside the span (span-local indices, e.g. LLaVA-OneVision's row newlines): the runtime
    # always keeps them and hides them from the method, which sees the span without them
    fixed: tuple[int, ...] = ()
    layout: Any = None  # a family's own layout of the span (in the method's coordinates, ``fixed`` left out)


@dataclass(frozen=True)
class RopeInfo:
    inv_freq: torch.Tensor
    attention_scaling: float
    mrope_section: tuple[int, ...] | None  # frequencies per axis for M-RoPE, None for 1-D RoPE
    dtype: torch.dtype = torch.float32  # the model's: rotary cos/sin are cast to it (authors' numerics)
    # the axis of each frequency where M-RoPE does not give them in contiguous sections (Qwen3-VL's interleaved
    # layout); None: contiguous sections of ``mrope_section``
    axis_of_freq: tuple[int, ...] | None = None


@dataclass(frozen=True)
class AttentionCut:
    """What the attention mask of a cut forward depends on (the runtime hands it to the family's mask hooks).

    Slots are the cut cache's, this forward's ``q_len`` tokens last; rows are re-left-padded."""

    valid_kv: torch.Tensor  # (B, T) bool: real slots
    origin_kv: torch.Tensor  # (B, T) long: each slot's index in the unpruned sequence (padding included)
    q_len: int
    attn_implementation: str | None
    dtype: torch.dtype
    device: torch.device | str
    context: Any = None  # what :meth:`Family.mask_context` returned at the prefill

    def default(self) -> torch.Tensor | None:
        """One causal padding mask for every layer (:func:`ivcprune.cut.attention_mask`)."""
        return _cut.attention_mask(self.valid_kv, self.q_len, attn_implementation=self.attn_implementation,
                                   dtype=self.dtype, device=self.device)


MCQ_INSTRUCTION = {"en": "Please select the correct answer from the options above.", "zh": "请直接回答选项字母。"}
YESNO_SUFFIX = " Please answer yes or no."


def letter_mcq_prompt(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """VLMEvalKit's multiple-choice prompt of LLaVA and InternVL: hint, question, one line per option,
    then the instruction to answer with the letter (in Chinese for Chinese questions)."""
    text = f"{hint}\n{question}" if hint else question
    text += "".join(f"\n{k}. {v}" for k, v in options.items())
    chinese = re.search("[\u4e00-\u9fff]", text) is not None
    if options:
        tail = MCQ_INSTRUCTION["zh"] if chinese else "Answer with the option's letter from the given choices directly."
    else:
        tail = "请直接回答问题。" if chinese else "Answer the question directly."
    return f"{text}\n{tail}"


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

    def bind_language_model(self, expected: str) -> nn.Module:
        """Find the decoder under ``model`` (``...ForConditionalGeneration`` or its base model) and set
        :attr:`entry`, :attr:`layers`, :attr:`rotary`, :attr:`head_dim`, :attr:`num_kv_heads`; returns it."""
        model = self.model
        entry = model.model if hasattr(model, "lm_head") else model
        lm = getattr(entry, "language_model", None)
        if lm is None or not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
            raise UnsupportedModelError(
                f"{type(model).__name__}: expected {expected} with .language_model.layers and "
                ".language_model.rotary_emb (transformers 5.x layout)"
            )
        self.entry, self.layers, self.rotary, self.language_model = entry, lm.layers, lm.rotary_emb, lm
        text = model.config.get_text_config()
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.num_kv_heads = text.num_key_value_heads
        return lm

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
    def init_random_weights(cls, model: nn.Module, std: float) -> None:
        """Give a freshly built random-weight model (``random:NAME``, tiny test models) weights its own
        initialisation leaves degenerate (e.g. zeros that would make every image token the same); none here."""

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

    def media_modules(self) -> list[nn.Module]:
        """Modules whose first input (pixel values) the runtime keeps for :meth:`layout_spans`: ``generate``
        runs the vision encoder before the prefill and hands the decoder only its features."""
        return []

    def layout_spans(self, spans: list[list[Span]], media: list[torch.Tensor]) -> list[list[Span]]:
        """The spans of every row (batch order) completed with what only the pixel values ``media`` (inputs
        of :meth:`media_modules` since the prefill began, in call order) tell; unchanged by default."""
        return spans

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

    def query_key(self, layer: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last token's queries ``(B, H, 1, d)`` and every token's keys ``(B, Hkv, S, d)`` of decoder layer
        ``layer`` for the hidden states ``(B, S, D)`` entering it, before the rotary embedding (the layer's input
        norm, projections and per-head q/k norms where the model has them)."""
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        B, S, _ = h.shape
        d = attn.head_dim
        q = attn.q_proj(h[:, -1:]).view(B, 1, -1, d)
        k = attn.k_proj(h).view(B, S, -1, d)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2)

    # -- attention masks and caches of a cut forward -------------------------------------------
    def mask_context(self, entry_kwargs: dict) -> Any:
        """What this family's cut masks need from a pruned prefill's inputs (kept with the cache for its decode
        steps); ``None`` by default."""
        return None

    def mask_kind(self, layer_idx: int) -> Any:
        """Layers of the same kind get the same cut mask (the runtime builds it once per kind and forward)."""
        return None

    def layer_attention_mask(self, layer_idx: int, mask: Any, cut: AttentionCut) -> Any:
        """The mask decoder layer ``layer_idx`` gets in a cut prefill (``mask``: what the model passed it);
        by default one causal padding mask for every layer."""
        return cut.default()

    def decode_attention_mask(self, mask: torch.Tensor | None, cut: AttentionCut) -> Any:
        """The ``attention_mask`` the decoder's entry gets for a decode step over a pruned cache: ``mask`` is
        the 2-D mask over the cut cache the runtime made of the caller's (``None`` when the caller passed none);
        returned as it is by default (the model builds its masks from it)."""
        return mask

    def attention_window(self, layer: nn.Module) -> int | None:
        """Keys further than this many positions (original positions) before a query are out of its sight in
        decoder layer ``layer`` (a sliding-window layer); ``None``: none."""
        return None

    def cache_layer_supported(self, layer: Any) -> bool:
        """Whether the runtime can cut this KV-cache layer (:meth:`cut_cache_layer`)."""
        from transformers.cache_utils import DynamicLayer

        return type(layer) is DynamicLayer

    def cut_cache_layer(self, layer: Any, index: torch.Tensor) -> None:
        """Cut one cache layer, filled with every token, to the ``(B, M)`` gather index over its slots."""
        layer.keys, layer.values = _cut.cut_cache(layer.keys, layer.values, index)

    def final_norm(self) -> nn.Module:
        """The decoder's norm after its last layer."""
        return self.language_model.norm

    def cls_attention_parts(self) -> tuple[nn.Module, nn.Module]:
        """``(attention, projector)``: the self-attention module of the vision layer whose output becomes the
        visual tokens (its input carries the CLS token at index 0) and the projector those tokens go through
        (VisionZip reads the first and changes the second's input)."""
        raise UnsupportedModelError(
            f"{self.display_name}'s vision tower has no CLS token whose attention could rank its visual tokens"
        )

    @property
    def feature_layers(self) -> int:
        """Leading decoder layers after which the model still adds visual features to the hidden states
        (Qwen3-VL's DeepStack); presets prune after them. 0 for most families."""
        return 0

    def cut_hooks(self, current_cut) -> list[tuple[nn.Module, str, Any]]:
        """``(module, "pre" | "post", fn)`` hooks (with kwargs) the family needs while a pruner is applied, for
        model code that must follow the cut sequence (e.g. features added at visual positions inside the
        decoder). ``current_cut()``, called in the forwarding thread, returns ``(index, valid)``: the ``(B, M)``
        slots of the current sequence over this forward's uncut one, or ``None`` while nothing is cut. None
        by default."""
        return []

    def split_heads(self, value_out: torch.Tensor) -> torch.Tensor:
        """``(B, S, H*d)`` value projection output -> ``(B, H, S, d)``."""
        B, S = value_out.shape[:2]
        return value_out.reshape(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)


class LlavaPrompts:
    """VLMEvalKit's LLaVA-style prompts (mixed into LLaVA families): the letter multiple-choice prompt, and yes/no
    questions as written."""

    @classmethod
    def mcq_prompt(cls, question: str, options: dict[str, str], hint: str | None = None) -> str:
        return letter_mcq_prompt(question, options, hint)

    @classmethod
    def yesno_prompt(cls, question: str) -> str:
        return question.rstrip()


class Rope1DFamily(Family):
    """Families whose decoder uses plain 1-D RoPE: position ids ``(B, S)``, values from ``self_attn.v_proj``
    (LLaVA, InternVL)."""

    def axes_positions(self, rotary_position_ids: torch.Tensor) -> torch.Tensor:
        p = rotary_position_ids.cpu()
        return p.unsqueeze(0) if p.dim() == 2 else p  # (1, B, S)

    def rope_info(self) -> RopeInfo:
        return RopeInfo(
            inv_freq=self.rotary.inv_freq,
            attention_scaling=float(self.rotary.attention_scaling),
            mrope_section=None,
            dtype=self.layers[0].self_attn.v_proj.weight.dtype,
        )

    def decode_position_ids(self, start: torch.Tensor, q_len: int, device: torch.device) -> torch.Tensor:
        return (start.view(-1, 1) + torch.arange(q_len)).to(device)

    def value_module(self, layer_idx: int) -> nn.Module:
        return self.layers[layer_idx].self_attn.v_proj


def token_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool tensor."""
    if not bool(mask.any()):
        return []
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def override_spec(spec: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of a ``random_configs`` spec with ``FIELD`` (text config) / ``vision.FIELD`` overrides applied."""
    spec = copy.deepcopy(spec)
    for key, value in (overrides or {}).items():
        part, _, name = key.rpartition(".")
        target = {"": "text", "text": "text", "vision": "vision"}.get(part)
        if target is None:
            raise ValueError(f"override {key!r}: use FIELD for the text config or vision.FIELD")
        spec[target][name] = value
    return spec


Adapter = Family  # the runtime's name for a family bound to a model
