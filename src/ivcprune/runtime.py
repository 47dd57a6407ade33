"""Applies any method's selection at layer K of a stock transformers model, with hooks only; batch first.

During a prefill that holds visual tokens:

* the rotary module's position ids and whatever the method declared it needs (:class:`Needs`: the value
  projection of layer K-1, the hidden states entering layer K) are captured on their way through;
* just before layer K the method selects, per visual span of every batch row, the tokens to keep; the
  batch is cut to them (:mod:`ivcprune.cut`: rows keep different counts, so the cut batch is left-padded
  again), and every later layer receives rotary cos/sin, attention mask and position ids cut the same way
  (kept tokens keep their original rotations, i.e. their original positions);
* the KV cache of layers 0..K-1, already filled with every token, is cut to the kept tokens, so from then
  on no layer holds a pruned token;
* structure tokens a family marks inside a span (``Span.fixed``, e.g. LLaVA-OneVision's row newlines) are
  always kept and hidden from the method: it sees the span, and its row, without them (so its budget counts
  the other tokens), and its selection is mapped back to the prompt's positions.

Every row is handled in its own coordinates (the positions of its real, non-padding tokens), so a row's
selection and report are the ones it gets alone. Decode steps need no cutting: ``generate`` tracks position
ids itself; the runtime only swaps the 2-D attention mask over the unpruned length for the one over the
cut cache (and supplies position ids to hand-written loops that pass none).

The runtime imports no method: a method is any object with ``name``, ``needs(config)`` and
``select(span, config)``. Reports are kept per thread, so two threads running generate (on two models, or
on one) never see each other's reports.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import cut
from .families import Adapter, AttentionCut, Span, get_adapter
from .merging import apply_rotary, last_query_attention
from .report import PruneReport, SpanReport
from .tiles import TileLayout

NO_VISUAL = "no image or video tokens in the prompt"
VALUE_INPUTS = ("normed", "residual")


class UnsupportedCacheError(ValueError):
    """The KV cache type cannot be cut."""


def _finish_queued_work(device: torch.device) -> None:
    """Wait for the kernels queued on an accelerator (a no-op on the CPU). Selection reads results on the host,
    so it waits anyway; waiting first keeps that wait out of its timing."""
    if device.type != "cpu" and torch.accelerator.is_available():  # torch >= 2.6 (the pinned range)
        torch.accelerator.synchronize(device)


@dataclass(frozen=True)
class Needs:
    """What a method reads to select; the runtime captures exactly this and nothing else."""

    values: bool = False  # value vectors of layer K-1, per KV head
    hidden: bool = False  # hidden states entering layer K
    # what layer K-1's value projection is applied to: its input-normed hidden states (what the layer itself
    # computes, "normed") or the un-normalised residual stream entering it ("residual", InternVL's release)
    value_input: str = "normed"
    attention: bool = False  # the last prompt token's attention (heads averaged), from captured q/k
    # ...of layer K-1 (-1: FastV) or of layer K on its own input (0: PyramidDrop)
    attention_at: int = -1
    keys: bool = False  # layer K-1's keys, rotary applied, per KV head (DART's pivots)
    hidden_norm: str | None = None  # "final": the hidden states entering layer K through the decoder's final norm

    def __post_init__(self):
        if self.value_input not in VALUE_INPUTS:
            raise ValueError(f"value_input must be one of {VALUE_INPUTS}, got {self.value_input!r}")


@dataclass
class RowInput:
    """One batch row as a method sees it, in the row's own coordinates (its real tokens, in order)."""

    row: int
    length: int  # real tokens of this forward's chunk in the row
    past: int  # real tokens of the row already in the cache before this chunk
    visual: torch.Tensor  # (length,) bool, CPU: tokens inside any visual span
    values: torch.Tensor | None  # (H, length, d) value vectors of layer K-1, if needed
    hidden: torch.Tensor | None  # (length, D) hidden states entering layer K, if needed
    attention: torch.Tensor | None = None  # (length,) the last token's attention at layer K-1, if needed
    keys: torch.Tensor | None = None  # (Hkv, length, d) layer K-1's keys with the rotary embedding, if needed
    # tokens already pruned by an earlier stage are zeros in ``values`` / ``hidden`` / ``attention``


