"""Applies a method's selection at layer K of a stock transformers model, with hooks only.

During a prefill that holds visual tokens:

* the rotary module's position ids and (if the method asks for them) the value projection of layer
  K-1 are captured on their way through;
* just before layer K the method selects, per visual span, the tokens to keep; hidden states are cut
  to the kept tokens, and every later layer receives rotary cos/sin, attention mask and position ids
  cut the same way (so kept tokens keep their original rotations, i.e. their original positions);
* the KV cache of layers 0..K-1, already filled with every token, is cut to the kept tokens, so from
  then on no layer holds a pruned token.

Decode steps need no cutting. ``generate`` tracks position ids itself, so new tokens get the positions
they would have unpruned; for hand-written decode loops that pass no position ids (or pass a 2-D
attention mask over the unpruned length) the runtime supplies / cuts them from what it recorded about
the cache.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .adapters import Adapter, Span, get_adapter
from .report import PruneReport, SpanReport

if TYPE_CHECKING:
    from .methods import PruningMethod


class BatchSizeError(ValueError):
    """Pruning runs on one prompt at a time."""


class UnsupportedCacheError(ValueError):
    """The KV cache type cannot be cut."""


@dataclass
class SpanInput:
    """What a method sees of one visual span when it selects."""

    index: int
    kind: str
    start: int  # prompt position of the first token
    length: int
    grid: tuple[int, int, int] | None
    positions: torch.Tensor  # (A, L) rotary position ids, on the CPU
    rope: Any  # adapters.RopeInfo
    visual_values: torch.Tensor | None  # (H, L, d), value vectors of layer K-1
    query_values: torch.Tensor | None  # (H, Q, d)
    query_positions: torch.Tensor  # (Q,) prompt positions of the text queries


@dataclass
class SpanSelection:
    """A method's answer for one span: local indices (0..L-1)."""

    kept: torch.Tensor  # sorted
    groups: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _CacheRecord:
    keep_mask: torch.Tensor  # bool over the unpruned positions seen up to the end of the prefill
    removed: int


