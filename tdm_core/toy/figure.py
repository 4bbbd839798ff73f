"""The demo's figure, drawn with Pillow only: sample grids side by side and the metric over iterations.

Text is ASCII: Pillow's built-in font has no glyphs beyond Latin-1 punctuation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data import DIGITS_SIDE, digits_to_uint8

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
GRID_LINE = (225, 225, 225)
SERIES_COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def digits_grid(samples: torch.Tensor, labels: torch.Tensor, rows: int, classes: int = 10, scale: int = 4,
                gap: int = 3) -> Image.Image:
    """`rows` samples of each class as columns 0..classes−1 (the first `rows` of each class in `samples`)."""
    tiles = digits_to_uint8(samples.detach().cpu().float()).numpy()
    cell = DIGITS_SIDE * scale + gap
    canvas = np.full((rows * cell + gap, classes * cell + gap), 255, dtype=np.uint8)
    for c in range(classes):
        idx = (labels == c).nonzero().flatten()[:rows].tolist()
        for r, i in enumerate(idx):
            tile = np.kron(tiles[i], np.ones((scale, scale), dtype=np.uint8))
            y, x = gap + r * cell, gap + c * cell
            canvas[y : y + DIGITS_SIDE * scale, x : x + DIGITS_SIDE * scale] = tile
    return Image.fromarray(canvas).convert("RGB")


def line_plot(series: dict[str, tuple[list[float], list[float]]], hlines: dict[str, float], title: str,
              xlabel: str, ylabel: str, size: tuple[int, int] = (560, 360)) -> Image.Image:
    """A small line chart: `series` name -> (xs, ys) drawn as lines with markers; `hlines` name -> dashed level."""
    w, h = size
    img = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font, small = _font(14), _font(11)
    left, right, top, bottom = 62, 16, 34, 46
    xs_all = [x for xs, _ in series.values() for x in xs] or [0.0, 1.0]
    ys_all = [y for _, ys in series.values() for y in ys] + list(hlines.values()) or [0.0, 1.0]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = 0.0, max(ys_all) * 1.08 if ys_all else 1.0
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    for k in range(6):
        yv = y0 + (y1 - y0) * k / 5
        _, yp = px(x0, yv)
        draw.line([(left, yp), (w - right, yp)], fill=GRID_LINE)
        draw.text((left - 6, yp), f"{yv:.3g}", fill=INK, font=small, anchor="rm")
    for k in range(6):
        xv = x0 + (x1 - x0) * k / 5
        xp, _ = px(xv, y0)
        draw.text((xp, h - bottom + 6), f"{xv:.0f}", fill=INK, font=small, anchor="mt")
    draw.rectangle([left, top, w - right, h - bottom], outline=INK)
    draw.text((w / 2, 8), title, fill=INK, font=font, anchor="mt")
    draw.text((w / 2, h - 16), xlabel, fill=INK, font=small, anchor="mt")
    draw.text((6, top - 18), ylabel, fill=INK, font=small)
    legend_y = top + 6
    for i, (name, level) in enumerate(hlines.items()):
        colour = SERIES_COLOURS[(i + 1) % len(SERIES_COLOURS)]
        _, yp = px(x0, level)
        for xs in range(left, w - right, 10):
            draw.line([(xs, yp), (min(xs + 5, w - right), yp)], fill=colour, width=2)
        draw.text((w - right - 6, legend_y), f"- - {name} ({level:.3g})", fill=colour, font=small, anchor="ra")
        legend_y += 15
    for name, (xs, ys) in series.items():
        colour = SERIES_COLOURS[0]
        points = [px(x, y) for x, y in zip(xs, ys, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for p in points:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        draw.text((w - right - 6, legend_y), f"-o- {name}", fill=colour, font=small, anchor="ra")
        legend_y += 15
    return img


def demo_figure(panels: list[tuple[str, Image.Image]], plot: Image.Image, caption: str) -> Image.Image:
    """Sample panels in a row (each titled) above the metric plot, with a one-line caption."""
    font, small = _font(14), _font(11)
    pad, title_h = 12, 22
    panels_w = sum(p.width for _, p in panels) + pad * (len(panels) + 1)
    panels_h = max(p.height for _, p in panels) + title_h + pad
    width = max(panels_w, plot.width + 2 * pad)
    height = panels_h + plot.height + 2 * pad + 20
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    x = pad + (width - panels_w) // 2
    for title, panel in panels:
        draw.text((x + panel.width / 2, pad), title, fill=INK, font=font, anchor="mt")
        img.paste(panel, (x, pad + title_h))
        x += panel.width + pad
    img.paste(plot, ((width - plot.width) // 2, panels_h + pad))
    draw.text((width / 2, height - 16), caption, fill=INK, font=small, anchor="mt")
    return img
