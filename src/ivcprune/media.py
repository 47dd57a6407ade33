"""How each model family's processor takes images, and where an image's pixels land in what the model saw.

Input building is a family decision (:func:`media_for`, keyed by ``config.model_type``):

- Qwen-VL: qwen-vl-utils resizes every image within its pixel bounds (``min_pixels`` / ``max_pixels`` of the
  message, multiples of 28 pixels) and the processor takes the result as it is;
- LLaVA-1.5: the images as given; the processor resizes (and pads or centre-crops) them to the tower's size;
- InternVL: the images as given; the processor cuts them into tiles (at most ``max_tiles``, when given, else
  the processor's own ``max_patches``) plus a thumbnail;
- LLaVA-OneVision: the images as given, one list per row; the processor makes a base view and the tiles of its
  pinpoint grid (the base view alone for each image of a row with several).

What a picture draws on (``seen``) and where an original image's pixels land on it (:class:`ImageView`):
Qwen-VL the resized image; LLaVA the image as the tower sees it (padded to a square or centre-cropped, then
resized, as the processor is configured); InternVL the original image (its tiles cover it in a grid, see
:class:`~ivcprune.tiles.TileLayout` in the report's span).
"""

from __future__ import annotations

import base64
import io
import threading
import urllib.request
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from .families.internvl import InternVL

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageView:
    """An original image of ``size`` (W, H) as seen: ``seen_x = x * scale[0] + offset[0]`` (and y alike), on an
    image of ``seen_size``; a tiled image's grid (``tiles``: row-major tiles covering the seen image evenly)."""

    size: tuple[int, int]
    seen_size: tuple[int, int]
    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
    tiles: tuple[int, int] | None = None  # InternVL: the (rows, cols) tile grid the processor cut the image into

    def box(self, box: Box | None) -> Box | None:
        """A box in original pixels -> seen pixels (``None`` stays ``None``)."""
        if box is None:
            return None
        (sx, sy), (dx, dy) = self.scale, self.offset
        return (box[0] * sx + dx, box[1] * sy + dy, box[2] * sx + dx, box[3] * sy + dy)


def rgb(image: Image.Image) -> Image.Image:
    """RGB pixels, transparent ones on white (as qwen-vl-utils reads images)."""
    if image.mode == "RGBA":
        out = Image.new("RGB", image.size, (255, 255, 255))
        out.paste(image, mask=image.getchannel("A"))
        return out
    return image.convert("RGB")


def load_visual(value: Any) -> Image.Image:
    """An image item of a chat message -> RGB PIL image: a PIL image, a path, ``file://``, ``data:image/...;base64,``
    or an http(s) URL (what qwen-vl-utils accepts)."""
    if isinstance(value, Image.Image):
        return rgb(value)
    if hasattr(value, "load") and hasattr(value, "size"):  # an EncodedImage
        return value.load()
    text = str(value)
    if text.startswith(("http://", "https://")):
        with urllib.request.urlopen(text, timeout=60) as r:  # noqa: S310 - the user's own URL
            data = r.read()
        return rgb(Image.open(io.BytesIO(data)))
    if text.startswith("data:image"):
        return rgb(Image.open(io.BytesIO(base64.b64decode(text.split("base64,", 1)[1]))))
    with Image.open(text.removeprefix("file://")) as im:
        return rgb(im)


def message_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """``(image items, video items)`` of a conversation's content parts, in order."""
    images, videos = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            continue
        for part in content or []:
            if part.get("type") == "image" or "image" in part or "image_url" in part:
                images.append(part)
            elif part.get("type") == "video" or "video" in part:
                videos.append(part)
    return images, videos


@dataclass
class Prepared:
    """A batch ready for ``generate``: processor outputs and, per row, its images as seen and their views."""

    inputs: Any
    seen: list[list[Image.Image]]
    views: list[list[ImageView]]


