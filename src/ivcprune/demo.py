"""``make demo``: IVC-Prune end to end, offline.

Builds a small Qwen2.5-VL-architecture checkpoint (random weights) with its processor, asks it about a
generated picture unpruned and with IVC-Prune at 50%, and prints the answers, the pruning report, and
prefill / decode / KV-cache figures side by side. The answers of random weights are noise; what the
demo shows is the machinery: which tokens are kept and what that saves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw


def demo_image(size=(448, 448)) -> Image.Image:
    img = Image.new("RGB", size, (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((60, 80, 180, 200), fill=(200, 40, 40))
    d.rectangle((260, 240, 380, 360), fill=(40, 60, 200))
    d.polygon([(300, 60), (360, 170), (240, 170)], fill=(40, 160, 60))
    return img


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo_out", help="where the checkpoint and picture are written")
    args = ap.parse_args(argv)

    from .bench import _fmt_bytes, measure_generate
    from .inputs import build_inputs, user_message
    from .methods import IVCPrune
    from .models import load_model
    from .tiny import save_tiny_checkpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "tiny-qwen2.5-vl"
    if not (ckpt / "config.json").exists():
        save_tiny_checkpoint(ckpt, init_std=0.15, overrides={"num_hidden_layers": 8})
    image_path = out / "shapes.png"
    demo_image().save(image_path)
    model, processor = load_model(str(ckpt), dtype="float32")
    msgs = user_message("Where is the red circle?", [str(image_path)], max_pixels=448 * 448)
    inputs, _ = build_inputs(processor, msgs)

    pruner = IVCPrune(budget=0.5)  # the Qwen2.5-VL preset: K scaled to depth, IVC 10%+10%, seeds 1%, fill to 50%
    base = measure_generate(model, inputs, None, max_new_tokens=16)
    pruned = measure_generate(model, inputs, pruner, max_new_tokens=16)
    rep = pruner.last_report

    print(f"checkpoint: {ckpt} (Qwen2.5-VL architecture, random weights, {model.config.text_config.num_hidden_layers} layers)")
    print(f"image: {image_path}  prompt tokens: {inputs['input_ids'].shape[1]}\n")
    rows = [
        ("answer (random weights)", repr(processor.decode(base.tokens, skip_special_tokens=True)),
         repr(processor.decode(pruned.tokens, skip_special_tokens=True))),
        ("prefill ms", f"{1000 * base.prefill_s:.1f}", f"{1000 * pruned.prefill_s:.1f}"),
        ("decode ms/token", f"{base.decode_ms_per_token:.2f}", f"{pruned.decode_ms_per_token:.2f}"),
        ("KV cache after prefill", f"{_fmt_bytes(base.kv_bytes_prompt)} ({base.kv_tokens_prompt} tok)",
         f"{_fmt_bytes(pruned.kv_bytes_prompt)} ({pruned.kv_tokens_prompt} tok)"),
    ]
    print("| | unpruned | IVC-Prune 50% |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(rep.summary())
    span = rep.spans[0]
    t, h, w = span.grid
    marks = {"ivc_cos": "C", "ivc_sin": "S", "seed": "*", "foreground": "#", "pruned": "."}
    labels = span.labels()
    print(f"\nkept tokens over the {h}x{w} token grid (C: IVC cos, S: IVC sin, *: seed, #: foreground, .: pruned)")
    for row in range(h):
        print("  " + " ".join(marks[labels[row * w + col]] for col in range(w)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
