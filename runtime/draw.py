"""Boxes, names and scores drawn on a copy of an image (Pillow only)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from core import labels


def label_color(label: int) -> tuple[int, int, int]:
    """A saturated colour per label, spread around the hue circle so neighbouring ids differ."""
    hue = (int(label) * 0.618033988749895) % 1.0  # golden-ratio steps
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_detections(image: Image.Image, detections: dict[str, np.ndarray], names: dict[int, str]) -> Image.Image:
    """An RGB copy of `image` with each detection's box and "name score" label (``names``: core.labels)."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(max(canvas.size) / 400))
    for score, label, box in zip(detections["scores"], detections["labels"], detections["boxes"]):
        color = label_color(label)
        x0, y0, x1, y1 = (float(v) for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        text = f"{labels.label_name(names, label)} {score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        lift = bottom - top + 2
        ty = y0 - lift if y0 - lift >= 0 else y0  # above the box unless that leaves the image
        draw.rectangle((x0, ty, x0 + right - left + 4, ty + lift), fill=color)
        draw.text((x0 + 2, ty + 1), text, fill=(0, 0, 0), font=font)
    return canvas
