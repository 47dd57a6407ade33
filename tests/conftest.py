"""Shared fixtures: tiny models of every registered family built from real transformers configs (random
weights) and prompts with images / videos laid out exactly as each family's processor lays them out."""

from __future__ import annotations

import pytest
import torch

from ivcprune.families import FAMILIES as REGISTERED
from ivcprune.families.internvl import tiled_pixels
from ivcprune.models import tiny_model
from ivcprune.tiny import TOKEN_IDS

# every registered family, by its tiny test config
FAMILIES = {mt: next(n for n in cls.random_configs if n.startswith("tiny-")) for mt, cls in REGISTERED.items()}
QWEN = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe")
FRAME_BLOCKS = ("qwen3_vl", "qwen3_vl_moe")  # a video is one <vs> ... <ve> block per frame, after a timestamp

IMG = TOKEN_IDS["image_token_id"]
VID = TOKEN_IDS["video_token_id"]
VS = TOKEN_IDS["vision_start_token_id"]
VE = TOKEN_IDS["vision_end_token_id"]


def make_model(family: str = "qwen2_5_vl", attn: str = "sdpa", layers: int = 4, seed: int = 0):
    # init_std well above the default so that random models have peaked, input-dependent outputs
    return tiny_model(FAMILIES[family], seed=seed, init_std=0.15, overrides={"num_hidden_layers": layers},
                      attn_implementation=attn)


