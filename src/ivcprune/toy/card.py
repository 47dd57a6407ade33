"""Model card of the embedded grounding model, written from its training log and measured evaluations."""

from __future__ import annotations

import json
from pathlib import Path

from ..evals import synth
from ..evals.grounding import comparison_markdown, run_cells
from .train import LIST_PROMPT, NUMBER_TOKENS, REGION_PROMPT


def learning_curve_markdown(history: list[dict]) -> str:
    lines = ["| step | images | train s | loss | val Acc@0.5 | val mIoU |", "|---|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['step']} | {h['images']} | {h.get('train_seconds', '')} | {h['loss']} "
                     f"| {100 * h['acc']:.1f} | {h['miou']:.3f} |")
    return "\n".join(lines)


def by_kind_markdown(rows: list[dict]) -> str:
    """Acc@0.5 per expression kind (attribute / size / relation / ordinal) for each run."""
    kinds = sorted({k for r in rows for k in r.get("accuracy_by_kind", {})})
    lines = ["| method | budget | K | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for r in rows:
        acc = r.get("accuracy_by_kind", {})
        lines.append(f"{run_cells(r)} " + " | ".join(f"{100 * acc[k]:.1f}" if k in acc else "-" for k in kinds) + " |")
    return "\n".join(lines)


def recipe_lines(r: dict, log: dict) -> list[str]:
    """The training stages as markdown bullets (recipes before the alignment stage had no ``align_steps``)."""
    vision = (f"- stage 1, vision tower alone: {r['vision_steps']} steps of {r['vision_batch_size']} images, "
              "dense per-token targets (object colour and shape, the covering object's box, the token's position) "
              "through linear probes that are dropped afterwards (the role of a pretrained vision encoder)")
    opt = (f"- AdamW (lr {r['lr']}, warmup {r['warmup_steps']}, cosine to {r['min_lr_ratio']}x, weight decay "
           f"{r['weight_decay']}), {r['threads']} CPU threads; losses: next-token cross-entropy on the replies, "
           f"each coordinate's distribution over the coordinate tokens against a Gaussian around the true value "
           f"(sigma {r.get('coord_sigma')} px), the stage-1 probes (weight {r.get('aux_weight')})")
    if "align_steps" not in r:
        return [vision, f"- {log['steps']} steps of {r['batch_size']} images ({log['images']} images, each with "
                        f"1-{r['queries_per_image']} questions as a multi-turn chat)", opt]
    align = min(r["align_steps"], log["steps"])
    return [
        vision,
        f"- stage 2a, alignment (the whole model): {align} steps of {r['batch_size']} images, each a chat that "
        f"lists every object with its label and box (`{LIST_PROMPT}`) and names the object at "
        f"{r['regions_per_image']} given box(es) (`{REGION_PROMPT}`): the language side learns to name what it "
        "sees where it sees it",
        f"- stage 2b, instructions: {max(0, log['steps'] - align)} steps of {r['batch_size']} images, 1-"
        f"{r['queries_per_image']} referring expressions per image as a multi-turn chat, the object list replayed "
        f"first on {100 * r['list_share']:.0f}% of the images",
        *([f"- stage 2 scenes with hard negatives: each object that is not a twin takes the colour of one already "
           f"placed, with another shape, with probability {r['confusers']}"] if r.get("confusers") else []),
        f"- {log['images']} chat images in all; no loss looks at any pruning method's scores or at attention",
        opt,
    ]


def idle_hours(log: dict) -> float | None:
    """The whole recipe's training time on idle cores, from the per-step rates in ``log["idle_timing"]``."""
    t = log.get("idle_timing")
    if not t:
        return None
    r = log["recipe"]
    return (r["vision_steps"] * t["vision_s_per_step"] + log["steps"] * t["s_per_step"]) / 3600


def timing_note(log: dict) -> str:
    """Where the logged time includes time the cores were shared, the rate measured on idle cores."""
    t = log.get("idle_timing")
    if not t:
        return ""
    return (f". The logged time includes stretches when the two cores were shared with other jobs; on idle "
            f"cores the vision stage ran at {t['vision_s_per_step']:.2f} s per step and steps "
            f"{t['from_step']}-{t['to_step']} at {t['s_per_step']:.2f} s per step ({t['source']}), which puts the "
            f"whole recipe at {idle_hours(log):.1f} h")


def hit_rates_markdown(rates: dict[str, dict[str, float]]) -> str:
    """Rows of :func:`ivcprune.toy.evaluate.target_hit_rates`."""
    lines = ["| signal | target tokens in top 20% (recall) | chance | samples with a target token in it | chance |",
             "|---|---|---|---|---|"]
    for name, v in rates.items():
        lines.append(f"| {name} | {100 * v['recall']:.1f}% | {100 * v['chance_recall']:.1f}% | {100 * v['hit']:.1f}% "
                     f"| {100 * v['chance_hit']:.1f}% |")
    return "\n".join(lines)


def write_card(model_dir: str | Path, results: dict[str, list[dict]], commands: dict[str, str],
               hit_rates: dict[str, dict[str, float]] | None = None) -> Path:
    """``results``: table name -> rows of metrics (as written by ``ivcprune eval``); ``hit_rates``: what
    :func:`ivcprune.toy.evaluate.target_hit_rates` measured (``commands["hit_rates"]`` says how)."""
    model_dir = Path(model_dir)
    log = json.loads((model_dir / "training_log.json").read_text())
    r = log["recipe"]
    cfg = json.loads((model_dir / "config.json").read_text())
    text = cfg.get("text_config", {})
    vision = cfg.get("vision_config", {})
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    parts = [
        "# ivcprune toy grounding model",
        "",
        "A small vision-language model built from transformers' **Qwen2.5-VL classes** "
        "(`Qwen2_5_VLForConditionalGeneration`: vision tower with window attention and a 2x2 patch merger, "
        "an M-RoPE language model), trained from scratch by `ivcprune train-toy` on the project's synthetic "
        "referring-expression grounding task. It answers in Qwen2.5-VL's grounding format "
        '`{"bbox_2d": [x1, y1, x2, y2]}` (pixels of the 448x448 image) and exists so that visual-token '
        "pruning can be measured offline. It knows nothing beyond its synthetic world.",
        "",
        "## Architecture",
        "",
        f"- vision: {vision.get('depth')} blocks, width {vision.get('hidden_size')}, {vision.get('num_heads')} heads, "
        f"patch {vision.get('patch_size')}, 2x2 merge -> 256 visual tokens per 448x448 image",
        f"- language model: {text.get('num_hidden_layers')} layers, width {text.get('hidden_size')}, "
        f"{text.get('num_attention_heads')} heads ({text.get('num_key_value_heads')} KV heads), FFN "
        f"{text.get('intermediate_size')}, M-RoPE sections {text.get('rope_parameters', {}).get('mrope_section')}, "
        f"RoPE base {text.get('rope_parameters', {}).get('rope_theta')}",
        f"- {log['parameters'] / 1e6:.2f}M parameters, {weights / 2**20:.1f} MiB of float32 safetensors",
        f"- tokenizer: byte-level BPE trained here ({text.get('vocab_size')} tokens with Qwen's special "
        f"tokens and chat format, one of them per pixel coordinate 0-{NUMBER_TOKENS - 1}, Pix2Seq-style; the "
        "answer text is Qwen2.5-VL's); processor: transformers' Qwen2.5-VL processor "
        "(`AutoProcessor.from_pretrained` on this folder)",
        "",
        "## Data",
        "",
        "`ivcprune.evals.synth`: 448x448 images with 3-6 objects (circle, square, triangle, star, diamond x "
        "red, green, blue, yellow, purple, orange x "
        + " / ".join(f"{k} ({lo}-{hi} px)" for k, (lo, hi) in synth.SIZES.items())
        + ") on a noisy background with grey clutter; "
        "expressions by appearance (\"the red circle\"), appearance and size (\"the small blue square\"), relation "
        "(\"the red circle left of the green triangle\") and order (\"the second star from the top\"), each "
        "emitted only when it singles out one object. Splits are separate random streams (train / val / test) "
        "of one generator seed; the test split is never trained on.",
        "",
        "## Recipe",
        "",
        f"`{commands.get('train', 'ivcprune train-toy --out DIR')}`",
        "",
        f"- seed {r['seed']}, data seed {r['data_seed']}; {log['train_seconds'] / 60:.1f} min of training "
        "(validation excluded) on a 2-core CPU, resumable from `checkpoint.pt` (the data of every step is a "
        "function of the step: an interrupted run continues where it stopped and ends with the same weights)"
        + timing_note(log),
        *recipe_lines(r, log),
        "",
        "Learning curve (validation split):",
        "",
        learning_curve_markdown(log["history"]),
        "",
        "## Measured",
        "",
    ]
    for name, rows in results.items():
        parts += [f"### {name}", "", f"`{commands.get(name, '')}`", "", comparison_markdown(rows), "",
                  "Acc@0.5 by expression kind:", "", by_kind_markdown(rows), ""]
    if hit_rates:
        parts += ["### Where the pruning signals land", "", f"`{commands.get('hit_rates', '')}`", "",
                  "How often the referred object's visual tokens are among the image's top 20% by IVC-Prune's "
                  "foreground score (`no_ivc`: seeds, then refinement) and by the last prompt token's attention in "
                  "layer K-1 (FastV's ranking), against random selection and exact chance:", "",
                  hit_rates_markdown(hit_rates), ""]
    path = model_dir / "README.md"
    path.write_text("\n".join(parts))
    return path