class Media:
    """Input building of one kind of processor (subclasses per family)."""

    model_types: ClassVar[tuple[str, ...]] = ()
    pixel_bounds: ClassVar[bool] = False  # images are resized within min_pixels / max_pixels (Qwen-VL)
    tiled: ClassVar[bool] = False  # images are cut into tiles, at most max_tiles (InternVL)

    def prepare(self, processor, conversations: list[list[dict[str, Any]]], *, image_patch_size: int = 14,
                padding_side: str = "left", max_tiles: int | None = None) -> Prepared:
        texts, images, videos, originals, counts = [], [], [], [], []
        for messages in conversations:
            texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
            items, vids = message_images(messages)
            loaded = [load_visual(item.get("image", item.get("image_url"))) for item in items]
            originals += loaded
            images += self.images(items, loaded, image_patch_size)
            videos += self.videos(vids, image_patch_size)
            counts.append(len(items))
        inputs = processor(text=texts, images=self.batch_images(images, counts) if images else None,
                           videos=videos or None, padding=True,
                           padding_side=padding_side, return_tensors="pt", **self.processor_kwargs(max_tiles))
        seen = self.seen(processor, originals, images, inputs, max_tiles)
        rows, row_views, first = [], [], 0
        for n in counts:
            rows.append([im for im, _ in seen[first:first + n]])
            row_views.append([v for _, v in seen[first:first + n]])
            first += n
        return Prepared(inputs, rows, row_views)

    def batch_images(self, images: list[Any], counts: list[int]) -> list[Any]:
        """The ``images`` argument of the processor for the batch's images (``counts`` per row): one flat list."""
        return images

    def images(self, items: list[dict[str, Any]], loaded: list[Image.Image], patch: int) -> list[Image.Image]:
        """What the processor gets for a conversation's image ``items`` (``loaded``: their original images)."""
        return loaded

    def videos(self, items: list[dict[str, Any]], patch: int) -> list[Any]:
        """What the processor gets for a conversation's video ``items``."""
        if items:
            raise ValueError(f"{self.model_types[0]} models take images only here, not videos")
        return []

    def processor_kwargs(self, max_tiles: int | None) -> dict[str, Any]:
        if max_tiles is not None:
            raise ValueError("max_tiles applies to tiled-image models (InternVL) only")
        return {}

    def seen(self, processor, originals: list[Image.Image], images: list[Image.Image], inputs,
             max_tiles: int | None = None) -> list[tuple[Image.Image, ImageView]]:
        """Per image, ``(seen image, view)``; by default the original itself."""
        return [(im, ImageView(im.size, im.size)) for im in originals]


class QwenMedia(Media):
    """Qwen-VL: qwen-vl-utils resizes (within each item's pixel bounds); seen = the resized image."""

    model_types = ("qwen2_5_vl", "qwen2_vl")
    pixel_bounds = True

    def images(self, items, loaded, patch):
        if not items:
            return []
        from qwen_vl_utils import process_vision_info

        # the loaded originals stand in for paths and URLs (each image is read once), with their pixel bounds
        parts = [{**item, "image": im} for item, im in zip(items, loaded)]
        for part in parts:
            part.pop("image_url", None)
        ims, _ = process_vision_info([{"role": "user", "content": parts}], image_patch_size=patch)
        return ims or []

    def videos(self, items, patch):
        if not items:
            return []
        from qwen_vl_utils import process_vision_info

        _, vids = process_vision_info([{"role": "user", "content": list(items)}], image_patch_size=patch)
        return vids or []

    def seen(self, processor, originals, images, inputs, max_tiles=None):
        grids = inputs.get("image_grid_thw")
        if images and grids is not None:  # the processor's own bounds may resize again: its patch grid decides
            patch = processor.image_processor.patch_size
            sizes = [(int(g[2]) * patch, int(g[1]) * patch) for g in grids]
            images = [im if im.size == size else im.resize(size) for im, size in zip(images, sizes)]
        return [(im, ImageView(o.size, im.size, (im.width / o.width, im.height / o.height)))
                for o, im in zip(originals, images)]


