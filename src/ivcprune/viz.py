"""Pictures: kept visual tokens over the image, coloured by kind, and predicted / true boxes.

A span is drawn over the image as the model saw it: a (t, h, w) token grid over the whole image (Qwen-VL's
resized image, LLaVA's image as the tower sees it), or, for a tiled image (InternVL), each tile's tokens over
the part of the image the tile covers (tile borders drawn) and the thumbnail's tokens in a panel of their own.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from .report import SpanReport
from .tiles import AnyResLayout

KIND_COLORS = {
    "ivc_cos": (30, 110, 255),  # blue: IVC tokens near the identity rotation
    "ivc_sin": (0, 200, 220),  # cyan: IVC tokens near a 90 degree rotation
    "seed": (255, 200, 0),  # yellow: semantic seeds
    "foreground": (40, 200, 80),  # green: foreground fill
    "tile_foreground": (170, 230, 60),  # yellow-green: thumbnail foreground mapped onto the tiles
    "fill": (0, 130, 60),  # dark green: the budget's remainder (tile scheme)
    "random": (200, 120, 255),
    "structure": (255, 255, 255),  # white: structure tokens (newlines), always kept
}
KIND_NAMES = {"ivc_cos": "IVC cos", "ivc_sin": "IVC sin", "seed": "seed", "foreground": "foreground",
              "tile_foreground": "tile foreground", "fill": "fill", "random": "random"}
KIND_NAMES["structure"] = "newline"
PRUNED_SHADE = (20, 20, 20)
TILE_BORDER = (255, 255, 255)
DISPLAY_SIDE = 768  # tiled images (originals, any size) are drawn with this longest side at most
MIN_DISPLAY_SIDE = 224  # smaller images are drawn enlarged to this longest side

Region = tuple[float, float, float, float]


def _paint(layer: ImageDraw.ImageDraw, labels: list[str], rows: int, cols: int, region: Region, alpha: float) -> None:
    """Tint ``rows x cols`` cells (row-major ``labels``) evenly covering ``region`` of the layer."""
    x0, y0, x1, y1 = region
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    a = int(255 * alpha)
    for idx, kind in enumerate(labels[: rows * cols]):
        r, c = divmod(idx, cols)
        box = (round(x0 + c * cw), round(y0 + r * ch), round(x0 + (c + 1) * cw) - 1, round(y0 + (r + 1) * ch) - 1)
        if kind == "pruned":
            layer.rectangle(box, fill=(*PRUNED_SHADE, int(255 * 0.6)))
        else:
            color = KIND_COLORS.get(kind, (255, 255, 255))
            layer.rectangle(box, fill=(*color, a), outline=(*color, 255))


def _composite(image: Image.Image, draw) -> Image.Image:
    base = image.convert("RGB")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw(ImageDraw.Draw(layer))
    return Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")


def token_overlay(image: Image.Image, span: SpanReport, cell: float | None = None, alpha: float = 0.45) -> Image.Image:
    """``image`` (as the model saw it) with each visual token's square tinted by its kind; pruned tokens are
    darkened. The span's (t, h, w) grid (first frame of a video) covers the whole image, or ``cell``-pixel
    squares from its top-left corner when ``cell`` is given."""
    if span.grid is None:
        raise ValueError("the span has no (t, h, w) grid to draw")
    _, h, w = span.grid
    region = (0, 0, w * cell, h * cell) if cell else (0, 0, image.width, image.height)
    return _composite(image, lambda d: _paint(d, span.labels(), h, w, region, alpha))


def tile_overlays(image: Image.Image, span: SpanReport, grid: tuple[int, int] | None = None, alpha: float = 0.45
                  ) -> tuple[Image.Image, Image.Image | None]:
    """A tiled span (``span.tiles``) over the original ``image``: ``(tiles, thumbnail)``. Tile ``(r, c)`` of the
    ``rows x cols`` grid (``grid``, default the span's) covers the ``(r, c)`` cell of the image split evenly
    (the processor stretches the image onto the grid), its ``side x side`` tokens drawn inside it, tile borders
    in white; the thumbnail (the whole image at one tile's size) is drawn over the whole image in a second
    picture (``None`` for a single tile)."""
    layout = span.tiles
    if layout is None:
        raise ValueError("the span has no tile layout to draw")
    rows, cols = grid if grid is not None and grid[0] * grid[1] == layout.tiles else (layout.rows, layout.cols)
    labels, n, side = span.labels(), layout.tile_tokens, layout.side
    W, H = image.size

    def tiles(d: ImageDraw.ImageDraw) -> None:
        for k in range(rows * cols):
            r, c = divmod(k, cols)
            region = (c * W / cols, r * H / rows, (c + 1) * W / cols, (r + 1) * H / rows)
            _paint(d, labels[k * n:(k + 1) * n], side, side, region, alpha)
        for c in range(1, cols):
            d.line([(round(c * W / cols), 0), (round(c * W / cols), H)], fill=(*TILE_BORDER, 255), width=2)
        for r in range(1, rows):
            d.line([(0, round(r * H / rows)), (W, round(r * H / rows))], fill=(*TILE_BORDER, 255), width=2)

    thumb = None
    if layout.thumbnail:
        thumb_labels = labels[layout.thumbnail_start:]
        thumb = _composite(image, lambda d: _paint(d, thumb_labels, side, side, (0, 0, W, H), alpha))
    return _composite(image, tiles), thumb


def anyres_overlays(image: Image.Image, span: SpanReport, alpha: float = 0.45) -> tuple[Image.Image, Image.Image]:
    """An AnyRes span (``span.layout``, LLaVA-OneVision) over the original ``image``: ``(base view, mosaic)``,
    each view's token grid covering the whole image (the newlines, always kept, are not drawn)."""
    layout = span.layout
    labels = span.labels()
    s = layout.side
    region = (0, 0, image.width, image.height)
    base = _composite(image, lambda d: _paint(d, labels[: s * s], s, s, region, alpha))
    content = layout.content_index().tolist()
    mosaic = [labels[i] for i in content[s * s :]]
    return base, _composite(image, lambda d: _paint(d, mosaic, layout.rows, layout.cols, region, alpha))


def fit(image: Image.Image, longest: int = DISPLAY_SIDE) -> tuple[Image.Image, float]:
    """``image`` scaled down so that its longest side is at most ``longest``, and the scale."""
    scale = min(1.0, longest / max(image.size))
    if scale == 1.0:
        return image, 1.0
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale)))), scale


