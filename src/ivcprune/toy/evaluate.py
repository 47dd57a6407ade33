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


# -- what the answers get wrong, and what the vision tower encodes ------------------------------
OUTCOMES = ("right", "target, IoU < 0.5", "other object, same shape", "other object, other shape", "no object",
            "unparsed")


def boxed_object(sample, box):
    """The object of a synthetic sample that a box overlaps most (by IoU), and that IoU."""
    from ..boxes import iou

    best = max(sample.objects, key=lambda o: iou(box, o.box))
    return best, iou(box, best.box)


def answer_outcome(sample, box) -> str:
    """What a predicted ``box`` (original pixels, or ``None`` when unparsed) picked in a synthetic sample:
    the target (IoU >= 0.5), else the object it overlaps most (by IoU): the target all the same (a box too
    imprecise), another object of the target's shape, or of another shape; no object when it overlaps none."""
    from ..boxes import iou

    if box is None:
        return "unparsed"
    if iou(box, sample.box) >= 0.5:
        return "right"
    best, overlap = boxed_object(sample, box)
    if overlap == 0:
        return "no object"
    if best.box == sample.box:
        return "target, IoU < 0.5"
    return "other object, " + ("same shape" if best.shape == sample.target.shape else "other shape")


LABEL_OUTCOMES = ("the target", "the target and the boxed object (twins)", "the boxed object", "another object",
                  "no object in the scene", "no label")


def answer_label(answer: str) -> str | None:
    """The ``label`` of a Qwen2.5-VL grounding answer (also from truncated or otherwise invalid JSON)."""
    import re

    m = re.search(r'"label"\s*:\s*"([^"]*)"', answer or "")
    return m.group(1).strip() if m else None


def label_outcome(sample, answer: str, box) -> tuple[str, bool | None]:
    """What the ``label`` of an answer whose box landed on another object (``answer_outcome`` "other object,
    ...") names, as one of :data:`LABEL_OUTCOMES`, and whether that object has the colour the label names
    (``None`` when there is no label). "the target": the answer named the right object and then boxed
    another one (the box was not found from the name)."""
    label = answer_label(answer)
    if label is None:
        return "no label", None
    boxed = boxed_object(sample, box)[0]
    same_colour = boxed.color == label.split()[0] if label else False
    if label == sample.target.label:
        return ("the target and the boxed object (twins)" if boxed.label == label else "the target"), same_colour
    if label == boxed.label:
        return "the boxed object", same_colour
    if any(o.label == label for o in sample.objects):
        return "another object", same_colour
    return "no object in the scene", same_colour