class Qwen3Media(QwenMedia):
    """Qwen3-VL: as Qwen-VL (qwen-vl-utils resizing with 16-pixel patches); videos go to the processor with their
    frame metadata (qwen-vl-utils' sampled frames), from which it writes each frame's timestamp."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def __init__(self):
        self._local = threading.local()  # the frame metadata of the videos of the batch being prepared

    def prepare(self, processor, conversations, **kwargs) -> Prepared:
        self._local.metadata = []
        return super().prepare(processor, conversations, **kwargs)

    def videos(self, items, patch):
        if not items:
            return []
        from qwen_vl_utils import process_vision_info

        _, vids, _ = process_vision_info([{"role": "user", "content": list(items)}], image_patch_size=patch,
                                         return_video_kwargs=True, return_video_metadata=True)
        frames, metadata = zip(*vids)
        self._local.metadata += list(metadata)
        return list(frames)

    def processor_kwargs(self, max_tiles):
        kwargs = super().processor_kwargs(max_tiles)
        metadata = getattr(self._local, "metadata", None)
        if metadata:  # frames already sampled by qwen-vl-utils; their metadata gives the timestamps
            kwargs.update(video_metadata=metadata, do_sample_frames=False)
        return kwargs


class LlavaMedia(Media):
    """LLaVA-1.5: the processor sizes the images; seen = the image as the tower sees it."""

    model_types = ("llava",)

    def seen(self, processor, originals, images, inputs, max_tiles=None):
        return [tower_view(processor.image_processor, im) for im in originals]


class InternVLMedia(Media):
    """InternVL: the processor tiles the images (``max_tiles`` -> its ``max_patches``); seen = the original."""

    model_types = ("internvl",)
    tiled = True

    def processor_kwargs(self, max_tiles):
        return {} if max_tiles is None else {"max_patches": int(max_tiles)}

    def seen(self, processor, originals, images, inputs, max_tiles=None):
        ip = processor.image_processor  # each image's grid: the processor's choice under its limits
        lo = getattr(ip, "min_patches", 1) or 1
        hi = max_tiles or getattr(ip, "max_patches", None) or InternVL.max_tiles
        tile = _size_of(ip.size, "height") or 448
        return [(im, ImageView(im.size, im.size, tiles=InternVL.tiling(im.size, lo, hi, tile_size=tile)))
                for im in originals]


class OnevisionMedia(Media):
    """LLaVA-OneVision: the processor takes the images as given (base view + tiles); seen = the original, which
    both views cover whole (see :class:`~ivcprune.tiles.AnyResLayout` in the report's span)."""

    model_types = ("llava_onevision",)

    def batch_images(self, images, counts):
        """One list per row with images: the processor tiles a row's image only when it is the row's only one (a
        multi-image prompt gets base views), as LLaVA-OneVision was trained."""
        rows, first = [], 0
        for n in counts:
            if n:
                rows.append(images[first : first + n])
            first += n
        return rows


class Gemma3Media(Media):
    """Gemma 3: the processor resizes images to the tower's square (pan-and-scan crops, when asked for, are
    extra images of their own); seen = the image as the tower sees it."""

    model_types = ("gemma3",)

    def batch_images(self, images, counts):
        """One list per conversation (Gemma3Processor matches them to each prompt's images)."""
        out, first = [], 0
        for n in counts:
            out.append(images[first:first + n])
            first += n
        return out

    def seen(self, processor, originals, images, inputs, max_tiles=None):
        return [tower_view(processor.image_processor, im) for im in originals]


def _size_of(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def tower_view(image_processor, image: Image.Image) -> tuple[Image.Image, ImageView]:
    """``(seen image, view)`` of an image as a CLIP-style processor (LLaVA's) prepares it: padded to a square
    with the mean colour (``do_pad``), resized (short side to ``size["shortest_edge"]``, or to ``height x
    width``), centre-cropped to ``crop_size`` (``do_center_crop``)."""
    W, H = image.size
    img, dx, dy = image, 0.0, 0.0
    if getattr(image_processor, "do_pad", False) and W != H:
        side = max(W, H)
        dx, dy = (side - W) // 2, (side - H) // 2
        mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        canvas = Image.new("RGB", (side, side), tuple(int(m * 255) for m in mean))
        canvas.paste(img, (int(dx), int(dy)))
        img = canvas
    sx = sy = 1.0
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", True) and size:
        w, h = img.size
        short = _size_of(size, "shortest_edge")
        if short:
            new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        else:
            new = (_size_of(size, "width"), _size_of(size, "height"))
        sx, sy = new[0] / w, new[1] / h
        img = img.resize(new, Image.BICUBIC)
    crop = getattr(image_processor, "crop_size", None)
    cx = cy = 0.0
    if getattr(image_processor, "do_center_crop", False) and crop:
        cw, ch = _size_of(crop, "width"), _size_of(crop, "height")
        cx, cy = round((img.width - cw) / 2), round((img.height - ch) / 2)
        img = img.crop((cx, cy, cx + cw, cy + ch))
    return img, ImageView((W, H), img.size, (sx, sy), (dx * sx - cx, dy * sy - cy))


MEDIA: dict[str, Media] = {t: m for m in (QwenMedia(), LlavaMedia(), InternVLMedia(), Gemma3Media())
                           for t in m.model_types}
MEDIA.update({t: Qwen3Media() for t in Qwen3Media.model_types})
MEDIA["llava_onevision"] = OnevisionMedia()
# processors whose family their class tells (callers that pass a processor alone)
PROCESSOR_TYPES = {"LlavaProcessor": "llava", "InternVLProcessor": "internvl", "Gemma3Processor": "gemma3"}
PROCESSOR_TYPES["Qwen3VLProcessor"] = "qwen3_vl"
PROCESSOR_TYPES["LlavaOnevisionProcessor"] = "llava_onevision"


def media_for(model_type: str | None = None, processor=None) -> Media:
    """The input building of ``model_type`` (or, when it is not given, of the family ``processor``'s class
    names); Qwen-VL's for anything else (the embedded model, Qwen-VL processors)."""
    if model_type is None and processor is not None:
        model_type = PROCESSOR_TYPES.get(type(processor).__name__)
    return MEDIA.get(model_type or "", MEDIA["qwen2_5_vl"])
