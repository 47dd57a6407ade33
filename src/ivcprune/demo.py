"""``make demo``: IVC-Prune end to end, offline.

A handful of synthetic grounding samples, unpruned vs IVC-Prune vs random pruning at 50%: answers and IoU
side by side, prefill / decode / KV-cache figures, one picture per sample (true and predicted boxes, and the
visual tokens each pruning kept, by kind: IVC / seed / foreground / random / pruned), and what the full
measurement of the embedded model showed.

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

MEASURED_FILE = "measured.json"  # written next to the embedded model by scripts/measure_toy.py


def measured_summary(model_dir: Path, budget: float) -> str | None:
    """What the full measurement of the embedded model showed at ``budget`` (1,000 test samples), in words."""
    import json

    path = model_dir / MEASURED_FILE
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    rows = {(r["method"], r.get("budget")): r for r in m["rows"]}
    need = [("none", None), ("ivc", budget), ("random", budget)]
    if not all(k in rows for k in need):
        return None
    base, ivc, rnd = (100 * rows[k]["accuracy"] for k in need)
    verdict = ("IVC-Prune keeps more of the unpruned accuracy than random pruning" if ivc > rnd + 1 else
               "random pruning keeps as much as IVC-Prune" if ivc >= rnd - 1 else
               "random pruning keeps more than IVC-Prune")
    text = (f"On all {rows[need[0]]['n']} test samples (scripts/measure_toy.py), this model scores Acc@0.5 "
            f"{base:.1f} unpruned, {ivc:.1f} with IVC-Prune and {rnd:.1f} with random pruning at {budget:g}: "
            f"{verdict}.")
    rates = m.get("hit_rates", {})
    if "foreground" in rates and "attention" in rates:
        fg, att = rates["foreground"], rates["attention"]
        text += (f" The target object's tokens are {100 * fg['recall']:.0f}% in IVC-Prune's top-20% foreground "
                 f"tokens and {100 * att['recall']:.0f}% in FastV's top 20% by attention "
                 f"(chance {100 * fg['chance_recall']:.0f}%).")
    return text


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
    from .methods import IVCPrune, RandomPrune
    from .models import TOY_DIR, load_model, save_tiny_checkpoint
    from .viz import draw_boxes, kinds_legend, panel, span_panels

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trained = (TOY_DIR / "config.json").exists()
    ckpt = TOY_DIR if trained else out / "random-qwen2.5-vl"
    if not trained and not (ckpt / "config.json").exists():
        save_tiny_checkpoint(ckpt, init_std=0.15, overrides={"num_hidden_layers": 8})
    model, processor = load_model(str(ckpt), dtype="float32")
    cell = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    methods = {"unpruned": None, "IVC-Prune": IVCPrune(budget=args.budget), "random": RandomPrune(budget=args.budget)}
    colors = {"unpruned": (255, 140, 0), "IVC-Prune": (220, 0, 200), "random": (30, 120, 255)}
    warm, _ = build_inputs(processor, user_message("warm up", [make_sample(0, "test", 0).image]))
    for m in methods.values():  # first calls pay one-off costs; keep them out of the timings
        measure_generate(model, warm, m, max_new_tokens=2)
    rows, runs, pictures = [], {name: [] for name in methods}, []
    for i in range(args.n):
        s = make_sample(0, "test", i)
        inputs, images = build_inputs(processor, user_message(s.question, [s.image]))
        answers, ious, boxes, spans = {}, {}, {}, {}
        for name, m in methods.items():
            run = measure_generate(model, inputs, m, max_new_tokens=40, force_length=False)
            runs[name].append(run)
            answers[name] = processor.decode(run.tokens, skip_special_tokens=True)
            boxes[name] = parse_qwen25_box(answers[name])
            ious[name] = iou(boxes[name], s.box)
            if m is not None:
                spans[name] = m.last_report.spans[0]
        rows.append((s.id, s.ref, answers, ious))
        seen = images[0]
        left = draw_boxes(seen, [(s.box, (0, 170, 0), "truth")] + [(boxes[n], colors[n], n) for n in methods])
        token_panels = [span_panels(seen, spans[n], cell)[0][0] for n in spans]
        titles = [s.ref] + [f"{n}: kept {spans[n].kept}/{spans[n].length}, IoU {ious[n]:.2f}" for n in spans]
        width = sum(im.width for im in [left, *token_panels]) + 8 * 4
        pic = panel([left, *token_panels], titles,
                    footer=kinds_legend(width, ["ivc_cos", "ivc_sin", "seed", "foreground", "random"]))
        path = out / f"sample_{i}.png"
        pic.save(path)
        pictures.append(path)

    layer = methods["IVC-Prune"].last_report.layer
    print(f"model: {ckpt} (Qwen2.5-VL architecture, {model.config.text_config.num_hidden_layers} layers), "
          f"IVC-Prune and random pruning at budget {args.budget}, K={layer}")
    if not trained:
        print("note: random weights (the embedded grounding model is missing): answers are noise, the "
              "kept tokens and the savings are real")
    print()
    names = list(methods)
    print("| sample | expression | " + " | ".join(f"{n} answer | IoU" for n in names) + " |")
    print("|---|---|" + "---|---|" * len(names))
    for sid, ref, answers, ious in rows:
        print(f"| {sid} | {ref} | " + " | ".join(f"`{answers[n]}` | {ious[n]:.2f}" for n in names) + " |")
    print(f"\nAcc@0.5 on these {len(rows)}: " + ", ".join(
        f"{n} {sum(r[3][n] >= 0.5 for r in rows)}/{len(rows)}" for n in names))
    summary = measured_summary(ckpt, args.budget) if trained else None
    if summary:
        print(summary)
    med = statistics.median
    print("\n| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    print("| prefill ms (median) | " + " | ".join(f"{1000 * med([r.prefill_s for r in runs[n]]):.1f}" for n in names)
          + " |")
    print("| decode ms/token (median) | " + " | ".join(f"{med([r.decode_ms_per_token for r in runs[n]]):.2f}"
                                                   for n in names) + " |")
    print("| KV cache after prefill | " + " | ".join(
        f"{_fmt_bytes(runs[n][0].kv_bytes_prompt)} ({runs[n][0].kv_tokens_prompt} tok)" for n in names) + " |")
    print(f"\npictures (true box green, unpruned orange, IVC-Prune magenta, random blue; the visual tokens each "
          f"pruning kept, by kind): {out.resolve()}")
    for p in pictures:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
