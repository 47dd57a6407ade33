"""The one generation path of every front door (CLI, eval, bench, lmms-eval): requests -> a left-padded
batch -> ``model.generate`` under a pruning method -> one output per row.

    rows = generate_batch(model, processor, [Request(["dog.jpg"], "Where is the dog?"), ...], method,
                          max_new_tokens=64)
    rows[0].text, rows[0].report, rows[0].seen, rows[0].grids, rows[0].prefill_s

Two layers: :func:`generate_batch` builds the inputs from requests (qwen-vl-utils + the processor, as
:func:`ivcprune.inputs.build_batch_inputs` does) and splits the result per row; :func:`generate_inputs`
runs ``generate`` on inputs already built (models without a processor, the benchmark) and times it. The
runtime prunes each row in its own coordinates, so a row's tokens and report are the ones it gets alone.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, TypeVar

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .inputs import prepare_batch, user_message

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that wall-clock stamps measure finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(LogitsProcessor):
    """Timestamps every generation step (called right after each forward pass); the first ends prefill."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def kv_cache_bytes(cache) -> tuple[int, int]:
    """(bytes, tokens) held by a DynamicCache over all layers (tokens: slots per row, padding included)."""
    total, tokens = 0, 0
    for layer in getattr(cache, "layers", None) or []:
        if getattr(layer, "keys", None) is None:
            continue
        total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        tokens = max(tokens, layer.keys.shape[-2])
    return total, tokens


@dataclass
class Request:
    """One prompt: images (paths, PIL images or :class:`~ivcprune.inputs.EncodedImage`) and text, in one
    user turn (images first); optional image size bounds, videos, a system turn and earlier turns
    (``history``: chat messages placed between the system turn and this one, e.g. a user turn built by
    :func:`~ivcprune.inputs.user_message` and the assistant's answer ``{"role": "assistant", "content": text}``)."""

    images: Sequence[Any] = ()
    prompt: str = ""
    _: KW_ONLY
    videos: Sequence[Any] = ()
    min_pixels: int | None = None
    max_pixels: int | None = None
    max_tiles: int | None = None  # InternVL: tiles per image at most (default: the processor's limit)
    system_prompt: str | None = None
    history: Sequence[dict[str, Any]] = ()

    def messages(self) -> list[dict[str, Any]]:
        msgs = [*self.history, *user_message(self.prompt, self.images, self.videos, min_pixels=self.min_pixels,
                                             max_pixels=self.max_pixels)]
        if self.system_prompt:
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs


@dataclass
class Timing:
    """One ``generate`` call, the whole batch: rows are generated together, so they share it."""

    prefill_s: float  # to the first token's logits: the prompt's forward, vision encoder included
    decode_ms_per_token: float | None  # per decoding step (one token of every unfinished row)
    total_s: float  # the whole generate call
    steps: int  # forward passes (new tokens of the longest row)


@dataclass
class BatchOutput:
    """What :func:`generate_inputs` returns: the raw sequences and the batch-level measurements."""

    sequences: torch.Tensor  # (B, prompt_len + steps), CPU
    prompt_len: int  # padded prompt length
    prompt_mask: torch.Tensor  # (B, prompt_len) bool, CPU: real (non-padding) prompt tokens
    reports: list[Any]  # one PruneReport (or None, unpruned) per row
    timing: Timing
    kv_bytes_prompt: int  # KV cache of the prompt right after prefill, all layers and rows
    kv_tokens_prompt: int  # its slots per row (the longest row's kept prompt; padding included)
    kv_slot_bytes: float  # bytes of one token slot of one row over all layers
    eos_ids: tuple[int, ...] = ()

    @property
    def batch_size(self) -> int:
        return int(self.sequences.shape[0])

    def new_tokens(self, row: int) -> list[int]:
        """The row's generated tokens up to and including its first end-of-sequence token (the padding
        a batch appends after a row finished is removed): what the row generates alone."""
        new = self.sequences[row, self.prompt_len:].tolist()
        for i, t in enumerate(new):
            if t in self.eos_ids:
                return new[: i + 1]
        return new

    def prompt_ids(self, row: int) -> torch.Tensor:
        return self.sequences[row, : self.prompt_len][self.prompt_mask[row]]

    def kv_tokens(self, row: int) -> int:
        """Prompt tokens in the row's KV cache after prefill (the kept ones when pruned)."""
        rep = self.reports[row]
        return int(rep.kept.numel()) if rep is not None else int(self.prompt_mask[row].sum())