@torch.no_grad()
def attribute_probes(model, processor, samples, *, train_share: float = 0.75, steps: int = 500,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """Whether the vision tower encodes each object's shape and colour: linear probes fitted afresh on the
    objects of the first ``train_share`` of ``samples`` and scored on the rest (held-out accuracy).

    Features per object: the mean of the merged visual tokens it covers (the tower's output, what the
    language model reads), and the same mean over its patch embeddings (the tower's input layer, before any
    attention: a baseline). Also the chance level (the held-out share of the most frequent class). The
    features are a Qwen2.5-VL tower's (patch embedding, then 2 x 2 merged tokens of a 16 x 16 grid)."""
    from ..evals import synth
    from .train import GRID, object_cells

    visual = model.model.visual
    captured = {}
    hook = visual.patch_embed.register_forward_hook(lambda m, a, o: captured.__setitem__("patches", o))
    feats: dict[str, list[torch.Tensor]] = {"vision tower output": [], "patch embedding": []}
    labels: dict[str, list[int]] = {"shape": [], "colour": []}
    object_image = []
    try:
        for k, s in enumerate(samples):
            pix = processor.image_processor(images=[s.image], return_tensors="pt")
            if tuple(pix["image_grid_thw"][0].tolist()) != (1, 2 * GRID, 2 * GRID):
                raise ValueError(f"{s.id}: expected a {2 * GRID} x {2 * GRID} patch grid, got "
                                 f"{pix['image_grid_thw'][0].tolist()}")
            device = next(visual.parameters()).device
            out = visual(pix["pixel_values"].to(device, model.dtype),
                         grid_thw=pix["image_grid_thw"].to(device)).pooler_output
            # patches come in 2 x 2 groups, one per merged token, in the merged tokens' raster order
            patches = captured.pop("patches").reshape(GRID * GRID, 4, -1).mean(1)
            covered = object_cells(s)
            for o in s.objects:
                cells = covered[o.box].to(device)
                feats["vision tower output"].append(out[cells].float().mean(0).cpu())
                feats["patch embedding"].append(patches[cells].float().mean(0).cpu())
                labels["shape"].append(synth.SHAPES.index(o.shape))
                labels["colour"].append(list(synth.COLORS).index(o.color))
                object_image.append(k)
    finally:
        hook.remove()
    n_train = sum(k < int(train_share * len(samples)) for k in object_image)  # split by image, not by object
    if n_train == 0 or n_train == len(object_image):
        raise ValueError(f"{len(samples)} samples leave no objects to fit or to score the probes on")
    result: dict[str, dict[str, float]] = {}
    gen = torch.Generator().manual_seed(seed)
    for attr, ys in labels.items():
        y = torch.tensor(ys)
        classes = len(synth.SHAPES) if attr == "shape" else len(synth.COLORS)
        held = y[n_train:]
        row = {"chance": float(torch.bincount(held, minlength=classes).max()) / len(held)}
        for name, fs in feats.items():
            x = torch.stack(fs)
            mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-5
            x = (x - mu) / sd
            probe = torch.nn.Linear(x.shape[1], classes)
            with torch.no_grad():
                probe.weight.normal_(0, 0.01, generator=gen)
                probe.bias.zero_()
            opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
            with torch.enable_grad():
                for _ in range(steps):
                    loss = torch.nn.functional.cross_entropy(probe(x[:n_train]), y[:n_train])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            row[name] = float((probe(x[n_train:]).argmax(-1) == held).float().mean())
        result[attr] = row
    result["objects"] = {"fit": n_train, "scored": len(object_image) - n_train}
    return result


def ordinal_setting(sample) -> dict[str, Any]:
    """What an ordinal expression ("the second star from the left") asks of a synthetic sample: the ``rank``
    (0 = first), the ``side``, ``same_shape`` (how many objects have the named shape: one of them picked at
    random is right ``1 / same_shape`` of the time, the chance level of a model that reads the shape and not
    the order) and ``gap`` (the smallest distance between those objects' centres along the side's axis, in
    pixels: how clear the order is)."""
    from ..evals import synth

    if sample.kind != "ordinal":
        raise ValueError(f"{sample.id} is a {sample.kind!r} expression, not an ordinal one")
    words = sample.ref.split()
    rank, shape, side = synth.ORDINALS.index(words[1]), words[2], words[-1]
    axis, _direction = synth.SIDES[side]
    keys = sorted(o.center[axis] for o in sample.objects if o.shape == shape)
    return {"rank": rank, "side": side, "same_shape": len(keys),
            "gap": min(b - a for a, b in zip(keys, keys[1:]))}


SHAPE_REFERENCES = ("shape only", "colour and shape")


def shape_references(sample) -> tuple[Any, dict[str, str]] | None:
    """The first object of a synthetic scene that is the only one of its shape, and two references to it, both
    unambiguous: by its shape alone ("the star") and by colour and shape ("the red star"). Ordinal expressions
    name a shape and no colour; the pair asks whether a model can pick an object by its shape when nothing else
    is asked. ``None`` when every shape in the scene appears more than once."""
    for o in sample.objects:
        if sum(p.shape == o.shape for p in sample.objects) == 1:
            return o, dict(zip(SHAPE_REFERENCES, (f"the {o.shape}", f"the {o.color} {o.shape}"), strict=True))
    return None


def heldout_linear_fit(x: torch.Tensor, y: torch.Tensor, n_fit: int, ridge: float = 1.0) -> tuple[float, float]:
    """A ridge regression of ``y`` on ``x`` (standardised on the first ``n_fit`` rows, with a bias), fitted on
    those rows and scored on the rest: (R^2, mean absolute error) on the held-out rows."""
    if not 0 < n_fit < len(x):
        raise ValueError(f"n_fit must leave rows to fit and to score: {n_fit} of {len(x)}")
    x, y = x.double(), y.double()
    mu, sd = x[:n_fit].mean(0), x[:n_fit].std(0) + 1e-6
    a = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    fit = a[:n_fit]
    w = torch.linalg.solve(fit.T @ fit + ridge * torch.eye(a.shape[1], dtype=x.dtype), fit.T @ y[:n_fit])
    err = a[n_fit:] @ w - y[n_fit:]
    held = y[n_fit:]
    return float(1 - err.pow(2).mean() / held.var(unbiased=False).clamp_min(1e-12)), float(err.abs().mean())


@torch.no_grad()
def position_probes(model, processor, samples, *, train_share: float = 0.75) -> dict[str, Any]:
    """Whether the language model's hidden states of an object's visual tokens say where each token is: a
    linear (ridge) probe of the token's column and row in the 16 x 16 grid, fitted afresh on the tokens of
    the objects in the first ``train_share`` of ``samples`` and scored on the rest, for the input embeddings
    (``layer 0``: the vision tower's output) and the output of every decoder layer. Per layer: R^2 and the
    mean absolute error in grid cells, for ``column`` and ``row``; also the token counts."""
    from ..inputs import build_inputs, user_message
    from .train import GRID, object_cells

    image_token = model.config.image_token_id
    layers: list[list[torch.Tensor]] = []
    cols, rows, image_of = [], [], []
    for k, s in enumerate(samples):
        inputs, _ = build_inputs(processor, user_message(s.question, [s.image]))
        inputs = {n: v.to(model.device) if hasattr(v, "to") else v for n, v in inputs.items()}
        where = (inputs["input_ids"][0] == image_token).nonzero()[:, 0]
        if len(where) != GRID * GRID:
            raise ValueError(f"{s.id}: expected a {GRID} x {GRID} grid of visual tokens, got {len(where)}")
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        if not layers:
            layers = [[] for _ in hidden]
        cells = torch.cat(list(object_cells(s).values())).unique()
        for store, h in zip(layers, hidden):
            store.append(h[0, where[cells.to(where.device)]].float().cpu())
        cols.append(cells % GRID)
        rows.append(cells // GRID)
        image_of.append(torch.full((len(cells),), k))
    if not layers:
        raise ValueError("no samples to probe")
    image_of_t = torch.cat(image_of)
    n_fit = int((image_of_t < int(train_share * len(samples))).sum())  # split by image, not by token
    if n_fit == 0 or n_fit == len(image_of_t):
        raise ValueError(f"{len(samples)} samples leave no tokens to fit or to score the probes on")
    col, row = torch.cat(cols).float(), torch.cat(rows).float()
    out: dict[str, Any] = {"tokens": {"fit": n_fit, "scored": len(image_of_t) - n_fit}, "layers": []}
    for i, store in enumerate(layers):
        x = torch.cat(store)
        entry = {"layer": i}
        for name, y in (("column", col), ("row", row)):
            r2, mae = heldout_linear_fit(x, y, n_fit)
            entry[name] = {"r2": r2, "mae_cells": mae}
        out["layers"].append(entry)
    return out
