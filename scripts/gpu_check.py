#!/usr/bin/env python3
"""GPU check of IVC-Prune: equivalence on the device in its dtype, and the benchmark at Qwen2.5-VL-7B's shapes.

Run through ``scripts/gpu_check.sh`` on a GPU machine (its header says how to prepare and launch it), or
directly::

    python scripts/gpu_check.py                       # cuda, bfloat16: the full check (about 3 min on an H100)
    python scripts/gpu_check.py --device cpu --dtype float32 --quick --out /tmp/gpucheck   # CPU smoke run

Writes ``gpu_check.md`` (one markdown file: environment header, equivalence rows, benchmark tables) and
``gpu_check.json`` to ``--out``; both are rewritten after every section, so a run killed half-way still leaves
what it had. Every check is guarded: a failure becomes a FAIL row with its error, never a crash. Exit status
0 when no row FAILs, 1 otherwise.

a. Equivalence, for both families (tiny random Qwen2.5-VL / Qwen2-VL, 4 layers, init_std 0.15, moved to the
   device and dtype) and every attention implementation tried (sdpa, eager, and flash_attention_2 when
   ``flash_attn`` imports and the dtype is half precision): IVCPrune(layer=2) pruned-and-cut against the
   masked reference of ``tests/reference.py`` (the unpruned model with the pruned tokens masked as keys) --
   prefill logits of the kept tokens, greedy tokens over 8 steps, decode logits, KV length of every layer --
   and a left-padded batch of mixed rows (``tests/conftest.py::mixed_rows``) against each row alone.
   flash_attention_2 cannot take the reference's 4-D float mask, so its reference runs on an sdpa twin with
   the same weights (the difference then includes the kernels' own rounding).
b. ``ivcprune.bench.run_bench`` on ``random:qwen2.5-vl-7b`` (random weights, the real 28-layer LLM, bf16,
   sdpa) for 1024 / 4096 / 16384 visual tokens at batch 1 and 8, unpruned vs IVC-Prune (paper preset K=16,
   50%). Combinations are run from cheap to expensive; one that would not fit in GPU memory (estimate below)
   or in the time left (extrapolated from the last one run) is skipped with a row saying why, and a SIGALRM
   aborts one that overruns the time budget anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "tests", ROOT / "src"):  # src first: the checkout's ivcprune, tests/ for the reference
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
N_STEPS = 8  # greedy steps compared against the masked reference
N_BATCH_STEPS = 4  # greedy steps compared between a batch and its rows alone
K = 2  # pruning layer of the tiny 4-layer models


# -- tolerances ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tol:
    """``logit_rel``: largest |pruned - reference| logit allowed, as a fraction of the reference's largest
    |logit| (the logits' scale). ``kept_swap``: fraction of a row's visual tokens whose kept/pruned status may
    differ between the row batched and the row alone (0: the sets must be equal)."""

    logit_rel: float
    kept_swap: float
    why: str


# float32: the CPU test suite asserts atol 2e-4 on logits of scale ~5 (4e-5 relative); CUDA's float32
# kernels (cuBLAS split-K, SDPA's memory-efficient kernel with a mask vs the flash kernel without) sum in other
# orders, so 1e-4 relative (~800 float32 epsilons) leaves room for that and nothing else.
# bfloat16: 8 significant bits, epsilon 2^-8 = 0.39%. The pruned run and the reference compute the same
# numbers through different shapes (a cut sequence vs a masked full one, padded batch vs row alone): other
# kernels, other tilings, other rounding of every bf16 intermediate (q/k/v, attention probabilities inside
# the kernel, MLP activations, the residual stream), compounded over 4 layers and the LM head. On the CPU the
# measured difference is 1 ulp of the largest logit (0.7%); on the GPU flash/memory-efficient kernels keep P
# in bf16 as well, so allow 5% (~13 epsilons). A real bug (a wrong mask, a wrong position, a cut in the
# wrong place, a stale cache slot) moves logits by O(1) of their scale: a 5% tolerance still catches it.
# float16: 11 significant bits (epsilon 2^-11), same reasoning: 1%.
# Greedy tokens: in half precision two candidates can be within rounding of each other (the CPU run saw an
# exact bf16 tie), so tokens may legitimately diverge; the check passes when they are all equal, or when
# they first differ at a near-tie: the reference's logits of the two candidates at that step are closer than
# twice the logit tolerance. Steps after a divergence run on other contexts and are not compared.
# Kept sets of a batched row vs the row alone: the positional IVC tokens are exact, the foreground ranking
# reads value vectors computed in the model dtype, so in half precision a score near the budget boundary
# may swap: up to 2% of a row's visual tokens (at least one) may differ; exact in float32.
TOLERANCES = {
    torch.float32: Tol(1e-4, 0.0, "float32: 1e-4 of the logits' scale, kept sets exact"),
    torch.bfloat16: Tol(5e-2, 0.02, "bfloat16: 5% of the logits' scale (~13 bf16 epsilons); greedy tokens may "
                                     "diverge only at a near-tie (< 2x that); batched kept sets may differ in "
                                     "<= 2% of a row's visual tokens (rows that differ are not logit-compared)"),
    torch.float16: Tol(1e-2, 0.02, "float16: 1% of the logits' scale; near-tie and kept-set rules as bfloat16"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# -- rows, output -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    section: str
    family: str
    attn: str
    check: str
    metric: str
    value: str
    status: str
    note: str = ""
    dtype: str = ""


class Report:
    def __init__(self, out: Path, args, env: dict[str, Any]):
        self.out, self.args, self.env = out, args, env
        self.rows: list[Row] = []
        self.bench_rows: list[dict[str, Any]] = []  # one per (visual tokens, batch): status and why
        self.bench_results: list[dict[str, Any]] = []  # run_bench's results, one per combination run
        self.bench_notes: list[str] = []
        self.sections_s: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.dtype = ""  # stamped on rows added without one
        out.mkdir(parents=True, exist_ok=True)

    def add(self, *rows: Row) -> None:
        for r in rows:
            r.dtype = r.dtype or self.dtype
            self.rows.append(r)
            print(f"[{r.status}] {r.section} {r.dtype} {r.family} {r.attn} {r.check}: {r.metric} = {r.value}"
                  + (f" ({r.note})" if r.note else ""), flush=True)

    def counts(self) -> dict[str, int]:
        statuses = [r.status for r in self.rows] + [r["status"] for r in self.bench_rows]
        return {s: statuses.count(s) for s in (PASS, FAIL, SKIP)}

    def write(self) -> None:
        data = {"environment": self.env, "args": vars(self.args), "counts": self.counts(),
                "elapsed_s": round(time.perf_counter() - self.t0, 1), "sections_s": self.sections_s,
                "rows": [dataclasses.asdict(r) for r in self.rows], "bench_runs": self.bench_rows,
                "bench_notes": self.bench_notes, "bench": self.bench_results}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(self.markdown())

    def markdown(self) -> str:
        e, c = self.env, self.counts()
        lines = [
            "# IVC-Prune GPU check",
            "",
            f"- device: {e['device_name']} (`{e['device']}`)",
            f"- torch {e['torch']} (CUDA {e['cuda']}), transformers {e['transformers']}, ivcprune {e['ivcprune']}, "
            f"python {e['python']}",
            f"- dtype: {e['dtype']}" + (f" (equivalence also in {', '.join(e['extra_dtypes'])})"
                                       if e.get("extra_dtypes") else "")
            + f"; mode: {'quick' if self.args.quick else 'full'}",
            f"- attention implementations tried: {', '.join(e['attn_tried'])}"
            + (f"; not tried: {e['attn_not_tried']}" if e.get("attn_not_tried") else ""),
            f"- flash_attn: {e['flash_attn']}",
            *[f"- tolerance {TOLERANCES[DTYPES[d]].why}" for d in [e["dtype"], *e.get("extra_dtypes", [])]],
            f"- result: {c[PASS]} PASS, {c[FAIL]} FAIL, {c[SKIP]} SKIP in {time.perf_counter() - self.t0:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in self.sections_s.items())})",
            "",
            "## Equivalence",
            "",
            f"IVCPrune(layer={K}) pruned-and-cut vs the masked reference (`tests/reference.py`: the unpruned model "
            f"with the pruned tokens masked as keys), on tiny random models (4 layers, init_std 0.15) on "
            f"`{e['device']}`; batched = the four mixed rows of `tests/conftest.py::mixed_rows`, "
            "left-padded, vs each row alone (same pruner). Relative values are |difference| / max |reference "
            "logit|.",
            "",
            "| dtype | family | attn | check | metric | value | status | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append("| " + " | ".join(_cell(x) for x in (r.dtype, r.family, r.attn, r.check, r.metric, r.value,
                                                              r.status, r.note)) + " |")
        lines += ["", "## Bench", ""]
        lines += [f"- {n}" for n in self.bench_notes]
        lines += ["", "| visual tokens | batch | status | seconds | note |", "|---|---|---|---|---|"]
        for b in self.bench_rows:
            secs = "" if b.get("seconds") is None else f"{b['seconds']:.0f}"
            lines.append("| " + " | ".join(_cell(x) for x in (b["image_tokens"], b["batch_size"], b["status"], secs,
                                                              b.get("note", ""))) + " |")
        for batch, result in _bench_by_batch(self.bench_results):
            from ivcprune.bench import bench_markdown

            lines += ["", f"### batch {batch}", "", bench_markdown(result)]
        return "\n".join(lines) + "\n"


def _cell(x) -> str:
    """A markdown table cell: pipes escaped, no line breaks."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def _bench_by_batch(results: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """run_bench results (one combination each) merged into one result per batch size, rows by visual tokens."""
    groups: dict[int, dict[str, Any]] = {}
    for res in results:
        for row in res["rows"]:
            b = int(row.get("batch_size", 1))
            g = groups.setdefault(b, {**{k: v for k, v in res.items() if k != "rows"}, "batch_sizes": [b], "rows": []})
            g["rows"].append(row)
    for g in groups.values():
        g["rows"].sort(key=lambda r: r["image_tokens"])
    return sorted(groups.items())


def guarded(report: Report, section: str, family: str, attn: str, check: str):
    """Context manager: an exception inside becomes a FAIL row (with the last frames of its traceback)."""

    @contextlib.contextmanager
    def cm():
        from ivcprune.families import UnsupportedModelError

        try:
            yield
        except UnsupportedModelError as exc:  # the family refuses this setup (Gemma 3 with flash attention)
            report.add(Row(section, family, attn, check, "refused", type(exc).__name__, SKIP, str(exc)[:300]))
        except Exception as exc:  # noqa: BLE001 - every failure is a row
            tb = traceback.extract_tb(exc.__traceback__)[-3:]
            where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in tb)
            report.add(Row(section, family, attn, check, "error", type(exc).__name__, FAIL,
                           f"{str(exc)[:300]} [{where}]"))
            traceback.print_exc()

    return cm()


# -- environment --------------------------------------------------------------------------------------------
def flash_attn_status() -> tuple[bool, str]:
    try:
        import flash_attn  # noqa: F401

        return True, f"imports (flash_attn {getattr(flash_attn, '__version__', '?')})"
    except Exception as exc:  # noqa: BLE001 - ImportError, or an undefined symbol in its extension
        return False, f"does not import ({type(exc).__name__}: {str(exc)[:120]})"


def environment(args, device: torch.device, attn_tried: list[str], attn_not_tried: str) -> dict[str, Any]:
    import transformers

    import ivcprune

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, " \
        f"{torch.get_num_threads()} threads)"
    mem = None
    if device.type == "cuda":
        mem = torch.cuda.get_device_properties(device).total_memory
    return {"device": str(device), "device_name": name, "device_memory_bytes": mem, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "ivcprune": ivcprune.__version__,
            "ivcprune_path": str(Path(ivcprune.__file__).parent), "python": platform.python_version(),
            "dtype": args.dtype, "attn_tried": attn_tried, "attn_not_tried": attn_not_tried,
            "flash_attn": flash_attn_status()[1]}


# -- a. equivalence -----------------------------------------------------------------------------------------
def _to(inputs: dict, device) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


def _generate(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


def _rel(diff: float, scale: float) -> float:
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _fmt_rel(diff: float, scale: float) -> str:
    return f"{_rel(diff, scale):.2e} (|Δ| {diff:.3g} of {scale:.3g})"


def compare_tokens(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor], tol_abs: float):
    """(equal steps, first divergent step or None, near-tie margin or None, ok)."""
    for t, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            margin = float((ref_logits[t][b] - ref_logits[t][a]).abs())
            return t, t, margin, margin <= 2 * tol_abs
    return len(ref), None, None, len(ours) == len(ref)


def _tokens_row(section, family, attn, check, ours, ref, ref_logits, tol_abs) -> Row:
    same, div, margin, ok = compare_tokens(ours, ref, ref_logits, tol_abs)
    if div is None:
        return Row(section, family, attn, check, "equal steps", f"{same}/{len(ref)}", PASS if ok else FAIL)
    note = (f"first differ at step {div}: reference margin between the two tokens {margin:.3g} "
            f"{'<=' if ok else '>'} 2 x tolerance {2 * tol_abs:.3g}" + (" (a near-tie)" if ok else ""))
    return Row(section, family, attn, check, "equal steps", f"{same}/{len(ref)}", PASS if ok else FAIL, note)


def check_reference(report: Report, family: str, attn: str, model, ref_model, device, tol: Tol,
                    ref_label: str = "") -> None:
    """Pruned-and-cut vs the masked reference: prefill logits of kept tokens, greedy tokens, decode logits,
    KV lengths of every layer."""
    from ivcprune import IVCPrune

    from conftest import make_inputs
    from reference import masked_reference

    sec = "reference"
    inputs = _to(make_inputs(model, media=(("image", 1, 12, 16),)), device)
    S = inputs["input_ids"].shape[1]
    pruner = IVCPrune(layer=K)
    with torch.no_grad(), pruner(model):
        logits = model(**inputs).logits[0].float()
        out = _generate(model, inputs, N_STEPS)
    rep = pruner.last_report
    keep = rep.kept
    with torch.no_grad(), masked_reference(ref_model, keep, K):
        ref_logits = ref_model(**inputs).logits[0].float()
        ref = _generate(ref_model, inputs, N_STEPS)
    with torch.no_grad():  # the pruning's own effect on the last prompt token, for scale
        full_last = ref_model(**inputs).logits[0, -1].float()

    n = int(keep.numel())
    report.add(Row(sec, family, attn, "pruning is active", "kept prompt tokens", f"{n}/{S}",
                   PASS if rep.pruned and n < S else FAIL, f"visual kept {rep.visual_kept}/{rep.visual_tokens}"))

    rk = ref_logits[keep.to(ref_logits.device)]
    scale = float(rk.abs().max())
    diff = float((logits - rk).abs().max()) if logits.shape == rk.shape else math.inf
    effect = float((full_last - rk[-1]).abs().max())
    report.add(Row(sec, family, attn, "prefill logits of kept tokens", "max|Δ| / max|ref|", _fmt_rel(diff, scale),
                   PASS if _rel(diff, scale) <= tol.logit_rel else FAIL,
                   f"shape {tuple(logits.shape)} vs {tuple(rk.shape)}; tolerance {tol.logit_rel:g}; pruning itself "
                   f"moves the last token's logits by {effect:.3g} ({_rel(effect, scale):.1%} of the scale)"
                   + (f"; {ref_label}" if ref_label else "")))

    ours_tok = out.sequences[0, S:].tolist()
    ref_tok = ref.sequences[0, S:].tolist()
    ref_step_logits = [x[0].float() for x in ref.logits]
    report.add(_tokens_row(sec, family, attn, f"greedy tokens, {N_STEPS} steps", ours_tok, ref_tok, ref_step_logits,
                           tol.logit_rel * scale))

    _, div, _, _ = compare_tokens(ours_tok, ref_tok, ref_step_logits, tol.logit_rel * scale)
    upto = N_STEPS if div is None else div + 1  # steps whose context is the same in both runs
    d = max(float((a[0].float() - b[0].float()).abs().max()) for a, b in zip(out.logits[:upto], ref.logits[:upto]))
    s = max(float(b[0].float().abs().max()) for b in ref.logits[:upto])
    report.add(Row(sec, family, attn, "decode logits", "max|Δ| / max|ref|", _fmt_rel(d, s),
                   PASS if _rel(d, s) <= tol.logit_rel else FAIL,
                   f"steps 0..{upto - 1} (same context)" + (f"; {ref_label}" if ref_label else "")))

    want = n + N_STEPS - 1  # the last generated token is never fed back
    lengths = [layer.get_seq_length() for layer in out.past_key_values.layers]
    n_layers = model.config.get_text_config().num_hidden_layers
    ok = lengths == [want] * len(lengths) and len(lengths) == n_layers and _held(out.past_key_values, want)
    report.add(Row(sec, family, attn, "KV length of every layer", "keys per layer",
                   f"{len(lengths)} x {sorted(set(lengths))}", PASS if ok else FAIL,
                   f"expected {want} = kept {n} + {N_STEPS} - 1 in every layer; unpruned would hold {S + N_STEPS - 1}"))


def _held(cache, length: int) -> bool:
    """Every layer holds keys and values of ``length`` slots, a sliding-window layer (Gemma 3) the last
    ``window - 1`` of them (its length above is its cumulative one)."""
    return all(layer.keys.shape[-2] == layer.values.shape[-2] == min(length, getattr(layer, "sliding_window",
                                                                                       length + 1) - 1)
               for layer in cache.layers)


def check_batch(report: Report, family: str, attn: str, model, device, tol: Tol) -> None:
    """A left-padded batch of mixed rows vs each row alone: kept sets, greedy tokens, logits, KV lengths."""
    from ivcprune import IVCPrune

    from conftest import batch_inputs, mixed_rows

    sec = "batch"
    rows_cpu = mixed_rows(model)
    rows = [_to(r, device) for r in rows_cpu]
    batch = _to(batch_inputs(rows_cpu), device)
    S = batch["input_ids"].shape[1]
    pruner = IVCPrune(layer=K)
    with torch.no_grad(), pruner(model):
        out = _generate(model, batch, N_BATCH_STEPS)
        reports = list(pruner.last_reports)
        alone = []
        for r in rows:
            alone.append((_generate(model, r, N_BATCH_STEPS), pruner.last_report))

    # kept sets
    swaps, notes, same_set = [], [], []
    for i, (_, rep) in enumerate(alone):
        a, b = set(reports[i].kept.tolist()), set(rep.kept.tolist())
        n_sw = math.ceil(len(a ^ b) / 2)  # a swap = one position in, one out
        visual = max(1, rep.visual_tokens)
        allowed = 0 if tol.kept_swap == 0 else max(1, math.floor(tol.kept_swap * visual))
        swaps.append(n_sw <= allowed)
        same_set.append(n_sw == 0)
        if n_sw:
            notes.append(f"row {i}: {len(a ^ b)} positions differ, {n_sw} swaps (allowed {allowed} of {visual} "
                         "visual tokens)")
    pruned_rows = [i for i, r in enumerate(reports) if r.pruned]
    ok = all(swaps) and len(reports) == len(rows) and pruned_rows == [0, 2, 3] and not reports[1].pruned
    report.add(Row(sec, family, attn, "kept sets, batched vs alone", "rows with equal sets",
                   f"{sum(same_set)}/{len(rows)}", PASS if ok else FAIL,
                   "; ".join(notes) or f"rows pruned: {pruned_rows} (row 1 has no image)"))

    # tokens and logits, row by row (logits only for rows whose kept sets are equal)
    tok_rows, tok_notes, d_max, s_max, compared = [], [], 0.0, 0.0, []
    for i, (single, _) in enumerate(alone):
        ours = out.sequences[i, S:].tolist()
        ref = single.sequences[0, -N_BATCH_STEPS:].tolist()
        ref_logits = [x[0].float() for x in single.logits]
        scale = max(float(x.abs().max()) for x in ref_logits)
        same, div, margin, ok_i = compare_tokens(ours, ref, ref_logits, tol.logit_rel * scale)
        if not same_set[i]:
            ok_i = True  # other kept tokens, another computation: not compared
            tok_notes.append(f"row {i} not compared (kept sets differ)")
        elif div is not None:
            tok_notes.append(f"row {i} first differs at step {div}, margin {margin:.3g}"
                             + (" (near-tie)" if ok_i else ""))
        tok_rows.append(ok_i)
        if same_set[i]:
            upto = N_BATCH_STEPS if div is None else div + 1
            compared.append(i)
            for a, b in zip(out.logits[:upto], single.logits[:upto]):
                d_max = max(d_max, float((a[i].float() - b[0].float()).abs().max()))
                s_max = max(s_max, float(b[0].float().abs().max()))
    equal_rows = sum(torch.equal(out.sequences[i, S:].cpu(), single.sequences[0, -N_BATCH_STEPS:].cpu())
                     for i, (single, _) in enumerate(alone))
    report.add(Row(sec, family, attn, f"greedy tokens, {N_BATCH_STEPS} steps", "rows with equal tokens",
                   f"{equal_rows}/{len(rows)}", PASS if all(tok_rows) else FAIL, "; ".join(tok_notes)))
    report.add(Row(sec, family, attn, "logits, batched vs alone", "max|Δ| / max|ref|", _fmt_rel(d_max, s_max),
                   PASS if compared and _rel(d_max, s_max) <= tol.logit_rel else FAIL,
                   f"rows {compared}, steps with the same context; tolerance {tol.logit_rel:g}"))

    kept = [int(r.kept.numel()) for r in reports]
    lengths = [layer.get_seq_length() for layer in out.past_key_values.layers]
    want = max(kept) + N_BATCH_STEPS - 1
    ok = lengths == [want] * len(lengths) and _held(out.past_key_values, want)
    report.add(Row(sec, family, attn, "KV length of every layer (batch)", "keys per layer",
                   f"{len(lengths)} x {sorted(set(lengths))}", PASS if ok else FAIL,
                   f"expected the longest row's kept {max(kept)} + {N_BATCH_STEPS} - 1; kept per row {kept}"))


def section_equivalence(report: Report, device, dtypes: list[torch.dtype], attns: list[str]) -> None:
    from ivcprune.cut import is_flash

    from conftest import FAMILIES, make_model

    names = {v: k for k, v in DTYPES.items()}
    for dtype in dtypes:
        tol = TOLERANCES[dtype]
        report.dtype = names[dtype]
        for family in FAMILIES:
            for attn in attns:
                if is_flash(attn) and dtype == torch.float32:
                    continue  # flash attention runs in float16 / bfloat16 only
                model = ref_model = None
                with guarded(report, "setup", family, attn, "build model"):
                    model = make_model(family, attn=attn).to(device=device, dtype=dtype)
                    if is_flash(attn):
                        # flash attention cannot apply the reference's 4-D float mask: the reference runs on an
                        # sdpa twin with exactly the same weights
                        ref_model = make_model(family, attn="sdpa").to(device=device, dtype=dtype)
                        ref_model.load_state_dict(model.state_dict())
                    else:
                        ref_model = model
                if model is None:
                    continue
                with guarded(report, "reference", family, attn, "pruned vs masked reference"):
                    check_reference(report, family, attn, model, ref_model, device, tol,
                                    ref_label="reference on an sdpa twin (same weights)" if ref_model is not model
                                    else "")
                with guarded(report, "batch", family, attn, "batched vs alone"):
                    check_batch(report, family, attn, model, device, tol)
                del model, ref_model
                _free(device)
                report.write()
    report.dtype = ""


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- b. bench -----------------------------------------------------------------------------------------------
class BudgetExceeded(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: float):
    """Raise BudgetExceeded in the main thread after ``seconds`` (checked between Python bytecodes)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise BudgetExceeded(f"stopped after {seconds:.0f} s: the time budget ran out")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def vision_flops(vcfg, patches: int) -> float:
    """Forward FLOPs of the vision tower on one image of ``patches`` patches (window and full attention)."""
    d = getattr(vcfg, "embed_dim", None) or vcfg.hidden_size  # Qwen2-VL: embed_dim (hidden_size = merger output)
    gated = getattr(vcfg, "intermediate_size", None) is not None  # Qwen2.5-VL: gated MLP; Qwen2-VL: mlp_ratio
    inter = vcfg.intermediate_size if gated else d * getattr(vcfg, "mlp_ratio", 4)
    mlp = 3 if gated else 2
    full = set(getattr(vcfg, "fullatt_block_indexes", None) or range(vcfg.depth))
    window = (getattr(vcfg, "window_size", 112) // vcfg.patch_size) ** 2
    total = 0.0
    for i in range(vcfg.depth):
        span = patches if i in full else min(patches, window)
        total += patches * (2 * (4 * d * d + mlp * d * inter) + 4 * span * d)
    return total


def estimate_memory(model, n: int, b: int, text: int = 48) -> int:
    """Bytes a generate call adds above the loaded model, the larger of its two phases (vision, LLM) plus
    the KV cache: activations the code keeps alive at once, rounded up."""
    cfg = model.config
    t = cfg.get_text_config()
    eb = next(model.parameters()).element_size()
    seq = n + text
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    kv = b * seq * t.num_hidden_layers * 2 * t.num_key_value_heads * hd * eb
    llm = b * seq * (3 * t.intermediate_size + 8 * t.hidden_size) * eb + b * seq * seq  # + a bool mask
    vc = cfg.vision_config
    d = getattr(vc, "embed_dim", None) or vc.hidden_size
    inter = getattr(vc, "intermediate_size", None) or d * getattr(vc, "mlp_ratio", 4)
    patches = n * vc.spatial_merge_size**2
    per_patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    vision = b * patches * ((3 * inter + 10 * d) * eb + per_patch * 4 * 2)  # + float32 pixels (+ copy)
    return int(1.2 * (max(llm, vision) + kv))


def predict_seconds(model, last: dict[str, Any], n: int, b: int, calls: int, new_tokens: int) -> float:
    """Seconds for ``calls`` generate calls at (n, b), extrapolated from the last combination run: prefill by
    FLOPs (LLM + vision; small shapes run less efficiently, so this overestimates), decode steps by the bytes
    each step reads (weights + KV cache)."""
    from ivcprune.bench import llm_flops

    cfg = model.config
    t = cfg.get_text_config()
    vc = cfg.vision_config

    def flops(n_, b_):
        seq = n_ + 48
        return b_ * (llm_flops(cfg, [seq] * t.num_hidden_layers) + vision_flops(vc, n_ * vc.spatial_merge_size**2))

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    per_tok = t.num_hidden_layers * 2 * t.num_key_value_heads * hd * next(model.parameters()).element_size()
    ln, lb = last["image_tokens"], last["batch_size"]
    f_ratio = flops(n, b) / flops(ln, lb)
    m_ratio = (weights + b * (n + 48) * per_tok) / (weights + lb * (ln + 48) * per_tok)
    total = 0.0
    for v in ("unpruned", "pruned"):
        u = last[v]
        prefill = u["prefill_s"] or 0.0
        decode = (u["total_s"] or 0.0) - prefill
        total += prefill * f_ratio + decode * max(1.0, m_ratio)
    return calls / 2 * total * 1.15 + 2.0  # calls alternate unpruned / pruned; + input building


def section_bench(report: Report, args, device, dtype, deadline: float) -> None:
    from ivcprune import IVCPrune
    from ivcprune.bench import run_bench
    from ivcprune.models import random_config, random_model

    if args.quick:
        spec, tokens, batches = "tiny-qwen2.5-vl", [16, 64], [1, 2]
        overrides: dict[str, Any] = {}
        new_tokens, repeats, warmup = 4, 1, 0
    else:
        spec, tokens, batches = args.bench_model, list(args.image_tokens), list(args.batch_sizes)
        real_depth = random_config(spec).vision_config.depth
        overrides = {"vision.depth": args.vision_depth} if 0 < args.vision_depth < real_depth else {}
        new_tokens, repeats, warmup = args.new_tokens, args.repeats, args.warmup
    has_batch = "batch_sizes" in inspect.signature(run_bench).parameters
    if not has_batch:
        # TODO(batch): fallback for a checkout whose ivcprune.bench.run_bench has no batch_sizes argument (this
        # one has it): batch 1 only
        report.bench_notes.append("TODO: run_bench has no `batch_sizes` argument in this checkout; batch 1 only")
        for b in batches:
            if b != 1:
                report.bench_rows.append(dict(image_tokens="all", batch_size=b, status=SKIP, seconds=None,
                                              note="TODO: run_bench without batch_sizes"))
        batches = [1]

    t_build = time.perf_counter()
    model = random_model(spec, overrides, dtype=dtype, attn_implementation="sdpa", device=device)
    built_s = time.perf_counter() - t_build
    text = model.config.get_text_config()
    vc = model.config.vision_config
    method = IVCPrune()  # the paper preset: K=16 of 28, 50%, fill rule for Qwen2.5-VL
    n_params = sum(p.numel() for p in model.parameters())
    report.bench_notes += [
        f"model `random:{spec}` (random weights, {_count(n_params)} parameters, built in {built_s:.0f} s): LLM "
        f"{text.num_hidden_layers} layers x hidden {text.hidden_size}, {args.dtype}, sdpa; IVCPrune() paper preset; "
        f"{new_tokens} new tokens, {warmup} warm-up + {repeats} timed runs per variant, medians",
        _vision_note(vc, real_depth if overrides else None),
    ]
    calls = 2 * (warmup + repeats)
    combos = sorted(((n, b) for n in tokens for b in batches), key=lambda nb: (nb[0] * nb[1], nb[1]))
    last_row = None
    for n, b in combos:
        entry = dict(image_tokens=n, batch_size=b, status=SKIP, seconds=None, note="")
        report.bench_rows.append(entry)
        left = deadline - time.perf_counter()
        if device.type == "cuda":
            _free(device)
            free, _ = torch.cuda.mem_get_info(device)
            need = estimate_memory(model, n, b)
            if need > 0.9 * free:
                entry["note"] = (f"estimated {need / 2**30:.1f} GiB > 90% of the {free / 2**30:.1f} GiB free "
                                 f"(KV cache of {n} visual tokens x {b} rows unpruned, LLM prefill activations)")
                report.write()
                continue
            entry["memory_estimate_gib"] = round(need / 2**30, 1)
        if last_row is not None:
            pred = predict_seconds(model, last_row, n, b, calls, new_tokens)
            entry["predicted_s"] = round(pred, 1)
            if pred > left - 10:
                entry["note"] = f"predicted {pred:.0f} s (extrapolated from {last_row['image_tokens']} x " \
                                f"{last_row['batch_size']}) > {max(0.0, left - 10):.0f} s left of the time budget"
                report.write()
                continue
        elif left < 10:
            entry["note"] = f"only {left:.0f} s left of the time budget"
            report.write()
            continue
        t0 = time.perf_counter()
        try:
            with alarm(max(1.0, left - 5)):
                kw = dict(batch_sizes=[b]) if has_batch else {}
                result = run_bench(model, None, method, image_tokens=[n], new_tokens=new_tokens, repeats=repeats,
                                   warmup=warmup, model_name=f"random:{spec}", progress=False, **kw)
            row = result["rows"][0]
            checks = _bench_sanity(row)
            entry.update(status=PASS if not checks else FAIL, seconds=time.perf_counter() - t0,
                         note="; ".join(checks) or _bench_summary(row))
            report.bench_results.append(result)
            last_row = row
        except BudgetExceeded as exc:
            entry.update(status=SKIP, seconds=time.perf_counter() - t0, note=f"aborted: {exc}")
        except torch.cuda.OutOfMemoryError as exc:
            entry.update(status=SKIP, seconds=time.perf_counter() - t0,
                         note=f"out of GPU memory ({str(exc).splitlines()[0][:160]}); the estimate was "
                              f"{entry.get('memory_estimate_gib')} GiB")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            entry.update(status=FAIL, seconds=time.perf_counter() - t0, note=f"{type(exc).__name__}: {str(exc)[:300]}")
        print(f"[{entry['status']}] bench {n} x {b}: {entry['note']}", flush=True)
        _free(device)
        report.write()
    del model
    _free(device)


def _vision_note(vc, reduced_from: int | None) -> str:
    full = getattr(vc, "fullatt_block_indexes", None)
    kinds = "all full attention" if full is None else \
        f"blocks {sorted(set(range(vc.depth)) & set(full))} full attention, the others windowed"
    if reduced_from is None:
        return f"vision tower: {vc.depth} blocks, {kinds} (unchanged)"
    return (f"vision tower: {vc.depth} of {reduced_from} blocks (override `vision.depth={vc.depth}`, as "
            f"`ivcprune bench --set vision.depth={vc.depth}`; {kinds}, as the real tower's first blocks). The vision "
            "encoder runs before pruning and is the same in both variants: a shallower tower lowers 'prefill incl. "
            "vision' and 'peak mem' of both, so their ratios overstate the end-to-end gain; the LLM columns are the "
            "real model's")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _bench_sanity(row: dict[str, Any]) -> list[str]:
    """What must hold in any benchmark row, whatever the timings."""
    bad = []
    if not row["kept_len"] < row["seq_len"]:
        bad.append(f"nothing pruned: kept {row['kept_len']} of {row['seq_len']}")
    kv = (row.get("ratios") or {}).get("kv_bytes")
    want = row["expected"]["kv_ratio"]
    if kv is None or abs(kv - want) > 0.05:
        bad.append(f"KV cache ratio {kv} differs from kept/seq {want:.3f}")
    return bad


def _bench_summary(row: dict[str, Any]) -> str:
    q = row["ratios"]

    def r(x):
        return "n/a" if x is None else f"{x:.2f}"

    return (f"seq {row['seq_len']} -> kept {row['kept_len']}; LLM prefill x{r(q.get('llm_prefill_s'))} "
            f"(FLOPs x{row['expected']['llm_prefill_flop_ratio']:.2f}), decode x{r(q.get('decode_ms_per_token'))}, "
            f"KV x{r(q.get('kv_bytes'))}")


# -- main ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: sdpa/eager only, bench on random:tiny-qwen2.5-vl with tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="output folder ($OUT)")
    ap.add_argument("--attn", nargs="+", default=None,
                    help="attention implementations for the equivalence section (default: sdpa eager, plus "
                         "flash_attention_2 when flash_attn imports and the dtype is half precision)")
    ap.add_argument("--no-float32-too", action="store_true",
                    help="run the equivalence section in --dtype only (default: also in float32, unless --quick)")
    ap.add_argument("--skip-equivalence", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--bench-model", default="qwen2.5-vl-7b",
                    help="random:NAME shapes for the bench (qwen2.5-vl-7b, qwen2-vl-7b, ...; --quick: tiny-qwen2.5-vl)")
    ap.add_argument("--image-tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--vision-depth", type=int, default=8,
                    help="vision blocks of the 7B bench model (0: the real 32). The vision tower's window attention "
                         "runs as one SDPA call per window in transformers (thousands per image at 16k tokens), so "
                         "the full tower would take most of the time budget at batch 8 x 16384")
    ap.add_argument("--time-budget", type=float, default=330.0,
                    help="seconds for the whole script; the bench skips (or aborts) what would overrun it")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 for --quick on the CPU)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.time_budget
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add contention on a shared machine
    dtype = DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here; use --device cpu", file=sys.stderr)
        return 2

    fa_ok, _ = flash_attn_status()
    if args.attn:
        attns = list(args.attn)
        not_tried = ""
    else:
        attns = ["sdpa", "eager"]
        if args.quick:
            not_tried = "flash_attention_2 (--quick)"
        elif not fa_ok:
            not_tried = "flash_attention_2 (flash_attn does not import)"
        elif dtype == torch.float32:
            not_tried = "flash_attention_2 (flash attention needs float16/bfloat16)"
        elif device.type != "cuda":
            not_tried = "flash_attention_2 (needs CUDA)"
        else:
            attns.append("flash_attention_2")
            not_tried = ""
    # the tiny models cost seconds: on the device, equivalence also runs in float32, where the tolerance is tight
    # enough to see subtle errors that bf16 rounding would hide
    extra_dtypes = [] if args.quick or args.no_float32_too or dtype == torch.float32 else ["float32"]
    env = environment(args, device, attns, not_tried)
    env["extra_dtypes"] = extra_dtypes
    report = Report(Path(args.out), args, env)
    print(json.dumps(env, indent=2), flush=True)
    report.write()

    if not args.skip_equivalence:
        t = time.perf_counter()
        section_equivalence(report, device, [dtype] + [DTYPES[d] for d in extra_dtypes], attns)
        report.sections_s["equivalence"] = time.perf_counter() - t
        report.write()
    if not args.skip_bench:
        t = time.perf_counter()
        try:
            section_bench(report, args, device, dtype, deadline)
        except Exception as exc:  # noqa: BLE001 - e.g. the 7B model does not build
            traceback.print_exc()
            report.bench_rows.append(dict(image_tokens="-", batch_size="-", status=FAIL, seconds=None,
                                          note=f"{type(exc).__name__}: {str(exc)[:300]}"))
        report.sections_s["bench"] = time.perf_counter() - t
        report.write()
    report.write()
    c = report.counts()
    print(f"\n{c[PASS]} PASS, {c[FAIL]} FAIL, {c[SKIP]} SKIP in {time.perf_counter() - t_start:.0f} s; "
          f"wrote {report.out / 'gpu_check.md'} and {report.out / 'gpu_check.json'}", flush=True)
    return 1 if c[FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())
