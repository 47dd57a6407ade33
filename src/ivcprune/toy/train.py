"""The project's own small grounding VLM: Qwen2.5-VL architecture classes of transformers (vision tower
with window attention and 2x2 patch merger, M-RoPE LLM), a tokenizer trained here, and the training
recipe. ``ivcprune train-toy`` reproduces the shipped checkpoint from a seed.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..evals import synth
from ..tiny import CHAT_TEMPLATE, DEFAULT_SYSTEM, SPECIAL_TOKENS


@dataclass
class ToyRecipe:
    seed: int = 0
    data_seed: int = 0
    # model
    vision_hidden: int = 64
    vision_depth: int = 3
    vision_heads: int = 4
    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 384
    vocab_size: int = 512
    rope_theta: float = 10000.0
    # stage 1: the vision tower alone learns dense per-token targets (object colour / shape / box, token
    # position) through small linear heads that are dropped afterwards
    vision_steps: int = 600
    vision_batch_size: int = 16
    vision_lr: float = 2e-3
    # stage 2: the whole model on grounding chats (plus the stage-1 targets, weighted by aux_weight)
    aux_weight: float = 0.5
    # coordinates: the next-token distribution over coordinate tokens is also trained against a Gaussian
    # around the true value (an ordered target: near misses cost less)
    coord_weight: float = 1.0
    coord_sigma: float = 3.0
    # stage 2a (alignment): object lists and region captions only; stage 2b (instructions): referring
    # expressions, 1-3 per image, with the object list replayed before them on `list_share` of the images
    align_steps: int = 1500
    list_share: float = 0.3
    regions_per_image: int = 1
    # hard negatives in every stage-2 image: the chance that a non-twin object copies the colour of one already
    # placed, with another shape (`synth.make_sample(confusers=...)`)
    confusers: float = 0.0
    # a fixed number of steps (reproducible); `minutes` is only a safety stop for the whole run
    steps: int = 12000
    minutes: float = 235.0
    batch_size: int = 8
    queries_per_image: int = 3
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.05
    threads: int = 2
    eval_every: int = 500
    eval_samples: int = 100
    checkpoint_every: int = 250  # steps between resumable checkpoints (``checkpoint.pt`` in the output folder)


# -- tokenizer ---------------------------------------------------------------------------------
def _corpus(n: int, seed: int):
    yield DEFAULT_SYSTEM
    yield "user assistant system"
    for i in range(n):
        s = synth.make_sample(seed, "train", i, render_image=False)
        yield s.question
        yield s.answer


NUMBER_TOKENS = synth.IMAGE_SIZE + 1  # "0" ... "448": every pixel coordinate of the resized image


def number_token_ids(tokenizer) -> list[int]:
    """Ids of the whole-number tokens "0", "1", ... (index = value)."""
    ids = tokenizer.convert_tokens_to_ids([str(i) for i in range(NUMBER_TOKENS)])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("this tokenizer has no whole-number tokens")
    return ids


def train_tokenizer(vocab_size: int = 512, seed: int = 0, corpus_size: int = 3000):
    """Byte-level BPE trained on the task's prompts and answers, plus one token per pixel coordinate
    ("0" ... "448", matched longest-first; larger numbers split into such pieces). A coordinate is
    then one prediction, as with the coordinate tokens of Pix2Seq-style detectors, while the answer text
    stays Qwen2.5-VL's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_corpus(corpus_size, seed), trainer=trainer)
    core.add_tokens([AddedToken(str(i), normalized=False) for i in range(NUMBER_TOKENS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )


def init_number_embeddings(model, tokenizer, scale: float = 0.05) -> None:
    """Give the coordinate tokens an ordered start: the first dimensions of token ``n`` get cos/sin
    features of ``n`` at periods 896, 448, ..., 14, so nearby coordinates start with similar embeddings
    (tied input/output embeddings: predicting a coordinate starts as a smooth readout)."""
    ids = torch.tensor(number_token_ids(tokenizer))
    n = torch.arange(NUMBER_TOKENS, dtype=torch.float32)
    periods = [2.0 * synth.IMAGE_SIZE / 2**k for k in range(7)]
    feats = torch.cat([torch.stack([torch.cos(2 * math.pi * n / p), torch.sin(2 * math.pi * n / p)], 1)
                       for p in periods], 1)
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[ids, : feats.shape[1]] += scale * feats


def build_toy_processor(tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    px = synth.IMAGE_SIZE * synth.IMAGE_SIZE
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=px, max_pixels=px),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(min_pixels=px, max_pixels=px),
        chat_template=CHAT_TEMPLATE,
    )


def toy_config(tokenizer, r: ToyRecipe):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = r.hidden // r.heads
    half = head_dim // 2
    section = [half // 4, (half - half // 4) // 2]
    section.append(half - sum(section))
    tokens = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=r.hidden,
            intermediate_size=r.ffn,
            num_hidden_layers=r.layers,
            num_attention_heads=r.heads,
            num_key_value_heads=r.kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": r.rope_theta, "mrope_section": section},
            tie_word_embeddings=True,
            **tokens,
        ),
        vision_config=dict(
            depth=r.vision_depth,
            hidden_size=r.vision_hidden,
            intermediate_size=r.vision_hidden * 3,
            num_heads=r.vision_heads,
            out_hidden_size=r.hidden,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[r.vision_depth - 1],
            tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
        **tokens,
    )


# -- training data -------------------------------------------------------------------------------
LIST_PROMPT = "List every object in the image with its bbox coordinates in JSON format."
REGION_PROMPT = "What is the object at {box}?"


@dataclass
class Turn:
    """One question and its reply; ``boxes`` are the boxes the reply writes, in order."""

    question: str
    answer: str
    boxes: list[tuple[int, int, int, int]]


def reading_order(sample: synth.Sample) -> list[synth.Obj]:
    """The objects top to bottom, then left to right (by the top-left corner of their box)."""
    return sorted(sample.objects, key=lambda o: (o.box[1], o.box[0]))


def object_list_answer(sample: synth.Sample) -> str:
    """All objects as a JSON list of Qwen2.5-VL-style entries (label, then box), in reading order."""
    return "[" + ", ".join(synth.format_answer(o.box, o.label) for o in reading_order(sample)) + "]"


def alignment_turns(sample: synth.Sample, rng: random.Random, regions: int = 1) -> list[Turn]:
    """Stage 2a, the alignment of a VLM's pre-training: the whole scene as a list of named, located objects,
    and region captions (name the object at a given box)."""
    objs = reading_order(sample)
    turns = [Turn(LIST_PROMPT, object_list_answer(sample), [o.box for o in objs])]
    for o in rng.sample(objs, min(regions, len(objs))):
        box = "[" + ", ".join(str(v) for v in o.box) + "]"
        turns.append(Turn(REGION_PROMPT.format(box=box), o.label, []))
    rng.shuffle(turns)
    return turns


def grounding_turns(sample: synth.Sample, rng: random.Random, extra: int, with_list: bool) -> list[Turn]:
    """Stage 2b, instructions: the sample's referring expression, ``extra`` more about other objects of
    the same image, optionally after the object list (replay of the alignment task)."""
    labels = {o.box: o.label for o in sample.objects}
    turns = [Turn(sample.question, sample.answer, [sample.box])]
    turns += [Turn(synth.PROMPT.format(ref=ref), synth.format_answer(box, labels.get(box)), [box])
              for ref, box in _extras(sample, rng, extra)]
    if with_list:
        turns.insert(0, Turn(LIST_PROMPT, object_list_answer(sample), [o.box for o in reading_order(sample)]))
    return turns


def conversation(sample: synth.Sample, turns: list[Turn]):
    """Chat messages: the image with the first question, then the further questions about the same image."""
    msgs = []
    for i, t in enumerate(turns):
        content = [{"type": "image", "image": sample.image}, {"type": "text", "text": t.question}] if i == 0 \
            else t.question
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": t.answer})
    return msgs


def encode_training_batch(processor, samples, turns):
    """Right-padded batch with labels on the assistant replies (and their end token) only.

    Also returns, for the coordinate losses, ``box_anchor`` (rows of ``(batch, position, k)``: the token
    right before coordinate ``k`` of a box in a reply), ``box_target`` (that coordinate, normalised to
    [0, 1]) and ``box_attrs`` (colour and shape of the box's object)."""
    tok = processor.tokenizer
    texts = [processor.apply_chat_template(conversation(s, t), tokenize=False) for s, t in zip(samples, turns)]
    enc = processor(text=texts, images=[s.image for s in samples], padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    labels = torch.full_like(ids, -100)
    header = tok.encode("<|im_start|>assistant\n")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    h = len(header)
    digit_ids = set(number_token_ids(tok))
    anchors, targets, attrs = [], [], []
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        by_box = {o.box: o for o in samples[b].objects}
        replies = iter(turns[b])
        i = 0
        while i < len(row):
            if row[i : i + h] == header:
                turn = next(replies)
                j = i + h
                numbers = []
                while j < len(row) and row[j] != end:
                    labels[b, j] = row[j]
                    if row[j] in digit_ids:
                        numbers.append(j)
                    j += 1
                if j < len(row):
                    labels[b, j] = end
                # each box is written as "bbox_2d": [x1, y1, x2, y2]: the "2" of its key, then 4 coordinates
                if len(numbers) != 5 * len(turn.boxes):
                    raise ValueError(f"reply {turn.answer!r}: expected {len(turn.boxes)} boxes")
                for n, box in enumerate(turn.boxes):
                    obj = by_box[box]
                    for k, pos in enumerate(numbers[5 * n + 1 : 5 * n + 5]):
                        anchors.append((b, pos - 1, k))
                        targets.append(box[k] / synth.IMAGE_SIZE)
                        attrs.append((list(synth.COLORS).index(obj.color), synth.SHAPES.index(obj.shape)))
                i = j
            i += 1
    enc["labels"] = labels
    enc["box_anchor"] = torch.tensor(anchors, dtype=torch.long).reshape(-1, 3)
    enc["box_target"] = torch.tensor(targets, dtype=torch.float32)
    enc["box_attrs"] = torch.tensor(attrs, dtype=torch.long).reshape(-1, 2)
    return enc


def _extras(sample: synth.Sample, rng: random.Random, k: int):
    out = []
    others = [o for o in sample.objects if o.box != sample.box]
    rng.shuffle(others)
    for o in others:
        if len(out) >= k:
            break
        exprs = synth._expressions(sample.objects, o)
        if exprs:
            kinds = list(exprs)
            w = [synth.KIND_WEIGHTS[x] for x in kinds]
            out.append((exprs[rng.choices(kinds, weights=w)[0]], o.box))
    return out


# -- dense targets for the vision tower ---------------------------------------------------------
GRID = synth.IMAGE_SIZE // 28  # merged tokens per side


def _coverage(sample: synth.Sample):
    """(objects, GRID, GRID): the fraction of each merged token's pixels each object covers."""
    import numpy as np
    from PIL import Image, ImageDraw

    cell = synth.IMAGE_SIZE // GRID
    cover = np.zeros((max(1, len(sample.objects)), GRID, GRID), np.float32)
    for k, o in enumerate(sample.objects):
        mask = Image.new("L", (synth.IMAGE_SIZE, synth.IMAGE_SIZE), 0)
        synth.draw_shape(ImageDraw.Draw(mask), o, 1)
        cover[k] = np.asarray(mask, np.float32).reshape(GRID, cell, GRID, cell).mean(axis=(1, 3))
    return cover


def cell_targets(sample: synth.Sample):
    """Per merged token (raster order): object colour and shape (0 = background), the covering object's
    box (normalised), whether an object covers it, and the token's own centre (normalised)."""
    import numpy as np

    cover = _coverage(sample)
    best, has = cover.argmax(0), cover.max(0) > 0.2
    colors, shapes = list(synth.COLORS), list(synth.SHAPES)
    color = np.where(has, np.array([colors.index(o.color) + 1 for o in sample.objects])[best], 0)
    shape = np.where(has, np.array([shapes.index(o.shape) + 1 for o in sample.objects])[best], 0)
    boxes = np.array([o.box for o in sample.objects], np.float32)[best] / synth.IMAGE_SIZE
    rows, cols = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    pos = np.stack([(cols + 0.5) / GRID, (rows + 0.5) / GRID], -1).astype(np.float32)
    return (torch.from_numpy(color.reshape(-1)).long(), torch.from_numpy(shape.reshape(-1)).long(),
            torch.from_numpy(boxes.reshape(-1, 4)), torch.from_numpy(has.reshape(-1)),
            torch.from_numpy(pos.reshape(-1, 2)))


def object_cells(sample: synth.Sample) -> dict[tuple, torch.Tensor]:
    """Merged-token indices (raster order) covered by each object, keyed by the object's box."""
    import numpy as np

    out = {}
    for o, cover in zip(sample.objects, _coverage(sample)):
        flat = cover.reshape(-1)
        idx = np.nonzero(flat > 0.2)[0]
        out[o.box] = torch.from_numpy(idx if idx.size else np.array([int(flat.argmax())])).long()
    return out


BOX_BINS = synth.IMAGE_SIZE // 8  # the vision tower's ordered box targets: 8-pixel bins


def soft_bin_loss(logits: torch.Tensor, value: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy against a Gaussian around ``value`` (in bins; bin ``i`` is centred on ``i``), and the
    absolute error of the predicted mean, in bins. Ordered classes: a near miss costs less than a far one,
    and the information lives in which logit is largest, which survives the averaging of attention."""
    centres = torch.arange(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    target = torch.softmax(-((centres - value.unsqueeze(-1)) ** 2) / (2 * sigma**2), -1)
    logp = torch.log_softmax(logits, -1)
    err = ((logp.exp() * centres).sum(-1) - value).abs().mean()
    return -(target * logp).sum(-1).mean(), err.detach()


class AuxHeads(torch.nn.Module):
    """Linear probes used for training only, never saved: on the vision tower's merged tokens (object
    colour / shape, the covering object's box as values and as ordered classes, token position), and on
    the language model's last hidden state right before each coordinate of an answer (the object's
    colour and shape)."""

    def __init__(self, dim: int):
        super().__init__()
        self.color = torch.nn.Linear(dim, len(synth.COLORS) + 1)
        self.shape = torch.nn.Linear(dim, len(synth.SHAPES) + 1)
        self.box = torch.nn.Linear(dim, 4)
        self.box_bins = torch.nn.Linear(dim, 4 * BOX_BINS)
        self.pos = torch.nn.Linear(dim, 2)

    def coord_loss(self, logits: torch.Tensor, hidden: torch.Tensor, anchor: torch.Tensor, target: torch.Tensor,
                   attrs: torch.Tensor, number_ids: torch.Tensor, sigma: float):
        """At each anchor: the language model's next-token distribution over the coordinate tokens
        against a Gaussian around the true coordinate (``sigma`` pixels), its mean error in pixels, and
        cross-entropy of probes for the target's colour and shape."""
        if anchor.numel() == 0:
            zero = hidden.sum() * 0
            return zero, zero, zero
        h = hidden[anchor[:, 0], anchor[:, 1]]
        coord, err = soft_bin_loss(logits[anchor[:, 0], anchor[:, 1]][:, number_ids], target * synth.IMAGE_SIZE, sigma)
        f = torch.nn.functional
        names = f.cross_entropy(self.color(h), attrs[:, 0] + 1) + f.cross_entropy(self.shape(h), attrs[:, 1] + 1)
        return coord, err, names

    def loss(self, feats: torch.Tensor, samples) -> tuple[torch.Tensor, dict[str, float]]:
        t = [cell_targets(s) for s in samples]
        color, shape, box, has, pos = (torch.cat([x[i] for x in t]).to(feats.device) for i in range(5))
        f = torch.nn.functional
        lc = f.cross_entropy(self.color(feats), color)
        ls = f.cross_entropy(self.shape(feats), shape)
        if bool(has.any()):  # the box both as a value (L1) and as ordered classes
            lb = (self.box(feats[has]) - box[has]).abs().mean()
            lbc, ebc = soft_bin_loss(self.box_bins(feats[has]).view(-1, 4, BOX_BINS), box[has] * BOX_BINS - 0.5, 1.0)
        else:
            lb = lbc = feats.sum() * 0
            ebc = torch.zeros(())
        lp = (self.pos(feats) - pos).abs().mean()
        total = lc + ls + 10 * lb + lbc + 10 * lp
        return total, {"color_ce": lc.item(), "shape_ce": ls.item(), "box_err_px": lb.item() * synth.IMAGE_SIZE,
                       "box_bins_err_px": ebc.item() * synth.IMAGE_SIZE / BOX_BINS,
                       "pos_err_px": lp.item() * synth.IMAGE_SIZE}


def _cosine(step: int, steps: int, warmup: int, lr: float, min_ratio: float) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return lr * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / steps))))