@dataclass
class SpanInput:
    """What a method sees of one visual span when it selects."""

    index: int
    kind: str
    start: int  # prompt position of the first token (row coordinates, past included)
    length: int
    grid: tuple[int, int, int] | None
    positions: torch.Tensor  # (A, L) rotary position ids, on the CPU
    rope: Any  # families.RopeInfo
    row: RowInput
    tiles: TileLayout | None = None  # a tiled image's layout (tiles, thumbnail)
    alive: torch.Tensor | None = None  # local indices still in the sequence (multi-stage methods); None = all
    stage: int | None = None  # the layer this selection runs before
    media_index: int = 0  # this span's place among all spans of the batch (rows in order, spans in prompt order)
    layout: Any = None  # the family's own layout of the span (families.Span.layout)

    @property
    def alive_index(self) -> torch.Tensor:
        return torch.arange(self.length) if self.alive is None else self.alive

    @property
    def local_start(self) -> int:
        """Index of the span's first token in this chunk of the row."""
        return self.start - self.row.past

    @property
    def visual_values(self) -> torch.Tensor | None:
        v = self.row.values
        return None if v is None else v[:, self.local_start : self.local_start + self.length]

    def text_after(self, offset: int) -> torch.Tensor:
        """Chunk indices of the row's text tokens from ``offset`` tokens after the span's end (other visual
        spans excluded); the last text token when there are none."""
        idx = torch.arange(min(self.local_start + self.length + offset, self.row.length), self.row.length)
        idx = idx[~self.row.visual[idx]]
        if idx.numel() == 0:
            idx = (~self.row.visual).nonzero().squeeze(1)[-1:]
        return idx


@dataclass
class SpanSelection:
    """A method's answer for one span: local indices (0..L-1)."""

    kept: torch.Tensor  # sorted
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    note: str | None = None  # something the user should know (joined into the report's ``reason``)


class Method(Protocol):
    name: str

    def needs(self, config: dict[str, Any]) -> Needs: ...

    def select(self, span: SpanInput, config: dict[str, Any]) -> SpanSelection: ...


@dataclass
class _CacheRecord:
    valid: torch.Tensor  # (B, T) validity of the cut cache's slots right after the prefill
    unpruned_len: int  # length of 2-D attention masks over the unpruned prompt (padding included)
    real_len: torch.Tensor  # (B,) real tokens per row in the unpruned prompt
    origin: torch.Tensor | None = None  # (B, T) each slot's index in the unpruned sequence
    context: Any = None  # the family's mask context of the prefill


@dataclass
class _Forward:
    spans: list[list[Span]]  # per row, in row-chunk coordinates
    real: list[torch.Tensor]  # per row, chunk indices of its real tokens (CPU)
    real_past: list[int]
    past: int
    q_len: int
    past_valid: torch.Tensor  # (B, past): real slots of the cache before this chunk
    positions: torch.Tensor | None = None
    values: torch.Tensor | None = None  # captured for the next stage
    attention: tuple | None = None  # (hidden, cos, sin) entering layer K-1 of the next stage
    reports: list[PruneReport] | None = None  # per row, updated stage after stage
    index: torch.Tensor | None = None  # (B, M) gather index over the chunk; None = nothing cut
    valid: torch.Tensor | None = None  # (B, M)
    valid_kv: torch.Tensor | None = None  # (B, past + M): real slots of the cut cache
    cache: Cache | None = None
    dtype: torch.dtype = torch.float32  # of the hidden states (eager masks are in it)
    device: torch.device | None = None
    memo: dict = field(default_factory=dict)
    context: Any = None  # the family's mask context (Family.mask_context)


# the pruner applied to each model (not an attribute of the model: copies of a model must not carry it)
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_APPLIED_LOCK = threading.Lock()


def applied_pruner(model: torch.nn.Module) -> Pruner | None:
    """The pruner whose hooks are on ``model``, if any."""
    return _APPLIED.get(model)


def _noop_hook(*args, **kwargs):
    return None


def _dead_hook():
    return _noop_hook


