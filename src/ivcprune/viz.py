"""Pictures: kept visual tokens over the image, coloured by kind, and predicted / true boxes."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .report import SpanReport

KIND_COLORS = {
    "ivc_cos": (30, 110, 255),  # blue: IVC tokens near the identity rotation
    "ivc_sin": (0, 200, 220),  # cyan: IVC tokens near a 90 degree rotation
    "seed": (255, 200, 0),  # yellow: semantic seeds
    "foreground": (40, 200, 80),  # green: foreground fill
    "random": (200, 120, 255),
}
PRUNED_SHADE = (20, 20, 20)


def token_overlay(image: Image.Image, span: SpanReport, cell: int, alpha: float = 0.45) -> Image.Image:
    """``image`` (as the model saw it) with each visual token's ``cell``-pixel square tinted by its kind;
    pruned tokens are darkened."""
    if span.grid is None:
        raise ValueError("the span has no (t, h, w) grid to draw")
    t, h, w = span.grid
    base = image.convert("RGB").copy()
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    labels = span.labels()[: h * w]  # first frame for videos
    a = int(255 * alpha)
    for idx, kind in enumerate(labels):
        r, c = divmod(idx, w)
        box = (c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1)
        if kind == "pruned":
            d.rectangle(box, fill=(*PRUNED_SHADE, int(255 * 0.6)))
        else:
            color = KIND_COLORS.get(kind, (255, 255, 255))
            d.rectangle(box, fill=(*color, a), outline=(*color, 255))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


LabelledBox = tuple[tuple[float, float, float, float] | None, tuple[int, int, int], str]  # box, colour, label


def draw_boxes(image: Image.Image, boxes: list[LabelledBox],
               width: int = 3) -> Image.Image:
    """Outline ``(box, colour, label)`` triples (boxes in the image's pixels; ``None`` is skipped)."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    for box, color, label in boxes:
        if box is None:
            continue
        d.rectangle(tuple(box), outline=color, width=width)
        if label:
            d.text((box[0] + 3, max(0, box[1] - 12)), label, fill=color)
    return out


def legend(width: int, items: list[tuple[tuple[int, int, int], str]], height: int = 22) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    x = 6
    for color, text in items:
        d.rectangle((x, 5, x + 12, 17), fill=color)
        d.text((x + 16, 6), text, fill=(0, 0, 0))
        x += 22 + 7 * len(text)
    return img


def panel(images: list[Image.Image], titles: list[str], footer: Image.Image | None = None) -> Image.Image:
    """Images side by side with a title above each (and an optional footer strip)."""
    pad, title_h = 8, 18
    w = sum(im.width for im in images) + pad * (len(images) + 1)
    h = max(im.height for im in images) + title_h + 2 * pad + (footer.height if footer else 0)
    out = Image.new("RGB", (max(w, footer.width if footer else 0), h), (255, 255, 255))
    d = ImageDraw.Draw(out)
    x = pad
    for im, title in zip(images, titles):
        d.text((x, pad), title, fill=(0, 0, 0))
        out.paste(im, (x, pad + title_h))
        x += im.width + pad
    if footer:
        out.paste(footer, (0, h - footer.height))
    return out


def kinds_legend(width: int) -> Image.Image:
    return legend(width, [(KIND_COLORS["ivc_cos"], "IVC cos"), (KIND_COLORS["ivc_sin"], "IVC sin"),
                          (KIND_COLORS["seed"], "seed"), (KIND_COLORS["foreground"], "foreground"),
                          (PRUNED_SHADE, "pruned")])


def prediction_picture(seen: Image.Image, span: SpanReport, cell: int, boxes, captions: tuple[str, str]) -> Image.Image:
    """Two panels over the image as the model saw it: ``boxes`` (see :func:`draw_boxes`) on the left,
    the span's visual tokens by kind on the right, a legend below; ``captions`` title the two."""
    left = draw_boxes(seen, boxes)
    right = token_overlay(seen, span, cell)
    return panel([left, right], list(captions), footer=kinds_legend(left.width + right.width + 24))