def _eos_ids(model, kwargs: dict[str, Any]) -> tuple[int, ...]:
    eos = kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def generate_inputs(model, inputs, method=None, *, clock: bool = True, **generate_kwargs) -> BatchOutput:
    """``model.generate(**inputs, **generate_kwargs)`` under ``method`` (``None``: unpruned), timed.

    ``inputs`` must already be on the model's device (left-padded when it has several rows of different
    lengths). ``clock=False`` leaves out the per-step timestamps (a device sync per step on CUDA); the
    prefill and decode timings are then ``nan`` / ``None``."""
    device = next(model.parameters()).device
    kw = dict(generate_kwargs)
    kw["return_dict_in_generate"] = True
    step_clock = StepClock(device) if clock else None
    if step_clock is not None:
        kw["logits_processor"] = LogitsProcessorList([*(kw.get("logits_processor") or []), step_clock])
    ctx = contextlib.nullcontext()
    if method is not None:
        method.last_reports = None
        ctx = method(model)
    with torch.inference_mode(), ctx:
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(**inputs, **kw)
        sync(device)
        t_end = time.perf_counter()
    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape[0], ids.shape[1]
    mask = inputs.get("attention_mask")
    prompt_mask = mask.bool().cpu() if mask is not None else torch.ones(batch, prompt_len, dtype=torch.bool)
    sequences = out.sequences.cpu()
    steps = sequences.shape[1] - prompt_len
    stamps = step_clock.stamps if step_clock is not None else []
    timing = Timing(prefill_s=stamps[0] - t0 if stamps else float("nan"),
                    decode_ms_per_token=1000 * (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1
                    else None, total_s=t_end - t0, steps=steps)
    kv_bytes, kv_slots = kv_cache_bytes(out.past_key_values)
    slot = kv_bytes / (kv_slots * batch) if kv_slots else 0.0
    prompt_slots = kv_slots - max(0, steps - 1)  # generated tokens fed back, all but the last
    reports = list(method.last_reports or [None] * batch) if method is not None else [None] * batch
    return BatchOutput(sequences=sequences, prompt_len=prompt_len, prompt_mask=prompt_mask, reports=reports,
                       timing=timing, kv_bytes_prompt=round(slot * batch * prompt_slots),
                       kv_tokens_prompt=prompt_slots, kv_slot_bytes=slot, eos_ids=_eos_ids(model, kw))


@dataclass
class Generation:
    """One row of :func:`generate_batch`: what that request gets alone (timing: its batch's)."""

    text: str
    tokens: list[int]  # new tokens, up to and including the end-of-sequence token
    report: Any  # PruneReport of the row (None unpruned)
    seen: list[Any]  # the row's images as the model saw them (resized; InternVL: the originals, tiled)
    grids: list[list[int]]  # (t, h, w) patch grid of each of the row's images
    prompt_ids: torch.Tensor  # the row's prompt tokens, padding removed
    kv_tokens: int  # prompt tokens in the row's KV cache after prefill (kept ones when pruned)
    kv_bytes: int  # their bytes over all layers
    timing: Timing = field(repr=False)
    views: list[Any] = field(default_factory=list, repr=False)  # per image: original pixels -> seen pixels

    @property
    def prefill_s(self) -> float:
        """Time to this row's first token: its batch's prefill."""
        return self.timing.prefill_s


def prepare_requests(model, processor, requests: Sequence[Request]):
    """The inputs :func:`generate_batch` gives the model for ``requests`` (one left-padded batch, on the CPU),
    built the model family's way: a :class:`ivcprune.media.Prepared` (``inputs``, per row ``seen`` and
    ``views``). Front doors that must know a prompt's length before generating (the server) call it too."""
    tiles = {r.max_tiles for r in requests}
    if len(tiles) > 1:
        raise ValueError(f"requests of one batch need one max_tiles, got {sorted(tiles, key=str)}")
    patch = model.config.vision_config.patch_size
    return prepare_batch(processor, [r.messages() for r in requests], image_patch_size=patch,
                         model_type=model.config.model_type, max_tiles=tiles.pop())


def generate_batch(model, processor, requests: Sequence[Request], method=None, *, max_new_tokens: int,
                   do_sample: bool = False, clock: bool = True, decode_kwargs: dict[str, Any] | None = None,
                   **generate_kwargs) -> list[Generation]:
    """Answer ``requests`` in one left-padded batch under ``method``; one :class:`Generation` per request.

    Greedy by default; ``generate_kwargs`` go to ``model.generate`` (``temperature``, ``top_p``, ...).
    The text is decoded with ``decode_kwargs`` (default: special tokens skipped)."""
    if not requests:
        return []
    prepared = prepare_requests(model, processor, requests)
    seen, views = prepared.seen, prepared.views
    inputs = prepared.inputs.to(next(model.parameters()).device)
    out = generate_inputs(model, inputs, method, clock=clock, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          **generate_kwargs)
    grids = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
    decode = {"skip_special_tokens": True, **(decode_kwargs or {})}
    rows, first = [], 0
    for b in range(out.batch_size):
        n_images = len(seen[b])
        tokens = out.new_tokens(b)
        kv_tokens = out.kv_tokens(b)
        rows.append(Generation(text=processor.decode(tokens, **decode), tokens=tokens, report=out.reports[b],
                               seen=seen[b], grids=grids[first:first + n_images], prompt_ids=out.prompt_ids(b),
                               kv_tokens=kv_tokens, kv_bytes=round(out.kv_slot_bytes * kv_tokens),
                               timing=out.timing, views=views[b]))
        first += n_images
    return rows


def sorted_batches(items: Iterable[T], batch_size: int, key: Callable[[T], Any] | None = None,
                   window: int = 8) -> Iterator[list[tuple[int, T]]]:
    """``(index, item)`` batches of at most ``batch_size``: each window of ``window`` batches' worth of
    consecutive items is sorted by ``key`` (stable; e.g. the image sizes, to limit padding) and cut into
    batches. Batch size 1, or no key, keeps the order."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    pending: list[tuple[int, T]] = []

    def flush() -> Iterator[list[tuple[int, T]]]:
        order = sorted(pending, key=lambda p: key(p[1])) if key is not None and batch_size > 1 else pending
        for i in range(0, len(order), batch_size):
            yield order[i:i + batch_size]

    for i, item in enumerate(items):
        pending.append((i, item))
        if len(pending) >= batch_size * window:
            yield from flush()
            pending = []
    yield from flush()


__all__ = ["Request", "Generation", "BatchOutput", "Timing", "StepClock", "generate_batch", "generate_inputs",
           "prepare_requests", "kv_cache_bytes", "sorted_batches", "sync"]