class _Hook:
    """One of a pruner's hooks. A copy of the model (``copy.deepcopy``, or pickling as ``torch.save`` does)
    gets a no-op in its place: the copy is a clean, unpruned model that takes methods of its own."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo):
        return _noop_hook

    def __reduce__(self):
        return (_dead_hook, ())


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class Pruner:
    """Hooks of one method on one model; :meth:`remove` takes them all off again.

    ``on_reports(reports)`` is called in the forwarding thread after each prefill, one report per row."""

    def __init__(self, method: Method, model: torch.nn.Module, config: dict[str, Any], on_reports):
        self.method = method
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.config = config
        self.layer: int = config["layer"]
        stages = getattr(method, "stages", None)
        self.stages: tuple[int, ...] = tuple(sorted(set(stages(config)))) if stages else (self.layer,)
        self.needs: Needs = method.needs(config)
        if self.stages[0] != self.layer or self.stages[-1] >= self.adapter.num_layers:
            raise ValueError(f"stages {self.stages} must start at the method's layer {self.layer} and stay below "
                             f"{self.adapter.num_layers} decoder layers")
        if (self.needs.values or self.needs.attention or self.needs.keys) and self.stages[0] < 1:
            raise ValueError("value vectors and attention come from the decoder's layers: K must be >= 1")
        if self.needs.attention and self.needs.attention_at not in (-1, 0):
            raise ValueError(f"attention_at must be -1 or 0, got {self.needs.attention_at}")
        with _APPLIED_LOCK:
            if model in _APPLIED:
                raise RuntimeError("a pruning method is already applied to this model; remove it first")
            _APPLIED[model] = self
        self._on_reports = on_reports
        self._local = threading.local()
        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        a = self.adapter
        self._handles = [
            a.entry.register_forward_pre_hook(_Hook(self._entry_pre), with_kwargs=True),
            a.entry.register_forward_hook(_Hook(self._entry_post), with_kwargs=True),
            a.rotary.register_forward_pre_hook(_Hook(self._rotary_pre), with_kwargs=True),
        ]
        for module in a.media_modules():
            self._handles.append(module.register_forward_pre_hook(_Hook(self._media_pre), with_kwargs=True))
        for idx in range(self.layer, a.num_layers):
            self._handles.append(a.layers[idx].register_forward_pre_hook(_Hook(self._layer_pre(idx)), with_kwargs=True))
        # hooks of the method's own (e.g. on the vision tower), removed with the others
        for module, kind, fn in (method.model_hooks(self.adapter, config) if hasattr(method, "model_hooks") else ()):
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            self._handles.append(register(_Hook(fn), with_kwargs=True))
        # the family's hooks for model code that must follow the cut (e.g. Qwen3-VL's DeepStack additions)
        for module, kind, fn in a.cut_hooks(self.current_cut):
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            self._handles.append(register(_Hook(fn), with_kwargs=True))
        # captures after the cutting hooks, so that a later stage's capture sees the cut sequence
        if self.needs.attention and self.needs.attention_at not in (-1, 0):
            raise ValueError(f"attention_at must be -1 or 0, got {self.needs.attention_at}")
        for stage in self.stages:
            if self.needs.values and self.needs.value_input == "normed":
                self._handles.append(a.value_module(stage - 1).register_forward_hook(_Hook(self._value_post)))
            elif self.needs.values:
                self._handles.append(a.layers[stage - 1].register_forward_pre_hook(_Hook(self._residual_pre),
                                                                                     with_kwargs=True))
            if (self.needs.attention and self.needs.attention_at == -1) or self.needs.keys:
                self._handles.append(a.layers[stage - 1].register_forward_pre_hook(_Hook(self._attention_pre),
                                                                                     with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        with _APPLIED_LOCK:
            if _APPLIED.get(self.model) is self:
                del _APPLIED[self.model]

    @property
    def _state(self) -> _Forward | None:
        return getattr(self._local, "state", None)

    @_state.setter
    def _state(self, value: _Forward | None) -> None:
        self._local.state = value

    def current_cut(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """In the forwarding thread: ``(index, valid)``, the ``(B, M)`` slots of the current sequence over this
        forward's uncut chunk and their validity; ``None`` while nothing is cut."""
        st = self._state
        return None if st is None or st.index is None else (st.index, st.valid)

    # -- forward entry / exit --------------------------------------------------------------------
    def _entry_pre(self, module, args, kwargs):
        self._state = None
        if kwargs.get("pixel_values") is not None:  # the encoder runs inside this forward: earlier media are stale
            self._local.media = []
        input_ids = _arg(args, kwargs, 0, "input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        B, q_len = ref.shape[0], ref.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        with self._lock:
            record = self._records.get(cache) if cache is not None else None
            if record is not None and past == 0:
                del self._records[cache]  # the cache was reset: a new conversation
                record = None
        if record is not None:
            if q_len != 1:
                raise RuntimeError(
                    "this KV cache was pruned; feeding it more than one token at a time (continuing a "
                    "conversation from it, prefix reuse, assisted/speculative decoding, chunked prefill) is "
                    "not supported; run a fresh prefill of the whole prompt instead"
                )
            return args, self._decode_kwargs(kwargs, record, past, q_len, ref.device)
        # Past tokens without a pruning record: a decode step (or text continuation) on an unpruned cache,
        # which must not overwrite the report of the last prefill.
        fresh = past == 0
        if not fresh and q_len == 1:
            return None  # one new token holds no visual span
        mask = kwargs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        chunk_mask = mask2d[:, -q_len:].bool().cpu() if mask2d is not None else torch.ones(B, q_len, dtype=torch.bool)
        real = [chunk_mask[b].nonzero().squeeze(1) for b in range(B)]
        if input_ids is None:
            if fresh:
                self._set_noop([len(r) for r in real],
                               "inputs_embeds without input_ids: visual spans cannot be located")
            return None
        grids = self.adapter.grid_queues(kwargs)
        ids = input_ids.cpu()
        spans = [self.adapter.find_spans(ids[b, real[b]], grids) for b in range(B)]
        if not any(spans):
            if fresh:
                self._set_noop([len(r) for r in real], NO_VISUAL)
            return None
        _check_cache(cache, self.adapter)
        if past and mask2d is not None and mask2d.shape[1] == past + q_len:
            past_valid = mask2d[:, :past].bool().cpu()
        else:  # no mask over the earlier cache: all of it is real
            past_valid = torch.ones(B, past, dtype=torch.bool)
        real_past = past_valid.sum(dim=1).tolist()
        self._state = _Forward(spans=spans, real=real, real_past=real_past, past=past, q_len=q_len,
                               past_valid=past_valid, context=self.adapter.mask_context(kwargs))
        return None

    def _entry_post(self, module, args, kwargs, output):
        st, self._state = self._state, None
        self._local.media = []
        if st is None or st.index is None or st.cache is None:
            return None
        real_len = torch.tensor([p + len(r) for p, r in zip(st.real_past, st.real)])
        with self._lock:
            self._records[st.cache] = _CacheRecord(valid=st.valid_kv, unpruned_len=st.past + st.q_len,
                                                   real_len=real_len, origin=cut.extend_index(st.index, st.past),
                                                   context=st.context)
        return None

    def _decode_kwargs(self, kwargs: dict, record: _CacheRecord, past: int, q_len: int, device) -> dict:
        B = record.valid.shape[0]
        if kwargs.get("position_ids") is None:
            generated = past - record.valid.shape[1]  # tokens fed after the prefill
            kwargs["position_ids"] = self.adapter.decode_position_ids(record.real_len + generated, q_len, device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            n = mask.shape[-1]
            if n == past + q_len:
                return self._decode_mask(kwargs, record, past, q_len, device)  # already over the cut cache
            extra = n - record.unpruned_len  # generated tokens, this step's included
            if extra < q_len or mask.shape[0] != B:
                raise ValueError(
                    f"attention_mask is {tuple(mask.shape)}; expected ({B}, {past + q_len}) over the pruned cache "
                    f"or ({B}, {past - record.valid.shape[1] + record.unpruned_len + q_len}) over the unpruned prompt"
                )
            head = record.valid.to(device=mask.device, dtype=mask.dtype)
            kwargs["attention_mask"] = torch.cat([head, mask[:, record.unpruned_len :]], dim=1)
        elif isinstance(mask, torch.Tensor):
            raise ValueError("a pruned cache needs a 2-D attention mask (or none) while decoding")
        return self._decode_mask(kwargs, record, past, q_len, device)

    def _decode_mask(self, kwargs: dict, record: _CacheRecord, past: int, q_len: int, device) -> dict:
        """The family's decode mask over the cut cache (by default the 2-D mask as it is)."""
        mask = kwargs.get("attention_mask")
        B, T = record.valid.shape
        later = past + q_len - T  # tokens fed after the prefill, this step's included
        valid = mask.bool() if isinstance(mask, torch.Tensor) else torch.cat(
            [record.valid, torch.ones(B, later, dtype=torch.bool)], dim=1)
        origin = torch.cat([record.origin, record.unpruned_len + torch.arange(later).expand(B, later)], dim=1)
        hidden = kwargs.get("inputs_embeds")
        attn = AttentionCut(valid_kv=valid.to(device), origin_kv=origin.to(device), q_len=q_len,
                            attn_implementation=self.adapter.attn_implementation,
                            dtype=hidden.dtype if hidden is not None else self.model.dtype, device=device,
                            context=record.context)
        kwargs["attention_mask"] = self.adapter.decode_attention_mask(mask, attn)
        return kwargs

    def _set_noop(self, lengths: list[int], reason: str) -> None:
        self._on_reports(
            [
                PruneReport(method=self.method.name, layer=self.layer, seq_len=n, kept=torch.arange(n),
                            config=dict(self.config), reason=reason)
                for n in lengths
            ]
        )

    # -- captures --------------------------------------------------------------------------------
    def _media_pre(self, module, args, kwargs):
        pixels = _arg(args, kwargs, 0, "pixel_values")
        if isinstance(pixels, torch.Tensor):
            if getattr(self._local, "media", None) is None:
                self._local.media = []
            self._local.media.append(pixels.detach())
        return None

    def _rotary_pre(self, module, args, kwargs):
        st = self._state
        if st is not None and st.positions is None:
            st.positions = self.adapter.axes_positions(_arg(args, kwargs, 1, "position_ids"))
        return None

    def _value_post(self, module, args, output):
        st = self._state
        if st is not None and st.values is None:
            st.values = output
        return None

    def _residual_pre(self, module, args, kwargs):
        st = self._state
        if st is not None and st.values is None:
            with torch.no_grad():
                st.values = module.self_attn.v_proj(_arg(args, kwargs, 0, "hidden_states"))
        return None

    def _attention_pre(self, module, args, kwargs):
        st = self._state
        if st is not None and st.attention is None:
            cos, sin = kwargs["position_embeddings"]
            st.attention = (module, _arg(args, kwargs, 0, "hidden_states"), cos, sin)
        return None

    # -- layer K and after -----------------------------------------------------------------------
    def _layer_pre(self, idx: int):
        last_stage = self.stages[-1]

        def hook(module, args, kwargs):
            st = self._state
            if st is None:
                return None
            if idx in self.stages:
                hidden = _arg(args, kwargs, 0, "hidden_states")
                expected = st.q_len if st.index is None else st.index.shape[1]
                if hidden.shape[1] != expected:
                    raise RuntimeError(f"layer {idx} got {hidden.shape[1]} tokens, expected {expected}")
                if self.needs.attention and self.needs.attention_at == 0:  # this layer's own attention
                    emb = kwargs["position_embeddings"]
                    cos, sin = emb if st.index is None else self._cut(st, "position_embeddings", emb)
                    st.attention = (module, hidden, cos, sin)
                rel = self._stage(st, idx, hidden)
                if st.index is None and idx == last_stage:
                    self._state = None  # everything kept: run unmodified
                    return None
                if rel is not None:
                    hidden = cut.gather_tokens(hidden, rel, 1)
                    if "hidden_states" in kwargs:
                        kwargs["hidden_states"] = hidden
                    else:
                        args = (hidden, *args[1:])
                    st.cache = kwargs.get("past_key_values")
                    st.dtype, st.device = hidden.dtype, hidden.device
                    self._cut_cache(st, idx, rel)
                    st.memo.clear()  # masks and rotary embeddings are cut anew for the new selection
            if st.index is None:
                return None
            # rows keep different counts: the cut batch needs a padding mask even where the model passed none
            kwargs["attention_mask"] = self._cut(st, "attention_mask", kwargs.get("attention_mask"), idx)
            for name in ("position_embeddings", "position_ids"):
                if kwargs.get(name) is not None:
                    kwargs[name] = self._cut(st, name, kwargs[name])
            return args, kwargs

        return hook

    def _cut(self, st: _Forward, name: str, value, layer_idx: int | None = None):
        key = (name, id(value[0]) if isinstance(value, tuple) else id(value))
        if name == "attention_mask":
            key = (*key, self.adapter.mask_kind(layer_idx))
        hit = st.memo.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        if name == "position_embeddings":
            out = tuple(cut.gather_tokens(t, st.index, -2) for t in value)
        elif name == "position_ids":
            # Only flash attention reads these here, to detect packed sequences: hand it one contiguous run
            # per row (the rotary cos/sin above carry the real, original positions).
            out = cut.contiguous_positions(st.valid.to(value.device), value[..., 0])
        else:
            out = self._cut_mask(st, value, layer_idx)
        st.memo[key] = (value, out)
        return out

    def _cut_mask(self, st: _Forward, mask, layer_idx: int):
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise NotImplementedError(
                f"attention masks of type {type(mask).__name__} (e.g. flex attention) are not supported; use "
                "attn_implementation='sdpa', 'eager' or 'flash_attention_2'"
            )
        attn = AttentionCut(valid_kv=st.valid_kv, origin_kv=cut.extend_index(st.index, st.past),
                            q_len=st.valid.shape[1], attn_implementation=self.adapter.attn_implementation,
                            dtype=st.dtype, device=mask.device if mask is not None else st.device, context=st.context)
        return self.adapter.layer_attention_mask(layer_idx, mask, attn)

    def _current(self, st: _Forward, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ``b``'s tokens in the current (possibly already cut) sequence: ``(slots, local)``, the slots
        of the current sequence and the row-local indices (into its real tokens) they hold."""
        real = st.real[b]
        if st.index is None:
            return real, torch.arange(len(real))
        slots = st.valid[b].nonzero().squeeze(1)
        return slots, torch.searchsorted(real, st.index[b, slots])

    def _row_tensors(self, st: _Forward, hidden: torch.Tensor, b: int, slots, local):
        """What the method declared it needs for row ``b``, in row coordinates (pruned tokens are zeros)."""
        n = len(st.real[b])

        def scatter(x, dim):  # x over the current slots of the row -> over the row's real tokens
            shape = list(x.shape)
            shape[dim] = n
            out = x.new_zeros(shape)
            index = [slice(None)] * x.dim()
            index[dim] = local.to(x.device)
            src = [slice(None)] * x.dim()
            src[dim] = slots.to(x.device)
            out[tuple(index)] = x[tuple(src)]
            return out

        values = hid = attn = keys = None
        if self.needs.values:
            if st.values is None:
                raise RuntimeError("value vectors of the layer before the stage were not captured")
            values = scatter(self.adapter.split_heads(st.values)[b], 1)  # (H, n, d)
        if self.needs.hidden:
            h = hidden[b]
            if self.needs.hidden_norm == "final":
                with torch.no_grad():
                    h = self.adapter.final_norm()(h)
            hid = scatter(h, 0)
        if (self.needs.attention or self.needs.keys) and st.attention is None:
            raise RuntimeError("attention inputs of the layer before the stage were not captured")
        if self.needs.attention:
            row = self._last_token_attention(st, b, slots, local)
            attn = row.new_zeros(n)
            attn[local] = row
        if self.needs.keys:
            rotated = self._rotated_keys(st, b, slots)
            keys = rotated.new_zeros(rotated.shape[0], n, rotated.shape[2])
            keys[:, local.to(rotated.device)] = rotated
        return values, hid, attn, keys

    def _row_query_key(self, st: _Forward, b: int, slots: torch.Tensor):
        """Row ``b`` (its current ``slots``) at the captured layer: ``(q, k, cos, sin)``, the last token's queries
        and every token's keys before the rotary embedding, and the rotary tables of its tokens."""
        layer, hidden, cos, sin = st.attention
        q, k = self.adapter.query_key(layer, hidden[b : b + 1, slots.to(hidden.device)])
        cb = cos[b if cos.shape[0] > 1 else 0][slots.to(cos.device)]
        sb = sin[b if sin.shape[0] > 1 else 0][slots.to(sin.device)]
        return q[0], k[0], cb, sb

    def _rotated_keys(self, st: _Forward, b: int, slots: torch.Tensor) -> torch.Tensor:
        """Row ``b``'s keys at the captured layer, rotary applied: ``(Hkv, slots, d)`` in float32."""
        with torch.no_grad():
            _, k, cos, sin = self._row_query_key(st, b, slots)
            return apply_rotary(k, cos, sin)

    def _last_token_attention(self, st: _Forward, b: int, slots: torch.Tensor,
                              local: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``b``'s last token's attention over its current ``slots`` at the captured layer, heads averaged,
        computed from its queries / keys (whatever attention implementation the model runs); float32, CPU.
        In a sliding-window layer (:meth:`Family.attention_window`), keys out of the window (original
        positions; ``local``: the slots' row-local indices) get none."""
        layer = st.attention[0]
        scaling = layer.self_attn.scaling
        window = self.adapter.attention_window(layer)
        with torch.no_grad():
            q, k, cos, sin = self._row_query_key(st, b, slots)
            key_mask = None
            if window is not None:
                origin = st.real[b][local if local is not None else torch.arange(len(slots))]
                key_mask = (origin[-1] - origin < window).to(k.device)
            return last_query_attention(q[:, -1], k, cos, sin, scaling, q.shape[0] // k.shape[0],
                                        key_mask=key_mask).float().cpu()

    def _stage(self, st: _Forward, idx: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Select before layer ``idx``; returns the gather index over the current sequence (None: nothing
        cut) and updates the selection's absolute index, validity and the reports."""
        if st.positions is None:
            raise RuntimeError("rotary position ids were not captured before the first stage")
        rope = self.adapter.rope_info()
        first = idx == self.stages[0]
        if first:
            st.spans = self.adapter.layout_spans(st.spans, getattr(self._local, "media", None) or [])
            st.reports = []
        keeps, changed, media = [], False, 0
        _finish_queued_work(hidden.device)  # so that selection_ms counts the selection, not layers 0..idx-1
        for b, spans in enumerate(st.spans):
            t0 = time.perf_counter()
            real = st.real[b]
            slots, local = self._current(st, b)
            values, hid, attn, keys = self._row_tensors(st, hidden, b, slots, local)
            visual = torch.zeros(len(real), dtype=torch.bool)
            for s in spans:
                visual[s.start : s.start + s.length] = True
            alive = torch.zeros(len(real), dtype=torch.bool)
            alive[local] = True
            row = RowInput(row=b, length=len(real), past=st.real_past[b], visual=visual, values=values, hidden=hid,
                           attention=attn, keys=keys)
            positions = st.positions[:, b, real]
            keep_mask = alive & ~visual
            fixed = torch.zeros(len(real), dtype=torch.bool)
            for s in spans:
                if s.fixed:
                    fixed[s.start + torch.tensor(s.fixed, dtype=torch.long)] = True
            keep_mask |= fixed
            shown = _without(row, ~fixed) if bool(fixed.any()) else row  # what methods see: no structure tokens
            before = torch.cumsum((~fixed).long(), 0) - (~fixed).long()  # shown tokens before each token
            span_reports = [] if first else st.reports[b].spans
            notes = []
            for i, s in enumerate(spans):
                part = slice(s.start, s.start + s.length)
                shown_idx = (~fixed[part]).nonzero().squeeze(1)  # span-local index of each token the method sees
                span_alive = alive[part][shown_idx].nonzero().squeeze(1)
                span_pos = positions[:, part][:, shown_idx]
                inp = SpanInput(index=i, kind=s.kind, start=row.past + int(before[s.start]), length=len(shown_idx),
                                grid=s.grid or self.adapter.span_grid(span_pos), positions=span_pos, rope=rope,
                                row=shown, tiles=s.tiles, alive=None if first else span_alive, stage=idx,
                                media_index=media, layout=s.layout)
                media += 1
                sel = self.method.select(inp, self.config) if span_alive.numel() else SpanSelection(span_alive)
                if sel.note:
                    notes.append(f"{s.kind} {i}: {sel.note}")
                kept = sel.kept.cpu()
                if not first and not bool(torch.isin(kept, span_alive).all()):
                    raise RuntimeError(f"{self.method.name} kept tokens an earlier stage had pruned")
                keep_mask[s.start + shown_idx[kept]] = True
                start = row.past + s.start
                groups = {k: (shown_idx[v.cpu()] + start) for k, v in sel.groups.items()}
                if s.fixed:
                    groups["structure"] = torch.tensor(s.fixed, dtype=torch.long) + start
                kept = keep_mask[part].nonzero().squeeze(1)
                if first:
                    span_reports.append(SpanReport(index=i, kind=s.kind, start=start, length=s.length,
                                                   kept=int(kept.numel()), groups=groups, grid=inp.grid,
                                                   tiles=inp.tiles, layout=s.layout))
                else:
                    span_reports[i].kept = int(kept.numel())
                    span_reports[i].groups.update(groups)
            keep = keep_mask.nonzero().squeeze(1)
            changed |= len(keep) < len(local)
            keeps.append(real[keep])
            ms = 1000 * (time.perf_counter() - t0)
            kept_all = torch.cat([torch.arange(row.past), keep + row.past])
            reason = "; ".join(notes) or (None if spans else NO_VISUAL)
            if first:
                st.reports.append(PruneReport(
                    method=self.method.name, layer=self.layer, seq_len=row.past + len(real), kept=kept_all,
                    spans=span_reports, config=dict(self.config), reason=reason, selection_ms=ms,
                    stages=[(idx, kept_all)]))
            else:
                rep = st.reports[b]
                rep.kept, rep.selection_ms = kept_all, rep.selection_ms + ms
                rep.stages.append((idx, kept_all))
                if notes:
                    rep.reason = "; ".join(filter(None, [rep.reason, *notes]))
        st.values = st.attention = None
        self._on_reports(st.reports)
        if not changed:
            return None
        index, valid = cut.keep_index(keeps)
        if st.index is None:
            rel = index
        else:  # the new selection as slots of the current sequence
            rel = torch.stack([torch.searchsorted(st.index[b].masked_fill(~st.valid[b], -1), index[b])
                               for b in range(len(keeps))])
        st.index, st.valid = index, valid
        st.valid_kv = torch.cat([st.past_valid, st.valid], dim=1)
        return rel

    def _cut_cache(self, st: _Forward, idx: int, rel: torch.Tensor) -> None:
        """Layers before ``idx`` hold the current sequence: cut their caches to the new selection."""
        cache = st.cache
        if cache is None:
            return
        _check_cache(cache, self.adapter)
        index = cut.extend_index(rel, st.past)
        for i in range(idx):
            self.adapter.cut_cache_layer(cache.layers[i], index)


def _without(row: RowInput, shown: torch.Tensor) -> RowInput:
    """``row`` with only its ``shown`` tokens (a bool mask over its tokens): what a method sees of a row whose
    spans hold structure tokens (:attr:`ivcprune.families.Span.fixed`)."""
    idx = shown.nonzero().squeeze(1)

    def pick(x, dim):
        return None if x is None else x.index_select(dim, idx.to(x.device))

    return RowInput(row=row.row, length=len(idx), past=row.past, visual=row.visual[idx], values=pick(row.values, 1),
                    hidden=pick(row.hidden, 0), attention=pick(row.attention, 0), keys=pick(row.keys, 1))


def _check_cache(cache, adapter: Adapter | None = None) -> None:
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    supported = adapter.cache_layer_supported if adapter is not None else (lambda layer: type(layer) is DynamicLayer)
    if layers is None or any(not supported(layer) for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in (layers or [])})
        raise UnsupportedCacheError(
            f"ivcprune cuts DynamicCache (the default of generate); got {type(cache).__name__} with layers "
            f"{kinds}. Static, sliding-window, quantized and offloaded caches are not supported"
        )