@dataclass
class _Forward:
    spans: list[Span]
    past: int
    q_len: int
    positions: torch.Tensor | None = None
    values: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # kept indices of this chunk, None = nothing cut
    keep_mask: torch.Tensor | None = None
    cache: Cache | None = None
    memo: dict = field(default_factory=dict)


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class Pruner:
    """Hooks of one method on one model; :meth:`remove` takes them all off again."""

    def __init__(self, method: PruningMethod, model: torch.nn.Module):
        if getattr(model, "_ivcprune_pruner", None) is not None:
            raise RuntimeError("a pruning method is already applied to this model; remove it first")
        self.method = method
        self.model = model
        self.adapter: Adapter = get_adapter(model)
        self.config = method.resolve(self.adapter)
        self.layer: int = self.config["layer"]
        self._state: _Forward | None = None
        self._records: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        a = self.adapter
        self._handles = [
            a.entry.register_forward_pre_hook(self._entry_pre, with_kwargs=True),
            a.entry.register_forward_hook(self._entry_post, with_kwargs=True),
            a.rotary.register_forward_pre_hook(self._rotary_pre, with_kwargs=True),
        ]
        if method.needs_values:
            self._handles.append(a.value_module(self.layer - 1).register_forward_hook(self._value_post))
        for idx in range(self.layer, a.num_layers):
            self._handles.append(a.layers[idx].register_forward_pre_hook(self._layer_pre(idx), with_kwargs=True))
        model._ivcprune_pruner = self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state = None
        if getattr(self.model, "_ivcprune_pruner", None) is self:
            self.model._ivcprune_pruner = None

    # -- forward entry / exit --------------------------------------------------------------------
    def _entry_pre(self, module, args, kwargs):
        self._state = None
        input_ids = _arg(args, kwargs, 0, "input_ids")
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        if ref.shape[0] != 1:
            raise BatchSizeError(
                f"{self.method.name} prunes one prompt at a time (batch size 1), got batch size {ref.shape[0]}; "
                "loop over prompts, and use num_beams=1 / num_return_sequences=1"
            )
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        q_len = ref.shape[1]
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
        if input_ids is None:
            if fresh:
                self._set_noop(q_len, "inputs_embeds without input_ids: visual spans cannot be located")
            return None
        spans = self.adapter.find_spans(input_ids[0], kwargs)
        if not spans:
            if fresh:
                self._set_noop(q_len, "no image or video tokens in the prompt")
            return None
        _check_cache(cache)
        self._state = _Forward(spans=spans, past=past, q_len=q_len)
        return None

    def _entry_post(self, module, args, kwargs, output):
        st, self._state = self._state, None
        if st is None or st.keep is None or st.cache is None:
            return None
        keep_mask = torch.cat([torch.ones(st.past, dtype=torch.bool), st.keep_mask.cpu()])
        self._records[st.cache] = _CacheRecord(keep_mask=keep_mask, removed=int(st.q_len - st.keep.numel()))
        return None

    def _decode_kwargs(self, kwargs: dict, record: _CacheRecord, past: int, q_len: int, device) -> dict:
        unpruned_past = past + record.removed
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = self.adapter.decode_position_ids(unpruned_past, q_len, device)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() in (2, 4):
            n = mask.shape[-1]
            if n == unpruned_past + q_len:
                extra = torch.ones(n - record.keep_mask.numel(), dtype=torch.bool)
                cols = torch.cat([record.keep_mask, extra]).nonzero().squeeze(1).to(mask.device)
                kwargs["attention_mask"] = mask.index_select(-1, cols)
            elif n != past + q_len:
                raise ValueError(
                    f"attention_mask covers {n} tokens; expected {unpruned_past + q_len} (unpruned) or "
                    f"{past + q_len} (the pruned cache plus new tokens)"
                )
        return kwargs

    def _set_noop(self, q_len: int, reason: str) -> None:
        self.method.last_report = PruneReport(
            method=self.method.name,
            layer=self.layer,
            seq_len=q_len,
            kept=torch.arange(q_len),
            config=dict(self.config),
            reason=reason,
        )

    # -- captures --------------------------------------------------------------------------------
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

    # -- layer K and after -----------------------------------------------------------------------
    def _layer_pre(self, idx: int):
        def hook(module, args, kwargs):
            st = self._state
            if st is None:
                return None
            if idx == self.layer:
                hidden = _arg(args, kwargs, 0, "hidden_states")
                if hidden.shape[1] != st.q_len:
                    raise RuntimeError(f"layer {idx} got {hidden.shape[1]} tokens, expected {st.q_len}")
                self._select(st)
                if st.keep is None:
                    self._state = None  # everything kept: run unmodified
                    return None
                hidden = hidden.index_select(1, st.keep.to(hidden.device))
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = hidden
                else:
                    args = (hidden, *args[1:])
                st.cache = kwargs.get("past_key_values")
                self._cut_cache(st)
            if st.keep is None:
                return None
            for name in ("attention_mask", "position_embeddings", "position_ids"):
                if name in kwargs and kwargs[name] is not None:
                    kwargs[name] = self._cut(st, name, kwargs[name])
            return args, kwargs

        return hook

    def _cut(self, st: _Forward, name: str, value):
        key = (name, id(value[0]) if isinstance(value, tuple) else id(value))
        hit = st.memo.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        keep = st.keep
        if name == "position_embeddings":
            out = self.adapter.cut_position_embeddings(value, keep)
        elif name == "position_ids":
            # Only flash-attention reads these here, to detect packed sequences: hand it one contiguous
            # run (the rotary cos/sin above carry the real, original positions).
            out = value[..., :1] + torch.arange(keep.numel(), device=value.device)
        else:
            out = _cut_mask(value, keep, st.past)
        st.memo[key] = (value, out)
        return out

    def _select(self, st: _Forward) -> None:
        t0 = time.perf_counter()
        if st.positions is None:
            raise RuntimeError("rotary position ids were not captured before layer K")
        S = st.q_len
        values = None
        if self.method.needs_values:
            if st.values is None:
                raise RuntimeError(f"value vectors of layer {self.layer - 1} were not captured")
            values = self.adapter.split_heads(st.values)  # (H, S, d)
        device = st.positions.device
        visual = torch.zeros(S, dtype=torch.bool, device=device)
        for s in st.spans:
            visual[s.start : s.start + s.length] = True
        keep_mask = ~visual
        offset = int(self.config.get("query_offset", 2))
        rope = self.adapter.rope_info()
        reports, notes = [], []
        for i, s in enumerate(st.spans):
            q_idx = torch.arange(s.start + s.length + offset, S, device=device)
            q_idx = q_idx[~visual[q_idx]]
            if q_idx.numel() == 0:
                q_idx = (~visual).nonzero().squeeze(1)[-1:]
                notes.append(f"{s.kind} {i}: no text after the span; the last text token is the query")
            span_slice = slice(s.start, s.start + s.length)
            # Index bookkeeping of a selection happens on the CPU (tiny tensors); values stay on the model's
            # device for the similarity products.
            positions = st.positions[:, span_slice].cpu()
            inp = SpanInput(
                index=i,
                kind=s.kind,
                start=st.past + s.start,
                length=s.length,
                grid=s.grid or self.adapter.span_grid(positions),
                positions=positions,
                rope=rope,
                visual_values=values[:, span_slice] if values is not None else None,
                query_values=values[:, q_idx.to(values.device)] if values is not None else None,
                query_positions=st.past + q_idx,
            )
            sel = self.method.select(inp, self.config)
            kept = sel.kept.to(device)
            keep_mask[s.start + kept] = True
            reports.append(
                SpanReport(
                    index=i,
                    kind=s.kind,
                    start=inp.start,
                    length=s.length,
                    kept=int(kept.numel()),
                    groups={k: (v.cpu() + inp.start) for k, v in sel.groups.items()},
                    grid=inp.grid,
                )
            )
        keep = keep_mask.nonzero().squeeze(1)
        kept_abs = torch.cat([torch.arange(st.past), keep.cpu() + st.past])
        self.method.last_report = PruneReport(
            method=self.method.name,
            layer=self.layer,
            seq_len=st.past + S,
            kept=kept_abs,
            spans=reports,
            config=dict(self.config),
            reason="; ".join(notes) or None,
            selection_ms=1000 * (time.perf_counter() - t0),
        )
        if keep.numel() < S:
            st.keep, st.keep_mask = keep, keep_mask

    def _cut_cache(self, st: _Forward) -> None:
        cache = st.cache
        if cache is None:
            return
        _check_cache(cache)
        keep_kv = torch.cat([torch.arange(st.past, device=st.keep.device), st.keep + st.past])
        for i in range(self.layer):
            layer = cache.layers[i]
            idx = keep_kv.to(layer.keys.device)
            layer.keys = layer.keys.index_select(-2, idx)
            layer.values = layer.values.index_select(-2, idx)


def _cut_mask(mask, keep: torch.Tensor, past: int):
    if not isinstance(mask, torch.Tensor):
        raise NotImplementedError(
            f"attention masks of type {type(mask).__name__} (e.g. flex attention) are not supported; use "
            "attn_implementation='sdpa', 'eager' or 'flash_attention_2'"
        )
    keep = keep.to(mask.device)
    keep_kv = torch.cat([torch.arange(past, device=mask.device), keep + past])
    if mask.dim() == 4:
        if mask.shape[-2] > 1:
            mask = mask.index_select(-2, keep)
        return mask.index_select(-1, keep_kv)
    if mask.dim() == 2:
        return mask.index_select(-1, keep_kv)
    raise ValueError(f"unexpected attention mask of shape {tuple(mask.shape)}")


def _check_cache(cache) -> None:
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in (layers or [])})
        raise UnsupportedCacheError(
            f"ivcprune cuts DynamicCache (the default of generate); got {type(cache).__name__} with layers "
            f"{kinds}. Static, sliding-window, quantized and offloaded caches are not supported"
        )
