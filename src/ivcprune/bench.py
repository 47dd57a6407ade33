"""Measuring pruned vs unpruned generation in one run: prefill latency, decode ms/token, throughput of
batches (samples/s, generated tokens/s), peak memory, KV-cache bytes, and the FLOP-limited expectation
for the configuration. Every run goes through :func:`ivcprune.generation.generate_inputs`."""

from __future__ import annotations

import gc
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .generation import StepClock, generate_inputs, kv_cache_bytes, sync
from .inputs import build_batch_inputs, stack_inputs, user_message
from .methods import PruningMethod
from .models import synthetic_inputs


def _return_freed_memory_to_os() -> None:
    """glibc keeps freed large blocks in its heap once its mmap threshold has adapted upwards, so RSS
    stops following live memory. A fixed 1 MiB threshold makes every large tensor its own mapping,
    returned on free; then peak RSS measures what the run really held."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or the process's peak RSS on CPU
    (Linux ``/proc/self/clear_refs`` resets the high-water mark). :meth:`split` closes a first phase
    (the vision encoder) so that the rest (the LLM) gets a peak of its own."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None
        self.peak: int | None = None
        self.first_phase_peak: int | None = None
        self.second_phase_peak: int | None = None

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def _read(self) -> int | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, _proc_status("VmHWM") - self.base)

    def __enter__(self):
        gc.collect()
        try:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
                self._reset()
                self.base = torch.cuda.memory_allocated(self.device)
            else:
                _return_freed_memory_to_os()
                self._reset()
                self.base = _proc_status("VmRSS")
        except OSError:
            self.base = None
        return self

    def split(self) -> None:
        if self.base is not None and self.first_phase_peak is None:
            self.first_phase_peak = self._read()
            self._reset()

    def __exit__(self, *exc):
        self.peak = self._read()
        if self.first_phase_peak is not None and self.peak is not None:
            self.peak, self.second_phase_peak = max(self.peak, self.first_phase_peak), self.peak


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(key)


@dataclass
class GenerationRun:
    """One timed generate call (a batch of ``batch_size`` rows; per-row fields are row 0's)."""

    tokens: list[int]  # row 0's new tokens
    prefill_s: float  # forward of the whole prompt, vision encoder included
    vision_s: float
    decode_ms_per_token: float | None  # per decoding step (a token of every row)
    new_tokens: int  # row 0's
    kv_bytes_prompt: int  # KV cache right after prefill, all layers (and rows)
    kv_tokens_prompt: int  # slots per row
    peak_memory_bytes: int | None  # whole generate call
    llm_peak_memory_bytes: int | None  # after the vision encoder: LLM prefill and decoding
    report: dict[str, Any] | None = field(default=None, repr=False)  # row 0's
    batch_size: int = 1
    total_s: float = 0.0  # the whole generate call
    generated_tokens: int = 0  # over all rows
    rows_tokens: list[list[int]] = field(default_factory=list, repr=False)


def _visual_module(model):
    inner = getattr(model, "model", model)
    return getattr(inner, "visual", None) or getattr(inner, "vision_tower", None)


def measure_generate(model, inputs, method: PruningMethod | None, *, max_new_tokens: int = 32,
                     force_length: bool = True, **gen_kwargs) -> GenerationRun:
    """Run ``model.generate`` on ``inputs`` (one row or a batch; pruned by ``method`` if given) through
    :func:`ivcprune.generation.generate_inputs` and time its parts."""
    device = next(model.parameters()).device
    vision_times: list[float] = []
    mem = _PeakMemory(device)
    visual = _visual_module(model)
    handles = []
    if visual is not None:

        def vision_start(module, args):
            sync(device)
            vision_times.append(-time.perf_counter())

        def vision_end(module, args, output):
            sync(device)
            vision_times.append(time.perf_counter())
            mem.split()

        handles += [visual.register_forward_pre_hook(vision_start), visual.register_forward_hook(vision_end)]
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if force_length:
        kw["min_new_tokens"] = max_new_tokens
    kw.update(gen_kwargs)
    try:
        with mem:
            out = generate_inputs(model, inputs, method, **kw)
    finally:
        for h in handles:
            h.remove()
    rows = [out.new_tokens(b) for b in range(out.batch_size)]
    report = out.reports[0].to_dict() if out.reports[0] is not None else None
    if report is not None:  # the batch's selection: every row's
        report["selection_ms"] = sum(r.selection_ms for r in out.reports)
    return GenerationRun(
        tokens=rows[0],
        prefill_s=out.timing.prefill_s,
        vision_s=sum(vision_times),
        decode_ms_per_token=out.timing.decode_ms_per_token,
        new_tokens=len(rows[0]),
        kv_bytes_prompt=out.kv_bytes_prompt,
        kv_tokens_prompt=out.kv_tokens_prompt,
        peak_memory_bytes=mem.peak,
        llm_peak_memory_bytes=mem.second_phase_peak,
        report=report,
        batch_size=out.batch_size,
        total_s=out.timing.total_s,
        generated_tokens=sum(len(r) for r in rows),
        rows_tokens=rows,
    )


# -- FLOP model ---------------------------------------------------------------------------------
def llm_flops(config, seq_lens: list[int]) -> float:
    """Prefill FLOPs of the decoder when layer ``i`` runs on ``seq_lens[i]`` tokens (causal attention)."""
    t = config.get_text_config()
    h = t.hidden_size
    hd = getattr(t, "head_dim", None) or h // t.num_attention_heads
    q_dim, kv_dim = t.num_attention_heads * hd, t.num_key_value_heads * hd
    per_token_linear = 2 * (h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * t.intermediate_size)
    total = 0.0
    for n in seq_lens:
        total += n * per_token_linear + 2 * n * (n + 1) * q_dim  # QK^T and AV over the causal half
    return total


def expected_ratios(config, seq_len: int, kept_len: int, layer: int, context_extra: int = 0,
                    stages: list | None = None) -> dict[str, float]:
    """FLOP-limited expectation: prefill FLOP ratio of the LLM, and decode attention/KV ratio. ``stages``:
    ``[(layer, kept_len), ...]`` of a method that cuts several times (layer ``l`` runs on the length of the
    last stage at or before it); otherwise one cut at ``layer``."""
    n = config.get_text_config().num_hidden_layers
    full = llm_flops(config, [seq_len] * n)
    stages = sorted(stages) if stages else [(layer, kept_len)]
    lens = [next((k for s, k in reversed(stages) if s <= i), seq_len) for i in range(n)]
    pruned = llm_flops(config, lens)
    return {
        "llm_prefill_flop_ratio": pruned / full,
        "kv_ratio": (kept_len + context_extra) / (seq_len + context_extra),
    }


# -- the benchmark ------------------------------------------------------------------------------
def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _image_inputs(model, processor, image_tokens: int, prompt: str, device, batch_size: int = 1):
    """Inputs of ``batch_size`` rows of one shape, each with one image of ``image_tokens`` visual tokens
    (after merging): the same prompt, different pixels (row ``b`` draws them with seed ``b``)."""
    if processor is None or getattr(model.config.vision_config, "spatial_merge_size", None) is None:
        # no processor, or a family whose image size is not set by pixel bounds (fixed sizes, tiles)
        rows = [synthetic_inputs(model.config, image_tokens, seed=b, device=device) for b in range(batch_size)]
        return stack_inputs([inputs for inputs, _ in rows]), rows[0][1]
    merge = model.config.vision_config.spatial_merge_size
    px = model.config.vision_config.patch_size * merge
    gh = max(1, int(image_tokens**0.5))
    while image_tokens % gh:
        gh -= 1
    gw = image_tokens // gh
    pixels = gh * gw * px * px
    conversations = []
    for b in range(batch_size):
        rng = np.random.default_rng(b)
        img = Image.fromarray(rng.integers(0, 255, (gh * px, gw * px, 3), dtype=np.uint8))
        conversations.append(user_message(prompt, [img], min_pixels=pixels, max_pixels=pixels))
    inputs, _ = build_batch_inputs(processor, conversations, image_patch_size=model.config.vision_config.patch_size)
    return inputs.to(device), (gh, gw)


def _variant(runs: list[GenerationRun]) -> dict[str, Any]:
    """Medians over the repeats of one variant (unpruned or pruned) at one shape and batch size."""
    return {
        "prefill_s": _median([r.prefill_s for r in runs]),
        "vision_s": _median([r.vision_s for r in runs]),
        "llm_prefill_s": _median([r.prefill_s - r.vision_s for r in runs]),
        "decode_ms_per_token": _median([r.decode_ms_per_token for r in runs]),
        "total_s": _median([r.total_s for r in runs]),
        "samples_per_s": _median([r.batch_size / r.total_s if r.total_s else None for r in runs]),
        "tokens_per_s": _median([r.generated_tokens / r.total_s if r.total_s else None for r in runs]),
        "peak_memory_bytes": _median([r.peak_memory_bytes for r in runs]),
        "llm_peak_memory_bytes": _median([r.llm_peak_memory_bytes for r in runs]),
        "kv_bytes": _median([r.kv_bytes_prompt for r in runs]),
        "same_tokens_as_unpruned": None,
    }


RATIO_KEYS = ("prefill_s", "llm_prefill_s", "decode_ms_per_token", "total_s", "samples_per_s", "tokens_per_s",
              "peak_memory_bytes", "llm_peak_memory_bytes", "kv_bytes")


def bench_row(model, processor, method: PruningMethod, *, image_tokens: int, batch_size: int, new_tokens: int,
              repeats: int, warmup: int, prompt: str, on_run=None) -> dict[str, Any]:
    """One shape and batch size: unpruned and pruned runs interleaved, medians over ``repeats``."""
    return bench_rows(model, processor, {method.name: method}, image_tokens=image_tokens, batch_size=batch_size,
                      new_tokens=new_tokens, repeats=repeats, warmup=warmup, prompt=prompt, on_run=on_run)[0]


def bench_rows(model, processor, methods: dict[str, PruningMethod], *, image_tokens: int, batch_size: int,
               new_tokens: int, repeats: int, warmup: int, prompt: str, on_run=None) -> list[dict[str, Any]]:
    """One shape and batch size, several methods: the unpruned run and every method's interleaved in each
    repeat (so every ratio compares runs of one moment), medians over ``repeats``; one row per method."""
    device = next(model.parameters()).device
    inputs, grid = _image_inputs(model, processor, image_tokens, prompt, device, batch_size)
    variants = [("unpruned", None), *methods.items()]
    runs: dict[str, list[GenerationRun]] = {name: [] for name, _ in variants}
    for i in range(warmup + repeats):
        for name, m in variants:
            r = measure_generate(model, inputs, m, max_new_tokens=new_tokens)
            if i >= warmup:
                runs[name].append(r)
            if on_run is not None:
                on_run()
    seq_len = inputs["input_ids"].shape[1]
    base = _variant(runs["unpruned"])
    n_layers = model.config.get_text_config().num_hidden_layers
    rows = []
    for name in methods:
        rep = runs[name][-1].report or {}
        kept_len = rep.get("kept_len", seq_len)
        layer = rep.get("layer") or 0
        row: dict[str, Any] = {
            "method": name,
            "image_tokens": image_tokens,
            "batch_size": batch_size,
            "grid": list(grid),
            "seq_len": seq_len,
            "kept_len": kept_len,
            "visual_kept": rep.get("visual_kept"),
            "layer": layer,
            "stages": rep.get("stages"),
            "selection_ms": _median([(r.report or {}).get("selection_ms") for r in runs[name]]),
            "config": rep.get("config", {}),
            "unpruned": base,
            "pruned": _variant(runs[name]),
        }
        row["pruned"]["same_tokens_as_unpruned"] = runs[name][-1].rows_tokens == runs["unpruned"][-1].rows_tokens
        u, p = row["unpruned"], row["pruned"]
        row["ratios"] = {k: (p[k] / u[k] if u[k] and p[k] is not None else None) for k in RATIO_KEYS}
        row["expected"] = expected_ratios(model.config, seq_len, kept_len, layer, stages=rep.get("stages"))
        row["layer_ms_estimate"] = 1000 * u["llm_prefill_s"] / n_layers if u["llm_prefill_s"] else None
        rows.append(row)
    return rows


def run_bench(model, processor, method: PruningMethod | dict[str, PruningMethod], *, image_tokens: list[int],
              batch_sizes: list[int] = (1,), new_tokens: int = 32, repeats: int = 5, warmup: int = 1,
              prompt: str = "Describe the image in detail.", model_name: str = "", progress: bool = True
              ) -> dict[str, Any]:
    """Unpruned vs pruned, interleaved, medians over ``repeats``, for every image size x batch size (a
    batch of identical-shape prompts; throughput = samples and generated tokens per second of the whole
    generate call); returns a JSON-able dict. ``method`` may be several methods by name: each gets its row
    per shape, measured interleaved with the others and the unpruned run."""
    from tqdm.auto import tqdm

    methods = method if isinstance(method, dict) else {method.name: method}
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be at least 1, got {list(batch_sizes)}")
    total = len(image_tokens) * len(batch_sizes) * (warmup + repeats) * (1 + len(methods))
    bar = tqdm(total=total, desc="bench", disable=not progress, unit="run")
    rows = [row for n_img in image_tokens for b in batch_sizes
            for row in bench_rows(model, processor, methods, image_tokens=n_img, batch_size=b, new_tokens=new_tokens,
                                  repeats=repeats, warmup=warmup, prompt=prompt, on_run=lambda: bar.update(1))]
    bar.close()
    configs = {}
    for r in rows:
        configs[r["method"]] = r.pop("config", {})
    return {
        "model": model_name,
        **environment(model),
        "method": "; ".join(describe(c) for c in configs.values()),
        "methods": list(methods),
        "config": next(iter(configs.values()), {}) if len(methods) == 1 else configs,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "batch_sizes": list(batch_sizes),
        "rows": rows,
    }


def environment(model: torch.nn.Module) -> dict[str, Any]:
    """Where and how a model runs: device, dtype, attention implementation and library versions."""
    import transformers

    from . import __version__

    param = next(model.parameters())
    return {
        "device": _device_name(param.device),
        "dtype": str(param.dtype).replace("torch.", ""),
        "attn_implementation": model.config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "ivcprune": __version__,
    }


def describe(config: dict[str, Any]) -> str:
    """Short description of a resolved method configuration, e.g. ``ivc K=16 budget=0.5 rule=fill``."""
    if not config:
        return "none"
    parts = [config.get("method", "?"), f"K={config.get('layer')}"]
    if config.get("rule") == "union":
        parts.append(f"union(fg={config.get('foreground_ratio')})")
    elif config.get("budget_tokens"):
        parts.append(f"budget={config['budget_tokens']} tokens")
    else:
        parts.append(f"budget={config.get('budget')}")
    if config.get("ablation"):
        parts.append(config["ablation"])
    return " ".join(parts)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _fmt_bytes(b) -> str:
    if b is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def _r(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def bench_markdown(result: dict[str, Any]) -> str:
    """The benchmark as a markdown table (pruned / unpruned ratios measured in one run)."""
    head = (
        f"Model `{result['model']}` on {result['device']}, {result['dtype']}, {result['attn_implementation']}; "
        f"{result['method']}; {result['new_tokens']} new tokens; medians of {result['repeats']} runs.\n\n"
        + ("| method " if len(result.get("methods", [])) > 1 else "")
        + "| visual tokens | batch | seq → kept | LLM prefill s | ratio | expected | prefill incl. vision s | ratio "
        "| decode ms/tok | ratio | samples/s | tok/s | ratio | LLM peak mem | ratio | peak mem | ratio "
        "| KV cache | ratio | selection ms |\n"
        + ("|---" if len(result.get("methods", [])) > 1 else "")
        + "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    several = len(result.get("methods", [])) > 1
    for r in result["rows"]:
        u, p, q = r["unpruned"], r["pruned"], r["ratios"]
        lines.append(
            (f"| {r['method']} " if several else "")
            + f"| {r['image_tokens']} | {r.get('batch_size', 1)} | {r['seq_len']} → {r['kept_len']} "
            f"| {_r(u['llm_prefill_s'], 3)} → {_r(p['llm_prefill_s'], 3)} | {_r(q['llm_prefill_s'])} "
            f"| {_r(r['expected']['llm_prefill_flop_ratio'])} "
            f"| {_r(u['prefill_s'], 3)} → {_r(p['prefill_s'], 3)} | {_r(q['prefill_s'])} "
            f"| {_r(u['decode_ms_per_token'], 1)} → {_r(p['decode_ms_per_token'], 1)} | {_r(q['decode_ms_per_token'])} "
            f"| {_r(u.get('samples_per_s'))} → {_r(p.get('samples_per_s'))} "
            f"| {_r(u.get('tokens_per_s'), 1)} → {_r(p.get('tokens_per_s'), 1)} | {_r(q.get('tokens_per_s'))} "
            f"| {_fmt_bytes(u['llm_peak_memory_bytes'])} → {_fmt_bytes(p['llm_peak_memory_bytes'])} "
            f"| {_r(q['llm_peak_memory_bytes'])} "
            f"| {_fmt_bytes(u['peak_memory_bytes'])} → {_fmt_bytes(p['peak_memory_bytes'])} "
            f"| {_r(q['peak_memory_bytes'])} "
            f"| {_fmt_bytes(u['kv_bytes'])} → {_fmt_bytes(p['kv_bytes'])} | {_r(q['kv_bytes'])} "
            f"| {_r(r['selection_ms'], 1)} |"
        )
    notes = (
        "\n\nbatch = prompts of one shape generated together (prefill, decode step, memory, KV cache and selection "
        "are the whole batch's); samples/s and tok/s = the batch's samples and generated tokens over the whole "
        "generate call (ratio: pruned / unpruned throughput). "
        "LLM prefill = prefill minus the vision encoder; expected = LLM prefill FLOPs pruned / unpruned "
        "(layers before K, or before each stage, run on more tokens). Peak memory = rise above the level before "
        "generate (CUDA allocator, or the process's peak RSS on CPU); LLM peak = the same after the vision "
        "encoder finished. "
        "KV cache = all layers, after prefill. selection ms = "
        "time to choose the kept tokens (one decoder layer of unpruned prefill takes about "
        + ", ".join(dict.fromkeys(f"{_r(r['layer_ms_estimate'], 1)} ms" for r in result["rows"]))
        + " here)."
    )
    return head + "\n".join(lines) + notes


def save_bench(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "bench.json", out / "bench.md"
    j.write_text(json.dumps(result, indent=2))
    m.write_text(bench_markdown(result) + "\n")
    return j, m


__all__ = ["measure_generate", "run_bench", "bench_row", "bench_markdown", "save_bench", "expected_ratios",
           "llm_flops", "kv_cache_bytes", "GenerationRun", "StepClock"]