def span_panels(image: Image.Image, span: SpanReport, cell: float | None = None, *,
                tiles: tuple[int, int] | None = None) -> list[tuple[Image.Image, str]]:
    """``(picture, title)`` panels of one span over ``image``: the token grid, or a tiled image's tiles and
    thumbnail (``tiles``: the processor's ``(rows, cols)``, when known)."""
    if isinstance(span.layout, AnyResLayout) and span.layout.mosaic:
        base, mosaic = anyres_overlays(image, span)
        return [(base, f"base view {span.layout.side}x{span.layout.side}"),
                (mosaic, f"mosaic {span.layout.rows}x{span.layout.cols}")]
    if span.tiles is not None and (span.grid is None or span.tiles.thumbnail):
        tiled, thumb = tile_overlays(image, span, tiles)
        rows, cols = tiles if tiles and tiles[0] * tiles[1] == span.tiles.tiles else (span.tiles.rows, span.tiles.cols)
        panels = [(tiled, f"{rows}x{cols} tiles")]
        return panels + ([(thumb, "thumbnail")] if thumb is not None else [])
    return [(token_overlay(image, span, cell), "")]


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


def kinds_legend(width: int, kinds: list[str] | None = None) -> Image.Image:
    """The colours of ``kinds`` (default: IVC cos / sin, seed, foreground) and of pruned tokens."""
    kinds = kinds or ["ivc_cos", "ivc_sin", "seed", "foreground"]
    return legend(width, [(KIND_COLORS[k], KIND_NAMES[k]) for k in kinds if k in KIND_COLORS] +
                  [(PRUNED_SHADE, "pruned")])


def _span_kinds(span: SpanReport) -> list[str]:
    base = ["ivc_cos", "ivc_sin", "seed", "foreground"]
    return base + [k for k in KIND_COLORS if k not in base and span.positions(k).numel()]


def prediction_picture(seen: Image.Image, span: SpanReport, cell: float | None, boxes, captions: tuple[str, str], *,
                       tiles: tuple[int, int] | None = None) -> Image.Image:
    """Panels over the image as the model saw it: ``boxes`` (see :func:`draw_boxes`, in ``seen``'s pixels) on
    the left, then the span's visual tokens by kind (:func:`span_panels`: a tiled image's tiles and thumbnail),
    a legend below; ``captions`` title the first two. Tiled images (originals) are drawn at most
    :data:`DISPLAY_SIDE` pixels wide or high."""
    scale = 1.0
    if (span.tiles is not None or span.layout is not None) and span.grid is None:
        seen, scale = fit(seen)
    elif max(seen.size) < MIN_DISPLAY_SIDE:  # small towers (tiny test models): big enough to read
        scale = MIN_DISPLAY_SIDE / max(seen.size)
        seen = seen.resize((round(seen.width * scale), round(seen.height * scale)), Image.NEAREST)
    if scale != 1.0:
        boxes = [(None if b is None else tuple(v * scale for v in b), color, label) for b, color, label in boxes]
        cell = cell * scale if cell else None
    left = draw_boxes(seen, boxes)
    panels = span_panels(seen, span, cell, tiles=tiles)
    images = [left] + [p for p, _ in panels]
    titles = [captions[0], captions[1] + (f" ({panels[0][1]})" if panels[0][1] else "")] + [t for _, t in panels[1:]]
    width = sum(im.width for im in images) + 8 * (len(images) + 1)
    return panel(images, titles, footer=kinds_legend(width, _span_kinds(span)))


def report_pictures(report, seen: list[Image.Image], views: list | None = None, title: str = "") -> list[Image.Image]:
    """One picture per image span of a pruning report (``seen``: the images as the model saw them, in prompt
    order; ``views``: their :class:`ivcprune.media.ImageView`): the image titled ``title``, beside its kept
    visual tokens by kind (a tiled image's tiles and thumbnail)."""
    pictures = []
    spans = [s for s in report.spans if s.kind == "image"]
    for i, (span, image) in enumerate(zip(spans, seen)):
        if span.grid is None and span.tiles is None and span.layout is None:
            continue
        view = views[i] if views and i < len(views) else None
        width = max(20, min(image.width, DISPLAY_SIDE) // 6 - 4)  # the default font is about 6 px a character
        caption = title if len(title) <= width else title[: width - 3] + "..."
        pictures.append(prediction_picture(
            image, span, None, [], (caption, f"kept {span.kept}/{span.length} visual tokens at layer {report.layer}"),
            tiles=getattr(view, "tiles", None)))
    return pictures