def make_inputs(model, media=(("image", 1, 8, 12),), text_before=6, text_after=9, seed=0):
    """Prompt ``text_before`` + for each medium ``<vs> pad*N <ve>`` + two text tokens, then ``text_after``.

    ``media`` items are ``(kind, t, h, w)`` in Qwen-VL patches (before the 2x2 merge); other families get
    the nearest thing they have (:func:`family_media`)."""
    if model.config.model_type not in QWEN:
        return family_media(model, media, text_before, text_after, seed)
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    ids = torch.randint(3, 250, (text_before,), generator=g).tolist()
    pix, vpix, grids, vgrids = [], [], [], []
    for kind, t, h, w in media:
        n = t * h * w // 4
        if kind == "video" and cfg.model_type in FRAME_BLOCKS:  # "<0.5 seconds>" text, then the frame's block
            for _ in range(t):
                ids += torch.randint(3, 250, (3,), generator=g).tolist() + [VS] + [VID] * (n // t) + [VE]
        else:
            ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
        ids += torch.randint(3, 250, (2,), generator=g).tolist()
        (pix if kind == "image" else vpix).append(torch.randn(t * h * w, patch_dim, generator=g))
        (grids if kind == "image" else vgrids).append([t, h, w])
    ids += torch.randint(3, 250, (text_after,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == IMG] = 1
    mm[input_ids == VID] = 2
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": mm}
    if pix:
        out["pixel_values"] = torch.cat(pix)
        out["image_grid_thw"] = torch.tensor(grids)
    if vpix:
        out["pixel_values_videos"] = torch.cat(vpix)
        out["video_grid_thw"] = torch.tensor(vgrids)
    return out


def family_media(model, media, text_before, text_after, seed):
    """:func:`make_inputs` for LLaVA (each image or video one image of the tower's size) and InternVL (an
    image of h x w patches is ``max(1, h // 8) x max(1, w // 8)`` tiles, plus the thumbnail when several;
    a video of t frames is t one-tile images)."""
    if model.config.model_type == "llava_onevision":
        return onevision_media(model, media, text_before, text_after, seed)
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    vc = cfg.vision_config
    ids = torch.randint(3, 250, (text_before,), generator=g).tolist()
    pix = []
    for kind, t, h, w in media:
        if cfg.model_type == "llava":
            ids += [IMG] * cfg.image_seq_length
            pix.append(torch.randn(1, vc.num_channels, vc.image_size, vc.image_size, generator=g))
        elif cfg.model_type == "gemma3":  # one image per medium, each <boi> + mm_tokens_per_image + <eoi>
            ids += [cfg.boi_token_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [cfg.eoi_token_id]
            pix.append(torch.randn(1, vc.num_channels, vc.image_size, vc.image_size, generator=g))
        else:
            grids = [(max(1, h // 8), max(1, w // 8))] if kind == "image" else [(1, 1)] * t
            for rows, cols in grids:
                blocks = rows * cols + (rows * cols > 1)
                ids += [VS] + [IMG] * blocks * cfg.image_seq_length + [VE]
                pix.append(tiled_pixels(rows, cols, vc.image_size[0], vc.num_channels, g))
        ids += torch.randint(3, 250, (2,), generator=g).tolist()
    ids += torch.randint(3, 250, (text_after,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if cfg.model_type == "gemma3":  # as Gemma3Processor returns them: 1 on image tokens
        out["token_type_ids"] = (input_ids == cfg.image_token_id).long()
    if pix:
        out["pixel_values"] = torch.cat(pix)
    return out


def onevision_media(model, media, text_before, text_after, seed):
    """:func:`make_inputs` for LLaVA-OneVision: an image of h x w patches is an image of ``10h x 10w`` pixels (its
    base view and mosaic with row newlines; base view and newline only when the prompt has several images, as
    the processor treats them); a video of t frames is t pooled frames and a newline."""
    from ivcprune.families.llava_onevision import image_layout, tile_grid, video_side

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    px, C = cfg.vision_config.image_size, cfg.vision_config.num_channels
    images = [(10 * h, 10 * w) for kind, t, h, w in media if kind == "image"]
    ids = torch.randint(3, 250, (text_before,), generator=g).tolist()
    pix, vpix = [], []
    for kind, t, h, w in media:
        if kind == "image":
            hw = None if len(images) > 1 else (10 * h, 10 * w)
            ids += [IMG] * image_layout(cfg, hw).length
            rows, cols = tile_grid(hw, cfg.image_grid_pinpoints, px) if hw else (0, 0)
            pix.append(torch.randn(1 + rows * cols, C, px, px, generator=g))
        else:
            ids += [VID] * (t * video_side(cfg) ** 2 + 1)
            vpix.append(torch.randn(1, t, C, px, px, generator=g))
        ids += torch.randint(3, 250, (2,), generator=g).tolist()
    ids += torch.randint(3, 250, (text_after,), generator=g).tolist()
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if pix:
        most = max(x.shape[0] for x in pix)
        out["pixel_values"] = torch.stack([torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) for x in pix])
        out["image_sizes"] = torch.tensor(images)
        out["batch_num_images"] = torch.tensor([len(images)])
    if vpix:
        out["pixel_values_videos"] = torch.cat(vpix)
    return out


def batch_inputs(rows: list[dict]) -> dict:
    """Single-row inputs stacked into one left-padded batch, as a processor pads them (``padding_side="left"``);
    media tensors concatenated in row order."""
    width = max(r["input_ids"].shape[1] for r in rows)

    def left_pad(t, value):
        return torch.cat([torch.full((1, width - t.shape[1]), value, dtype=t.dtype), t], dim=1)

    out = {
        "input_ids": torch.cat([left_pad(r["input_ids"], TOKEN_IDS["pad_token_id"]) for r in rows]),
        "attention_mask": torch.cat([left_pad(r["attention_mask"], 0) for r in rows]),
    }
    if "mm_token_type_ids" in rows[0]:
        out["mm_token_type_ids"] = torch.cat([left_pad(r["mm_token_type_ids"], 0) for r in rows])
    if "token_type_ids" in rows[0]:
        out["token_type_ids"] = torch.cat([left_pad(r["token_type_ids"], 0) for r in rows])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "image_sizes",
                "batch_num_images"):
        parts = [r[key] for r in rows if key in r]
        if parts and key == "pixel_values" and parts[0].dim() == 5:  # LLaVA-OneVision: patches padded to the most
            most = max(p.shape[1] for p in parts)
            parts = [torch.cat([p, p.new_zeros(p.shape[0], most - p.shape[1], *p.shape[2:])], dim=1) for p in parts]
        if parts:
            out[key] = torch.cat(parts)
    return out


def mixed_rows(model) -> list[dict]:
    """Prompts of different lengths: one image, no image, two images of different sizes, a video."""
    return [
        make_inputs(model, media=(("image", 1, 12, 16),), seed=1),
        make_inputs(model, media=(), text_before=5, text_after=7, seed=2),
        make_inputs(model, media=(("image", 1, 8, 8), ("image", 1, 4, 8)), text_before=3, seed=3),
        make_inputs(model, media=(("video", 2, 8, 8),), text_after=4, seed=4),
    ]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module (tiny models run fastest so on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def qwen25():
    return make_model("qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen2():
    return make_model("qwen2_vl")


@pytest.fixture()
def scripted_answers(monkeypatch) -> list[str]:
    """The model's answers, scripted: each generated answer (in the order samples are asked) is replaced by
    the next string of the returned list, which the test fills; everything else (prompts, images, records,
    metrics) runs for real on the embedded model."""
    from ivcprune.evals import tasks

    script: list[str] = []
    real = tasks.generate_answers

    def scripted(model, processor, prompts, method, *, max_new_tokens, pixels):
        gens = real(model, processor, prompts, method, max_new_tokens=1, pixels=pixels)
        for gen in gens:
            gen.text = script.pop(0)
        return gens

    monkeypatch.setattr(tasks, "generate_answers", scripted)
    return script
