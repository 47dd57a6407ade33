"""Model card of the embedded grounding model, written from its training log and measured evaluations."""

from __future__ import annotations

import json
from pathlib import Path

from ..evals import synth
from ..evals.grounding import comparison_markdown, run_cells
from .train import NUMBER_TOKENS


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


def write_card(model_dir: str | Path, results: dict[str, list[dict]], commands: dict[str, str]) -> Path:
    """``results``: table name -> rows of metrics (as written by ``ivcprune eval``)."""
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
        f"- seed {r['seed']}, data seed {r['data_seed']}; {log['steps']} steps of {r['batch_size']} images "
        f"({log['images']} images, each with 1-{r['queries_per_image']} questions as a multi-turn chat)",
        f"- AdamW (lr {r['lr']}, warmup {r['warmup_steps']}, cosine to {r['min_lr_ratio']}x, weight decay "
        f"{r['weight_decay']}), loss on the answers only, {r['threads']} CPU threads",
        f"- training time {log['train_seconds'] / 60:.1f} min (validation excluded) on a 2-core CPU",
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
    path = model_dir / "README.md"
    path.write_text("\n".join(parts))
    return path
