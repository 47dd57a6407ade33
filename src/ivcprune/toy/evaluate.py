"""Evaluating the embedded model on grounding items (the training script's validation, its tests)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

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
