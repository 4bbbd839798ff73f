"""The images TDM Distill Status shows: the two losses' curve and the job's latest preview, as ComfyUI IMAGEs."""

from __future__ import annotations

import math

import torch

# The two losses' colours, on a dark background: the same in this image (TDM Distill Status) and in the jobs panel's
# curve (web/tdm_jobs.js, LOSS_COLOURS; a test holds the two together).
LOSS_COLOURS = {"fake score": "#e8a33d", "generator": "#5fa8e8"}
_CURVE_BACKGROUND, _CURVE_FRAME, _CURVE_TEXT = (32, 32, 32), (80, 80, 80), (210, 210, 210)


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def loss_curve_image(history: list, width: int = 512, height: int = 256) -> torch.Tensor:
    """The two TDM losses over the steps (fake score above, generator below), as a ComfyUI IMAGE [1, H, W, 3]."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), _CURVE_BACKGROUND)
    draw = ImageDraw.Draw(image)
    panels = [(label, column, _rgb(LOSS_COLOURS[label])) for label, column in (("fake score", 1), ("generator", 2))]
    panel_h = height // 2
    for row, (label, column, colour) in enumerate(panels):
        top = row * panel_h
        draw.rectangle([0, top, width - 1, top + panel_h - 1], outline=_CURVE_FRAME)
        points = [(p[0], p[column]) for p in history if math.isfinite(p[column])]
        if not points:
            draw.text((6, top + 4), f"{label} loss: no steps yet", fill=_CURVE_TEXT)
            continue
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        lo, hi = min(values), max(values)
        span_s = max(1, steps[-1] - steps[0])
        span_v = (hi - lo) or 1.0
        xy = [(4 + (s - steps[0]) / span_s * (width - 8), top + panel_h - 6 - (v - lo) / span_v * (panel_h - 24))
              for s, v in points]
        if len(xy) == 1:
            draw.ellipse([xy[0][0] - 2, xy[0][1] - 2, xy[0][0] + 2, xy[0][1] + 2], fill=colour)
        else:
            draw.line(xy, fill=colour, width=2)
        draw.text((6, top + 4), f"{label} loss {values[-1]:.4g} (min {lo:.4g}, max {hi:.4g}) step {steps[-1]}",
                  fill=colour)
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def preview_image(array) -> torch.Tensor:
    if array is None:
        return torch.full((1, 64, 64, 3), 0.5)
    return torch.from_numpy(array.astype("float32") / 255.0)[None]