# -- evaluation during training ------------------------------------------------------------------
@torch.no_grad()
def quick_accuracy(model, processor, n: int, seed: int, split: str = "val") -> dict[str, float]:
    from ..boxes import iou, parse_qwen25_box
    from ..inputs import build_inputs, user_message

    model.eval()
    hits, ious, parsed = 0, 0.0, 0
    for i in range(n):
        s = synth.make_sample(seed, split, i)
        inputs, _ = build_inputs(processor, user_message(s.question, [s.image]))
        inputs = inputs.to(model.device)
        out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        box = parse_qwen25_box(text)
        parsed += box is not None
        v = iou(box, s.box)
        ious += v
        hits += v >= 0.5
    model.train()
    return {"acc": hits / n, "miou": ious / n, "parsed": parsed / n}


# -- training ------------------------------------------------------------------------------------
CHECKPOINT = "checkpoint.pt"
# recipe fields that change how a run is watched and stopped, not what it learns: a resumed run may change them
OPERATIONAL = ("minutes", "eval_every", "eval_samples", "checkpoint_every")


def _step_rng(r: ToyRecipe, phase: str, step: int) -> random.Random:
    """The randomness of one step (which questions, which objects): a function of the step, so that a
    resumed run draws what the uninterrupted run would have drawn."""
    return random.Random(f"ivcprune-toy/{r.seed}/{phase}/{step}")


