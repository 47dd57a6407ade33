"""Chat messages -> model inputs, the way each model family takes them (:mod:`ivcprune.media`)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .media import media_for

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def user_message(prompt: str, images=(), videos=(), *, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> list[dict[str, Any]]:
    """One user turn: the images / videos first, then the prompt (Qwen-VL's usual layout); the pixel bounds
    apply to Qwen-VL models (qwen-vl-utils), other families' processors size images themselves."""
    content: list[dict[str, Any]] = []
    for img in images:
        item: dict[str, Any] = {"type": "image", "image": as_rgb(img)}
        if min_pixels is not None:
            item["min_pixels"] = min_pixels
        if max_pixels is not None:
            item["max_pixels"] = max_pixels
        content.append(item)
    for vid in videos:
        content.append({"type": "video", "video": vid})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def build_inputs(processor, messages: list[dict[str, Any]], *, image_patch_size: int = 14,
                 model_type: str | None = None, max_tiles: int | None = None):
    """``(inputs, images)``: processor outputs (batch of one, ``return_tensors="pt"``) and the PIL images as
    the model sees them (what a visualisation should draw on), built the way the model's family takes images
    (:mod:`ivcprune.media`: Qwen-VL's resized by qwen-vl-utils, LLaVA's and InternVL's by their processor)."""
    inputs, seen = build_batch_inputs(processor, [messages], image_patch_size=image_patch_size,
                                      model_type=model_type, max_tiles=max_tiles)
    return inputs, seen[0]


def build_batch_inputs(processor, conversations: list[list[dict[str, Any]]], *, image_patch_size: int = 14,
                       padding_side: str = "left", model_type: str | None = None, max_tiles: int | None = None):
    """``(inputs, seen)`` for several conversations, one batch row each, padded on ``padding_side`` (left:
    what batched generation needs): the processor's outputs (``return_tensors="pt"``) and, per row, the PIL
    images as the model sees them (see :func:`build_inputs`). Rows may differ in image sizes and counts, or
    have no image. ``model_type`` picks the family's input building (default: from the processor's class);
    ``max_tiles`` caps InternVL's tiles per image (default: the processor's own limit)."""
    prepared = prepare_batch(processor, conversations, image_patch_size=image_patch_size, padding_side=padding_side,
                             model_type=model_type, max_tiles=max_tiles)
    return prepared.inputs, prepared.seen


def prepare_batch(processor, conversations: list[list[dict[str, Any]]], *, image_patch_size: int = 14,
                  padding_side: str = "left", model_type: str | None = None, max_tiles: int | None = None):
    """:func:`build_batch_inputs` with the views too: a :class:`ivcprune.media.Prepared` (``inputs``, per row
    ``seen`` images and their ``views``: where an original image's pixels land on its seen image)."""
    return media_for(model_type, processor).prepare(processor, conversations, image_patch_size=image_patch_size,
                                                    padding_side=padding_side, max_tiles=max_tiles)


def stack_inputs(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch from model inputs of equal prompt length (one row each, e.g. ``synthetic_inputs`` with
    different seeds): token tensors stacked as rows, pixel values and grids concatenated."""
    lengths = {int(r["input_ids"].shape[1]) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"stack_inputs needs rows of one prompt length, got {sorted(lengths)}")
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def load_image(path_or_image) -> Image.Image:
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    with Image.open(path_or_image) as im:
        return im.convert("RGB")


class EncodedImage:
    """A dataset's image still in its file encoding: the header is read at once (so a missing file or
    bytes that are no image are caught where the row is read, and ``size`` is known), the pixels are
    decoded by :meth:`load` when the sample is predicted. Samples a run skips (done already, another
    rank's shard) therefore cost no decoding."""

    def __init__(self, data: bytes | None = None, path: str | Path | None = None):
        if (data is None) == (path is None):
            raise ValueError("EncodedImage takes image bytes or a path")
        self.data, self.path = data, None if path is None else Path(path)
        if self.path is not None and not self.path.is_file():
            raise FileNotFoundError(f"image not found: {self.path}")
        with self._open() as im:
            self.size: tuple[int, int] = im.size

    def _open(self) -> Image.Image:
        return Image.open(io.BytesIO(self.data)) if self.data is not None else Image.open(self.path)

    def load(self) -> Image.Image:
        """The decoded RGB image (decoded on every call; nothing is cached)."""
        with self._open() as im:
            return im.convert("RGB")

    def __repr__(self) -> str:
        where = self.path if self.path is not None else f"{len(self.data)} bytes"
        return f"EncodedImage({where}, size={self.size})"


def as_rgb(image) -> Image.Image:
    """A PIL image, decoding an :class:`EncodedImage`."""
    return image.load() if isinstance(image, EncodedImage) else image


def read_image_field(value: str, base_dir: str | Path = ".") -> EncodedImage:
    """A dataset's image field (a path, absolute or relative to ``base_dir``, or base64) -> :class:`EncodedImage`."""
    value = value.strip()
    if len(value) < 1024 and Path(value).suffix.lower() in IMAGE_SUFFIXES:
        return EncodedImage(path=value if os.path.isabs(value) else Path(base_dir) / value)
    return EncodedImage(data=base64.b64decode(value, validate=False))
