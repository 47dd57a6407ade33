"""What the embedded grounding model gets wrong, unpruned, and whether its vision tower sees what it needs.

    python scripts/diagnose_toy.py [--model DIR] [--n 1000] [--seed 0] [--probe-images 400]
                                   [--shape-images 400] [--position-images 200] [--json FILE]

1. Answers the first ``--n`` samples of the synthetic test split (generator ``--seed``) in batches of 8, and
   sorts each answer by what its box picked (``ivcprune.toy.evaluate.answer_outcome``): the target, another
   object of the target's shape, an object of another shape, no object, or nothing parseable; by expression
   kind, and the ordinal expressions by the rank they ask for. For the answers whose box is on another
   object, what their ``label`` names (``label_outcome``): the target (named right, boxed wrong), the boxed
   object, another one or none in the scene, and whether the boxed object has the label's colour. For the
   ordinal expressions, the share right against chance (one of the objects of the named shape picked at
   random), by how many objects have that shape and by how far apart they are (``ordinal_setting``).
2. Fits linear probes of each object's shape and colour on the vision tower's output and, as a baseline, on
   its patch embeddings (``ivcprune.toy.evaluate.attribute_probes``), on the first ``--probe-images`` images
   of the same split (three quarters to fit, the rest scored).
3. Asks, on the first ``--shape-images`` images, for the first object that is the only one of its shape, once
   by its shape alone ("the star") and once by colour and shape ("the red star";
   ``ivcprune.toy.evaluate.shape_references``): ordinal expressions name a shape and no colour, so this tells
   whether the model can pick an object by its shape at all, and whether its answer's label names the
   object's colour.
4. Fits linear probes of each object token's column and row in the grid on the language model's hidden
   states, layer by layer (``ivcprune.toy.evaluate.position_probes``), on the first ``--position-images``
   images: whether the model knows where the objects are, which ordinal expressions need.

Prints markdown tables; ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter


def main(argv: list[str] | None = None) -> int:
    import torch
    from tqdm import tqdm

    from ivcprune.evals import synth
    from ivcprune.evals.benchmarks import Sample
    from ivcprune.evals.tasks import predict_samples
    from ivcprune.families import family_class
    from ivcprune.models import load_model, resolve_model_spec
    from ivcprune.toy.evaluate import (
        LABEL_OUTCOMES,
        OUTCOMES,
        SHAPE_REFERENCES,
        answer_label,
        answer_outcome,
        attribute_probes,
        label_outcome,
        ordinal_setting,
        position_probes,
        shape_references,
    )

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy", help="model folder (default: the embedded model)")
    ap.add_argument("--n", type=int, default=1000, help="test samples to answer")
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the test split")
    ap.add_argument("--probe-images", type=int, default=400)
    ap.add_argument("--shape-images", type=int, default=400)
    ap.add_argument("--position-images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.n < 1 or args.shape_images < 1 or args.probe_images < 4 or args.position_images < 4:
        ap.error("--n and --shape-images must be >= 1, --probe-images and --position-images >= 4")
    torch.set_num_threads(args.threads)
    model, processor = load_model(resolve_model_spec(args.model))
    model.eval()
    if model.config.model_type != "qwen2_5_vl":
        ap.error(f"the diagnosis reads a Qwen2.5-VL vision tower; {args.model} is {model.config.model_type}")
    style = model.config.model_type
    prompt = family_class(style).grounding_prompt

    samples = list(synth.make_split(args.seed, "test", args.n))

    def answer(questions: list[tuple]) -> list[dict]:  # (id, reference, image, box) -> the prediction records
        batch = [Sample(id=i, task="grounding", images=[image], question=ref, answer=tuple(float(v) for v in box))
                 for i, ref, image, box in questions]
        return predict_samples(model, processor, batch, None, family=style, max_new_tokens=64, prompt_template=prompt)

    outcome: dict[str, Counter] = {}
    labels: dict[str, Counter] = {}  # wrong-object answers: outcome -> what the label names (+ colour matches)
    ordinals: list[dict] = []  # per ordinal expression: its setting and whether the answer was right
    with torch.no_grad():
        for first in tqdm(range(0, len(samples), args.batch_size), desc="answers", unit="batch"):
            chunk = samples[first:first + args.batch_size]
            records = answer([(s.id, s.ref, s.image, s.box) for s in chunk])
            for s, rec in zip(chunk, records, strict=True):
                got = answer_outcome(s, rec["box"])
                rows = [s.kind] + ([f"ordinal: {s.ref.split()[1]} ..."] if s.kind == "ordinal" else [])
                for row in rows + ["all"]:
                    outcome.setdefault(row, Counter())[got] += 1
                if s.kind == "ordinal":
                    ordinals.append({**ordinal_setting(s), "right": got == "right"})
                if got.startswith("other object"):
                    named, colour = label_outcome(s, rec["answer"], rec["box"])
                    labels.setdefault(got, Counter())[named] += 1
                    labels[got]["boxed object has the label's colour"] += bool(colour)
    order = [k for k in synth.KIND_WEIGHTS if k in outcome]
    order += sorted((k for k in outcome if k.startswith("ordinal:")),
                    key=lambda k: synth.ORDINALS.index(k.split()[1])) + ["all"]
    print(f"\nAnswers, unpruned: the first {args.n} samples of the test split (seed {args.seed}); % of each row\n")
    print("| expression | n | " + " | ".join(OUTCOMES) + " |")
    print("|---|---" + "|---" * len(OUTCOMES) + "|")
    for row in order:
        c = outcome[row]
        n = sum(c.values())
        print(f"| {row} | {n} | " + " | ".join(f"{100 * c[o] / n:.1f}" for o in OUTCOMES) + " |")

    if labels:
        print("\nAnswers whose box is on another object: what their label names (% of each row; last column: the "
              "boxed object has the colour the label names)\n")
        cols = LABEL_OUTCOMES + ("boxed object has the label's colour",)
        print("| box on | n | " + " | ".join(cols) + " |")
        print("|---|---" + "|---" * len(cols) + "|")
        for row in (o for o in OUTCOMES if o in labels):
            c = labels[row]
            n = sum(c[k] for k in LABEL_OUTCOMES)
            print(f"| {row} | {n} | " + " | ".join(f"{100 * c[k] / n:.1f}" for k in cols) + " |")

    ordinal_rows = ordinal_table(ordinals)
    if ordinal_rows:
        print("\nOrdinal expressions: right against chance (one of the objects of the named shape picked at random); "
              "% of each row\n")
        print("| ordinals by | n | right | chance |")
        print("|---|---|---|---|")
        for row in ordinal_rows:
            print(f"| {row['by']} | {row['n']} | {100 * row['right']:.1f} | {100 * row['chance']:.1f} |")

    def first_images(n: int) -> list:  # the answered samples when they suffice, else the split's first n
        return samples[:n] if n <= len(samples) else list(synth.make_split(args.seed, "test", n))

    shape_rows = {name: Counter() for name in SHAPE_REFERENCES}
    shape_samples = first_images(args.shape_images)
    queries = [(s, *found) for s in shape_samples if (found := shape_references(s)) is not None]
    with torch.no_grad():
        for first in tqdm(range(0, len(queries), args.batch_size), desc="shape references", unit="batch"):
            chunk = queries[first:first + args.batch_size]
            for name in SHAPE_REFERENCES:
                records = answer([(s.id, refs[name], s.image, obj.box) for s, obj, refs in chunk])
                for (_s, obj, _refs), rec in zip(chunk, records, strict=True):
                    label = (answer_label(rec["answer"]) or "").split()
                    row = shape_rows[name]
                    row["n"] += 1
                    row["right"] += rec["hit"]  # judged against the object's box, passed as the answer
                    row["label names its colour"] += label[:1] == [obj.color]
                    row["label names its shape"] += label[1:] == [obj.shape]
    print(f"\nOne object by its shape alone and by colour and shape (the first object that is the only one of its "
          f"shape, in {len(queries)} of the first {len(shape_samples)} test images); %\n")
    cols = ("right", "label names its colour", "label names its shape")
    print("| reference | n | " + " | ".join(cols) + " |")
    print("|---|---" + "|---" * len(cols) + "|")
    for name, row in shape_rows.items():
        if row["n"]:
            print(f"| {name} | {row['n']} | " + " | ".join(f"{100 * row[c] / row['n']:.1f}" for c in cols) + " |")

    probe_samples = first_images(args.probe_images)
    probes = attribute_probes(model, processor, probe_samples)
    objects = probes["objects"]
    print(f"\nLinear probes, held-out accuracy (%; {objects['fit']} objects fitted, {objects['scored']} scored, "
          f"first {len(probe_samples)} test images)\n")
    print("| attribute | vision tower output | patch embedding | chance (most frequent class) |")
    print("|---|---|---|---|")
    for attr in ("shape", "colour"):
        p = probes[attr]
        print(f"| {attr} | {100 * p['vision tower output']:.1f} | {100 * p['patch embedding']:.1f} | "
              f"{100 * p['chance']:.1f} |")
    position_samples = first_images(args.position_images)
    positions = position_probes(model, processor, position_samples)
    tokens = positions["tokens"]
    print(f"\nWhere an object's visual tokens are: linear probes of their grid column and row on the hidden states, "
          f"held out ({tokens['fit']} tokens fitted, {tokens['scored']} scored, first {len(position_samples)} "
          f"test images; chance R^2 0)\n")
    print("| hidden states | column R^2 | column error (cells) | row R^2 | row error (cells) |")
    print("|---|---|---|---|---|")
    for entry in positions["layers"]:
        name = "input (vision tower output)" if entry["layer"] == 0 else f"after layer {entry['layer']}"
        c, r = entry["column"], entry["row"]
        print(f"| {name} | {c['r2']:.3f} | {c['mae_cells']:.2f} | {r['r2']:.3f} | {r['mae_cells']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "seed": args.seed,
                       "outcomes": {k: dict(v) for k, v in outcome.items()},
                       "labels": {k: dict(v) for k, v in labels.items()}, "ordinals": ordinal_rows,
                       "shape_references": {k: dict(v) for k, v in shape_rows.items()},
                       "probes": probes, "positions": positions}, f, indent=2)
    return 0


GAP_BINS = ((0, 40), (40, 80), (80, 160), (160, None))  # px; the generator keeps ordinals 20 px apart or more


def ordinal_table(ordinals: list[dict]) -> list[dict]:
    """Rows of the ordinal table: by the number of objects of the named shape (5 or more together), then by
    the smallest gap between them along the side's axis (px); per row: n, share right, and chance (the mean
    of 1 / objects of the named shape)."""
    groups: list[tuple[str, list[dict]]] = []
    for n in sorted({min(o["same_shape"], 5) for o in ordinals}):
        groups.append((f"{n}{' or more' if n == 5 else ''} objects of the named shape",
                       [o for o in ordinals if min(o["same_shape"], 5) == n]))
    for lo, hi in GAP_BINS:
        rows = [o for o in ordinals if o["gap"] >= lo and (hi is None or o["gap"] < hi)]
        if rows:
            name = f"under {hi}" if not lo else f"{lo}-{hi}" if hi else f"{lo}+"
            groups.append((f"centres {name} px apart", rows))
    if ordinals:
        groups.append(("all", ordinals))
    return [{"by": name, "n": len(rows), "right": sum(o["right"] for o in rows) / len(rows),
             "chance": sum(1 / o["same_shape"] for o in rows) / len(rows)} for name, rows in groups]


if __name__ == "__main__":
    raise SystemExit(main())