def stage_batch(r: ToyRecipe, step: int) -> tuple[list[synth.Sample], list[list[Turn]]]:
    """The images and chats of stage-2 step ``step``: alignment turns for the first ``align_steps`` steps,
    then referring expressions (with the object list replayed on ``list_share`` of the images)."""
    rng = _step_rng(r, "chat", step)
    samples = [synth.make_sample(r.data_seed, "train", step * r.batch_size + i, confusers=r.confusers)
               for i in range(r.batch_size)]
    if step < r.align_steps:
        turns = [alignment_turns(s, rng, r.regions_per_image) for s in samples]
    else:
        turns = [grounding_turns(s, rng, rng.randint(0, r.queries_per_image - 1), rng.random() < r.list_share)
                 for s in samples]
    return samples, turns


def train(out_dir: str | Path, recipe: ToyRecipe | None = None, log=print, resume: bool = True,
          device: str = "cpu") -> dict:
    """Train the toy model from scratch; writes the checkpoint, processor and training log to ``out_dir``.

    A resumable checkpoint (``checkpoint.pt``: weights, optimiser, probes, progress) is written every
    ``checkpoint_every`` steps; with ``resume`` an interrupted run continues from it and ends where the
    uninterrupted run would have (the data of every step is a function of the step).

    ``device`` (e.g. ``"cuda"``) runs the same recipe on an accelerator: the data, schedule and checkpoints
    are the same, the arithmetic is not bit-identical to the CPU's, so the shipped model is the CPU run's
    (the recipe's reference); a run may move between devices through its checkpoint."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    r = recipe or ToyRecipe()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: torch sees no CUDA device here; train on cpu (the reference)")
    synth.check_confusers(r.confusers)  # fails now, not after the vision stage
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(r.vocab_size, r.data_seed)
    processor = build_toy_processor(tok)
    cfg = toy_config(tok, r)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    init_number_embeddings(model, tok)
    model.to(dev)
    number_ids = torch.tensor(number_token_ids(tok), device=dev)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    heads = AuxHeads(cfg.text_config.hidden_size).to(dev)
    visual = model.model.visual
    vopt = torch.optim.AdamW(list(visual.parameters()) + list(heads.parameters()), lr=r.vision_lr, betas=(0.9, 0.98),
                             weight_decay=r.weight_decay)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
         {"params": list(heads.parameters()), "weight_decay": 0.0}],
        lr=r.lr, betas=(0.9, 0.98),
    )
    st = {"vision_step": 0, "step": 0, "train_seconds": 0.0, "eval_seconds": 0.0, "ema": None, "history": []}
    ckpt = out / CHECKPOINT
    if resume and ckpt.exists():
        saved = torch.load(ckpt, weights_only=False, map_location=dev)
        diff = sorted(k for k, v in asdict(r).items() if saved["recipe"].get(k) != v and k not in OPERATIONAL)
        if diff:
            raise ValueError(f"{ckpt} belongs to a run with another recipe (differs in {', '.join(diff)}); "
                             "train into a new folder, or pass the same settings to resume")
        model.load_state_dict(saved["model"])
        heads.load_state_dict(saved["heads"])
        vopt.load_state_dict(saved["vopt"])
        opt.load_state_dict(saved["opt"])
        st = saved["state"]
        log(f"resuming from {ckpt}: vision step {st['vision_step']}, step {st['step']}")
    log(f"toy model: {n_params / 1e6:.2f}M parameters, vocab {len(tok)}")
    budget_s = r.minutes * 60
    clock = time.time()

    def tick() -> float:  # training seconds so far (this run's time added to the resumed runs')
        nonlocal clock
        now = time.time()
        st["train_seconds"] += now - clock
        clock = now
        return st["train_seconds"]

    def save_checkpoint():
        tick()
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"recipe": asdict(r), "model": model.state_dict(), "heads": heads.state_dict(),
                    "vopt": vopt.state_dict(), "opt": opt.state_dict(), "state": st}, tmp)
        tmp.replace(ckpt)

    stopped_early = False
    vision_index = 10**9  # stage-1 images come from their own part of the training stream
    while st["vision_step"] < r.vision_steps:
        vstep = st["vision_step"]
        lr = _cosine(vstep, r.vision_steps, r.warmup_steps // 2, r.vision_lr, r.min_lr_ratio)
        for g in vopt.param_groups:
            g["lr"] = lr
        first = vision_index + vstep * r.vision_batch_size
        samples = [synth.make_sample(r.data_seed, "train", first + i) for i in range(r.vision_batch_size)]
        pix = processor.image_processor(images=[s.image for s in samples], return_tensors="pt")
        feats = visual(pix["pixel_values"].to(dev), grid_thw=pix["image_grid_thw"].to(dev)).pooler_output
        loss, parts = heads.loss(feats, samples)
        vopt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(visual.parameters(), 1.0)
        vopt.step()
        st["vision_step"] += 1
        if st["vision_step"] % 50 == 0:
            log(f"vision step {st['vision_step']} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" {tick():.0f}s")
        if r.checkpoint_every and st["vision_step"] % r.checkpoint_every == 0:
            save_checkpoint()
    captured = {}
    hook = visual.register_forward_hook(lambda m, a, o: captured.__setitem__("feats", o.pooler_output))
    while st["step"] < r.steps:
        if tick() > budget_s:
            stopped_early = True
            log(f"stopping at step {st['step']}: the {r.minutes} minute budget is spent (resumable)")
            break
        step = st["step"]
        lr = _cosine(step, r.steps, r.warmup_steps, r.lr, r.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        samples, turns = stage_batch(r, step)
        batch = encode_training_batch(processor, samples, turns).to(dev)
        anchor, target, attrs = batch.pop("box_anchor"), batch.pop("box_target"), batch.pop("box_attrs")
        res = model(**batch, output_hidden_states=True)
        lm_loss = res.loss
        aux, _ = heads.loss(captured.pop("feats"), samples)
        coord, coord_err, names = heads.coord_loss(res.logits, res.hidden_states[-1], anchor, target, attrs,
                                                   number_ids, r.coord_sigma)
        loss = lm_loss + r.aux_weight * (aux + names) + r.coord_weight * coord
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        st["step"] += 1
        st["ema"] = lm_loss.item() if st["ema"] is None else 0.95 * st["ema"] + 0.05 * lm_loss.item()
        step = st["step"]
        if step % 25 == 0:
            stage = "align" if step <= r.align_steps else "instruct"
            log(f"step {step} ({stage}) loss {st['ema']:.4f} coord_err_px {coord_err.item():.1f} "
                f"names_ce {names.item():.3f} lr {lr:.2e} {tick():.0f}s")
        if r.eval_every and step % r.eval_every == 0:
            tick()
            acc = quick_accuracy(model, processor, r.eval_samples, r.data_seed)
            st["eval_seconds"] += time.time() - clock
            clock = time.time()
            st["history"].append({"step": step, "images": step * r.batch_size,
                                  "train_seconds": round(st["train_seconds"], 1), "loss": round(st["ema"], 4), **acc})
            log(f"  val@{r.eval_samples}: acc {acc['acc']:.3f} mIoU {acc['miou']:.3f} parsed {acc['parsed']:.2f}")
        if r.checkpoint_every and step % r.checkpoint_every == 0:
            save_checkpoint()
    hook.remove()
    save_checkpoint()
    model.eval()
    tick()
    final = quick_accuracy(model, processor, r.eval_samples, r.data_seed)
    st["eval_seconds"] += time.time() - clock
    history = list(st["history"])
    if not history or history[-1]["step"] != st["step"]:
        history.append({"step": st["step"], "images": st["step"] * r.batch_size,
                        "train_seconds": round(st["train_seconds"], 1), "loss": round(st["ema"] or 0, 4), **final})
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.generation_config.pad_token_id = cfg.pad_token_id
    model.generation_config.do_sample = False
    model.to("cpu").save_pretrained(out)
    processor.save_pretrained(out)
    summary = {"recipe": asdict(r), "parameters": n_params, "steps": st["step"], "images": st["step"] * r.batch_size,
               "vision_images": st["vision_step"] * r.vision_batch_size,
               "train_seconds": round(st["train_seconds"], 1), "eval_seconds": round(st["eval_seconds"], 1),
               "stopped_early": stopped_early, "device": dev.type, "history": history}
    (out / "training_log.json").write_text(json.dumps(summary, indent=2))
    return summary
