"""``make demo``: IVC-Prune end to end, offline.

A handful of synthetic grounding samples, unpruned vs IVC-Prune at 50%: answers and IoU side by side,
prefill / decode / KV-cache figures, and one picture per sample (true and predicted boxes, and the
visual tokens coloured by kind: IVC / seed / foreground / pruned).

It runs the embedded grounding model (``ivcprune.models.TOY_DIR``, trained by ``ivcprune train-toy``).
Where that folder is missing (e.g. an install without package data), a small Qwen2.5-VL-architecture
checkpoint with random weights stands in, whose answers are noise: the demo then shows the machinery
(what is kept, what it saves), not accuracy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out", help="where the pictures are written")
    ap.add_argument("--n", type=int, default=6, help="samples")
    ap.add_argument("--budget", type=float, default=0.5)
    args = ap.parse_args(argv)

    from .bench import _fmt_bytes, measure_generate
    from .boxes import iou, parse_qwen25_box
    from .evals.synth import make_sample
    from .inputs import build_inputs, user_message
    from .methods import IVCPrune
    from .models import TOY_DIR, load_model, save_tiny_checkpoint
    from .viz import prediction_picture

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = (TOY_DIR / "config.json").exists()
    ckpt = TOY_DIR if trained else out / "random-qwen2.5-vl"
    if not trained and not (ckpt / "config.json").exists():
        save_tiny_checkpoint(ckpt, init_std=0.15, overrides={"num_hidden_layers": 8})
    model, processor = load_model(str(ckpt), dtype="float32")
    cell = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    pruner = IVCPrune(budget=args.budget)
    warm, _ = build_inputs(processor, user_message("warm up", [make_sample(0, "test", 0).image]))
    for m in (None, pruner):  # first calls pay one-off costs; keep them out of the timings
        measure_generate(model, warm, m, max_new_tokens=2)
    rows, base_runs, pruned_runs, pictures = [], [], [], []
    for i in range(args.n):
        s = make_sample(0, "test", i)
        inputs, images = build_inputs(processor, user_message(s.question, [s.image]))
        base = measure_generate(model, inputs, None, max_new_tokens=32, force_length=False)
        pruned = measure_generate(model, inputs, pruner, max_new_tokens=32, force_length=False)
        answers = [processor.decode(r.tokens, skip_special_tokens=True) for r in (base, pruned)]
        boxes = [parse_qwen25_box(a) for a in answers]
        ious = [iou(b, s.box) for b in boxes]
        rows.append((s.id, s.ref, answers[0], ious[0], answers[1], ious[1]))
        base_runs.append(base)
        pruned_runs.append(pruned)
        span = pruner.last_report.spans[0]
        seen = images[0]
        pic = prediction_picture(
            seen, span, cell,
            [(s.box, (0, 170, 0), "truth"), (boxes[0], (255, 140, 0), "unpruned"),
             (boxes[1], (220, 0, 200), "IVC-Prune")],
            (f"{s.ref}  (IoU unpruned {ious[0]:.2f}, pruned {ious[1]:.2f})",
             f"kept {span.kept}/{span.length} visual tokens at layer {pruner.last_report.layer}"))
        path = out / f"sample_{i}.png"
        pic.save(path)
        pictures.append(path)

    print(f"model: {ckpt} (Qwen2.5-VL architecture, {model.config.text_config.num_hidden_layers} layers), "
          f"IVC-Prune budget {args.budget} at K={pruner.last_report.layer}")
    if not trained:
        print("note: random weights (the embedded grounding model is missing): answers are noise, the "
              "kept tokens and the savings are real")
    print()
    print("| sample | expression | unpruned answer | IoU | IVC-Prune answer | IoU |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | `{r[2]}` | {r[3]:.2f} | `{r[4]}` | {r[5]:.2f} |")
    hits = [sum(r[3] >= 0.5 for r in rows), sum(r[5] >= 0.5 for r in rows)]
    med = statistics.median
    print(f"\nAcc@0.5 on these {len(rows)}: unpruned {hits[0]}/{len(rows)}, IVC-Prune {hits[1]}/{len(rows)}")
    print("\n| | unpruned | IVC-Prune |\n|---|---|---|")
    print(f"| prefill ms (median) | {1000 * med([r.prefill_s for r in base_runs]):.1f} | "
          f"{1000 * med([r.prefill_s for r in pruned_runs]):.1f} |")
    print(f"| decode ms/token (median) | {med([r.decode_ms_per_token for r in base_runs]):.2f} | "
          f"{med([r.decode_ms_per_token for r in pruned_runs]):.2f} |")
    print(f"| KV cache after prefill | {_fmt_bytes(base_runs[0].kv_bytes_prompt)} "
          f"({base_runs[0].kv_tokens_prompt} tok) | "
          f"{_fmt_bytes(pruned_runs[0].kv_bytes_prompt)} ({pruned_runs[0].kv_tokens_prompt} tok) |")
    print(f"\npictures (true box green, unpruned orange, IVC-Prune magenta; tokens by kind): {out.resolve()}")
    for p in pictures:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
