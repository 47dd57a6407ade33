"""InternVL 2.5 / 3 / 3.5 (transformers' ``InternVL*`` classes, the ``-hf`` checkpoints): everything about it.

An image is ``<img>`` + 256 ``<IMG_CONTEXT>`` tokens per 448-pixel tile + ``</img>``: the high-resolution tiles
(row-major) and, when there are several, a thumbnail of the whole image last. The tile grid is not in the
token ids and the processor does not return it: it is recovered from the pixel values the forward receives
(the grid whose mosaic, shrunk to one tile, looks like the thumbnail; :func:`ivcprune.tiles.match_tiling`),
so any caller's inputs carry it, and the processor's own choice is reproduced by :meth:`InternVL.tiling`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from ..tiles import TileLayout, match_tiling
from ..tiny import TOKEN_IDS as TINY_TOKEN_IDS
from .base import Rope1DFamily, Span, UnsupportedModelError, letter_mcq_prompt, override_spec, token_runs

# InternViT-300M-448px (InternVL 2.5 / 3 8B): 32x32 patches of 14 px, pixel shuffle 0.5 -> 256 tokens per tile
_INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14], norm_type="layer_norm", use_qk_norm=False,
                       layer_norm_eps=1e-6, hidden_act="gelu", use_mean_pooling=True)
# InternLM2.5-7B, as the -hf conversion stores it (a Llama decoder)
_INTERNLM25_7B = dict(model_type="llama", vocab_size=92553, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=32768, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
# Qwen2.5-7B (InternVL3-8B's LLM)
_QWEN25_7B = dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                  num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
_INTERNLM_TOKENS = dict(image_token_id=92546, start_image_token_id=92544, end_image_token_id=92545, bos_token_id=1,
                        eos_token_id=92542, pad_token_id=2)
_QWEN_TOKENS = dict(image_token_id=151667, start_image_token_id=151665, end_image_token_id=151666,
                    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
_TINY_TOKENS = dict(image_token_id=TINY_TOKEN_IDS["image_token_id"],
                    start_image_token_id=TINY_TOKEN_IDS["vision_start_token_id"],
                    end_image_token_id=TINY_TOKEN_IDS["vision_end_token_id"],
                    bos_token_id=TINY_TOKEN_IDS["bos_token_id"], eos_token_id=TINY_TOKEN_IDS["eos_token_id"],
                    pad_token_id=TINY_TOKEN_IDS["pad_token_id"])
_TINY_TEXT = dict(_QWEN25_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
# 112-pixel tiles of 14-pixel patches, pixel shuffle 0.5: 4x4 = 16 tokens per tile
_TINY_VISION = dict(_INTERNVIT_300M, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=[112, 112])


class InternVL(Rope1DFamily):
    """InternVL: tiled images (:class:`~ivcprune.tiles.TileLayout` in every span), 1-D RoPE decoder
    (Qwen2 / Qwen3 / Llama-converted InternLM2)."""

    model_type = "internvl"
    display_name = "InternVL"
    # VLMEvalKit's InternVL grounding prompt (the authors' evaluation)
    grounding_prompt = ("Please provide the bounding box coordinate of the region this sentence describes: "
                        "<ref>{ref}</ref>")
    box_format = "ref_box"
    box_frame = "1000"
    image_patch_size = 14
    max_tiles = 6  # the authors' evaluation (max_num) for the paper's benchmarks
    random_configs = {
        "internvl2.5-8b": dict(text=_INTERNLM25_7B, vision=_INTERNVIT_300M, tokens=_INTERNLM_TOKENS),
        "internvl3-8b": dict(text=_QWEN25_7B, vision=_INTERNVIT_300M, tokens=_QWEN_TOKENS),
        "tiny-internvl": dict(text=_TINY_TEXT, vision=_TINY_VISION, tokens=_TINY_TOKENS),
    }

    @classmethod
    def model_classes(cls):
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        return InternVLConfig, InternVLForConditionalGeneration

    @classmethod
    def build_config(cls, spec: dict[str, Any], overrides: dict[str, Any] | None = None):
        spec = override_spec(spec, overrides)
        config_cls, _ = cls.model_classes()
        tokens = dict(spec["tokens"])
        markers = {k: tokens.pop(k) for k in ("start_image_token_id", "end_image_token_id")}
        vision = spec["vision"]
        side = cls.side_of(vision["image_size"][0], vision["patch_size"][0], 0.5)
        cfg = config_cls(text_config={**spec["text"], **tokens}, vision_config=vision, downsample_ratio=0.5,
                         image_token_id=tokens.pop("image_token_id"), image_seq_length=side * side,
                         tie_word_embeddings=False)
        for name, value in markers.items():  # the <img> / </img> markers (the config has no field for them)
            setattr(cfg, name, value)
        return cfg

    @staticmethod
    def side_of(image_size: int, patch_size: int, downsample_ratio: float) -> int:
        return int(image_size // patch_size * downsample_ratio)

    @classmethod
    def tile_side(cls, config) -> int:
        vc = config.vision_config
        return cls.side_of(vc.image_size[0], vc.patch_size[0], config.downsample_ratio)

    @classmethod
    def synthetic_inputs(cls, config, image_tokens: int, text_tokens: int, seed: int = 0):
        """One image of about ``image_tokens`` tokens: the tile grid closest to a square whose tiles plus
        thumbnail hold about that many (one tile when ``image_tokens`` fits one); noise pixels.
        ``(inputs, (rows, cols))``, on the CPU."""
        side = cls.tile_side(config)
        n = max(1, round(image_tokens / (side * side)))
        tiles = 1 if n <= 1 else max(2, n - 1)
        rows = max(r for r in range(1, int(tiles**0.5) + 1) if tiles % r == 0)
        g = torch.Generator().manual_seed(seed)
        inputs = tile_prompt(config, [(rows, tiles // rows)], text_tokens, generator=g)
        return inputs, (rows, tiles // rows)

    @classmethod
    def mcq_prompt(cls, question: str, options: dict[str, str], hint: str | None = None) -> str:
        """VLMEvalKit's InternVL multiple-choice prompt (the authors' evaluation)."""
        return letter_mcq_prompt(question, options, hint)

    @classmethod
    def yesno_prompt(cls, question: str) -> str:
        """VLMEvalKit's InternVL prompt for MME (other yes/no benchmarks pass the question as written)."""
        return question.rstrip() + " Answer the question using a single word or phrase."

    @classmethod
    def tiling(cls, image_size: tuple[int, int], min_tiles: int = 1, max_tiles: int | None = None, *,
               tile_size: int = 448) -> tuple[int, int]:
        """``(rows, cols)`` of tiles the processor chooses for an image of ``(width, height)`` pixels, with tiles
        of ``tile_size`` pixels (the tile size breaks ties between grids of equally close aspect ratios)."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

        w, h = image_size
        cols, rows = get_optimal_tiled_canvas((h, w), (tile_size, tile_size), min_tiles, max_tiles or cls.max_tiles)
        return rows, cols

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.config = model.config
        self.model_type = self.config.model_type
        self.bind_language_model("an InternVL model")
        self.image_token_id = self.config.image_token_id
        self.side = self.tile_side(self.config)

    def find_spans(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[Span]:
        n = self.side * self.side
        spans = []
        for start, length in token_runs(input_ids.reshape(-1) == self.image_token_id):
            single = TileLayout(1, 1, self.side) if length == n else None  # several tiles: see layout_spans
            spans.append(Span(start, length, "image", None, single))
        return spans

    def cls_attention_parts(self):
        raise UnsupportedModelError(
            "InternVL's visual tokens each pool 2x2 vision patches (pixel shuffle): there is no CLS attention per "
            "visual token to rank them by"
        )

    def media_modules(self) -> list[nn.Module]:
        return [self.entry.vision_tower]

    def layout_spans(self, spans: list[list[Span]], media: list[torch.Tensor]) -> list[list[Span]]:
        """Each image's tile grid, matched on its own pixel values (tiles then thumbnail, images in prompt
        order, rows in batch order, as the processor concatenates them). Left unknown (``tiles=None``) when
        the pixel values cannot be matched to the spans (e.g. features passed in without pixels)."""
        n = self.side * self.side
        pixels = torch.cat(media) if media else None
        blocks = [s.length // n for row in spans for s in row]
        if pixels is None or sum(blocks) != pixels.shape[0] or any(s.length % n for row in spans for s in row):
            return spans
        out, first = [], 0
        for row in spans:
            done = []
            for s in row:
                k = s.length // n
                if k > 1:
                    rows, cols = match_tiling(pixels[first : first + k - 1], pixels[first + k - 1])
                    s = dataclasses.replace(s, tiles=TileLayout(rows, cols, self.side))
                done.append(s)
                first += k
            out.append(done)
        return out


def tile_prompt(config, grids: list[tuple[int, int]], text_tokens: int = 8, *, generator: torch.Generator,
                text_before: int = 4) -> dict[str, torch.Tensor]:
    """A batch-of-one InternVL prompt: ``text_before`` tokens, then per image ``<img>`` + its tiles (and a
    thumbnail when several) + ``</img>`` and two text tokens, then ``text_tokens`` more; pixel values are
    noise of the tower's tile shape (``(rows, cols)`` per image)."""
    side = InternVL.tile_side(config)
    vc = config.vision_config
    high = min(config.get_text_config().vocab_size, config.image_token_id, config.start_image_token_id) - 1

    def text(k):
        return torch.randint(10, high, (k,), generator=generator).tolist()

    ids, pixels = text(text_before), []
    for rows, cols in grids:
        n = rows * cols + (rows * cols > 1)
        ids += [config.start_image_token_id] + [config.image_token_id] * n * side * side + [config.end_image_token_id]
        ids += text(2)
        pixels.append(tiled_pixels(rows, cols, vc.image_size[0], vc.num_channels, generator))
    ids += text(text_tokens)
    input_ids = torch.tensor([ids])
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    return out


def tiled_pixels(rows: int, cols: int, size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """Pixel values of a smooth random image cut as InternVL's processor cuts it: ``rows x cols`` tiles of
    ``size`` pixels (row-major), then the thumbnail (the whole image at one tile's size) when there are several."""
    coarse = torch.randn(1, channels, 3 * rows, 3 * cols, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(rows * size, cols * size), mode="bilinear")
    tiles = image.reshape(channels, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(-1, channels, size, size)
    if rows * cols == 1:
        return tiles
    thumb = torch.nn.functional.interpolate(image, size=(size, size), mode="area")
    return torch.cat([tiles, thumb])
