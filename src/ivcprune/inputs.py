"""Chat messages -> model inputs, the way Qwen-VL models expect them (qwen-vl-utils + the processor)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def user_message(prompt: str, images=(), videos=(), *, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> list[dict[str, Any]]:
    """One user turn: the images / videos first, then the prompt (Qwen-VL's usual layout)."""
    content: list[dict[str, Any]] = []
    for img in images:
        item: dict[str, Any] = {"type": "image", "image": img}
        if min_pixels is not None:
            item["min_pixels"] = min_pixels
        if max_pixels is not None:
            item["max_pixels"] = max_pixels
        content.append(item)
    for vid in videos:
        content.append({"type": "video", "video": vid})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def build_inputs(processor, messages: list[dict[str, Any]], *, image_patch_size: int = 14):
    """``(inputs, images)``: processor outputs (batch of one, ``return_tensors="pt"``) and the resized
    PIL images the model sees (what a visualisation should draw on)."""
    from qwen_vl_utils import process_vision_info

    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(messages, image_patch_size=image_patch_size)
    inputs = processor(text=[text], images=images, videos=videos, return_tensors="pt")
    return inputs, list(images or [])


def load_image(path_or_image) -> Image.Image:
    if isinstance(path_or_image, Image.Image):
        return path_or_image.convert("RGB")
    with Image.open(path_or_image) as im:
        return im.convert("RGB")


def decode_image(value: str, base_dir: str | Path = ".") -> Image.Image:
    """A dataset's image field -> RGB image: a path (absolute, or relative to ``base_dir``) or base64."""
    value = value.strip()
    if len(value) < 1024 and Path(value).suffix.lower() in IMAGE_SUFFIXES:
        return load_image(value if os.path.isabs(value) else Path(base_dir) / value)
    with Image.open(io.BytesIO(base64.b64decode(value, validate=False))) as im:
        return im.convert("RGB")
