"""Evaluating the embedded model on grounding items (the training script's validation, its tests)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..evals.benchmarks import Sample
from ..evals.grounding_data import GroundingItem, SkippedRow
from ..evals.runner import run_resumable
from ..evals.tasks import predict_sample
from ..families import family_class
from ..methods import PruningMethod


def predict(model, processor, item: GroundingItem, method: PruningMethod | None, *, style: str, prompt: str,
            max_new_tokens: int = 64) -> dict[str, Any]:
    """Answer one grounding item and score it (IoU in original pixels)."""
    sample = Sample(id=item.id, task="grounding", images=[item.image], question=item.ref, answer=item.box,
                    meta=item.meta)
    return predict_sample(model, processor, sample, method, family=style, max_new_tokens=max_new_tokens,
                          prompt_template=prompt)


def run_eval(model, processor, items: Iterable[GroundingItem], method: PruningMethod | None, out_dir: str | Path,
             *, info: dict[str, Any], total: int | None = None, style: str | None = None, prompt: str | None = None,
             max_new_tokens: int = 64, skipped: list[SkippedRow] | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Evaluate grounding items into ``out_dir`` (predictions.jsonl, metrics.json); resumes an interrupted run."""
    style = style or model.config.model_type
    prompt = prompt or family_class(style).grounding_prompt
    info = {"task": "grounding", **info, "prompt": prompt, "style": style}
    return run_resumable(items, lambda it: predict(model, processor, it, method, style=style, prompt=prompt,
                                                   max_new_tokens=max_new_tokens),
                         out_dir, info=info, total=total, progress=progress, skipped=skipped)


# -- where the signals of pruning methods land ---------------------------------------------------
HIT_SIGNALS = {"foreground": "no_ivc", "attention": "fastv", "random": "random"}


def _hit_chance(length: int, kept: int, target: int) -> float:
    """Probability that ``kept`` tokens drawn without replacement from ``length`` include one of ``target``."""
    from math import comb

    return 1.0 - comb(length - target, kept) / comb(length, kept)


@torch.no_grad()
def target_hit_rates(model, processor, samples, *, top: float = 0.2, layer: int | None = None,
                     signals: dict[str, str] | None = None, progress: bool = False) -> dict[str, dict[str, float]]:
    """How often the referred object's visual tokens are among the image's ``top`` share by each signal.

    ``signals``: name -> registered method whose selection at budget ``top`` is that signal's top share
    (``foreground``: IVC-Prune's foreground score alone, seeds then refinement, ``no_ivc``; ``attention``: the
    last prompt token's attention in layer K-1, FastV's ranking; ``random``: an empirical chance). Each
    method runs at ``layer`` (default: IVC-Prune's preset for the model). Per signal: ``hit`` (share of
    samples with at least one target token in the top share), ``recall`` (mean share of the target's tokens
    in it), and the same by chance (``chance_hit`` exact, ``chance_recall`` = the kept share).

    The target's tokens are the merged tokens its shape covers for at least a fifth (the 16 x 16 grid of a
    448 x 448 image, as the toy model's images are)."""
    from tqdm import tqdm

    from ..families import get_adapter
    from ..inputs import build_inputs, user_message
    from ..methods import make_method
    from .train import object_cells

    signals = signals or HIT_SIGNALS
    if layer is None:
        layer = make_method("ivc").resolve(get_adapter(model))["layer"]
    sums = {name: {"hit": 0.0, "recall": 0.0, "chance_hit": 0.0, "chance_recall": 0.0} for name in signals}
    n = 0
    for s in tqdm(samples, desc="target hit rates", disable=not progress):
        inputs, _ = build_inputs(processor, user_message(s.question, [s.image]))
        target = object_cells(s)[s.box]
        for name, method_name in signals.items():
            method = make_method(method_name, budget=top, layer=layer)
            with method(model):
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            span = method.last_report.spans[0]
            if span.length != 256:
                raise ValueError(f"{s.id}: expected a 16 x 16 grid of visual tokens, got {span.length}")
            kept = torch.full((span.length,), span.kept == span.length)  # a selection that keeps all has no groups
            for positions in span.groups.values():
                kept[positions - span.start] = True
            if int(kept.sum()) != span.kept:
                raise RuntimeError(f"{s.id}: the report's groups hold {int(kept.sum())} tokens, not {span.kept}")
            got = kept[target]
            acc = sums[name]
            acc["hit"] += float(got.any())
            acc["recall"] += float(got.float().mean())
            acc["chance_hit"] += _hit_chance(span.length, span.kept, target.numel())
            acc["chance_recall"] += span.kept / span.length
        n += 1
    return {name: {k: v / max(1, n) for k, v in acc.items()} for name, acc in sums.items()}
