"""Pictures of the results: a map as a heatmap over the radiograph, boxes and their labels (paper Fig. 3).

Colours as the paper: prediction YELLOW, ground truth GREEN. Drawn with Pillow and numpy only (no matplotlib,
so the MONAI Label app's environment can draw them too). Boxes are given in ORIGINAL image pixels (float xyxy)
and scaled to the picture; a map covers the whole image, so resizing it to the picture keeps the geometry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from custom.transforms.grey_image import read_grey_image

PREDICTION_COLOUR = (255, 230, 0)  # yellow
TRUTH_COLOUR = (0, 220, 0)  # green
TEXT_BACKGROUND = (0, 0, 0)
# The "jet" colour ramp at five stops (blue, cyan, green-yellow, orange, red), linearly interpolated.
_JET_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_JET_COLOURS = np.array([[0, 0, 143], [0, 160, 255], [120, 255, 120], [255, 160, 0], [143, 0, 0]], float)


@dataclass
class BoxMark:
    """A box to draw: float xyxy in ORIGINAL image pixels, its RGB colour, a label (may be empty), and
    whether the label prefers the space below the box (e.g. the truth's, when a prediction's goes above)."""

    box: Sequence[float]
    colour: tuple[int, int, int]
    label: str = ""
    label_below: bool = False


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> uint8 RGB (shape + (3,)) on a jet-like ramp."""
    values = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0, 1)
    channels = [np.interp(values, _JET_STOPS, _JET_COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def load_display_image(
    path: str | os.PathLike, max_side: int = 512, min_side: int = 256
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read a radiograph for display: grey float32 (h', w') in [0, 1], its longest side brought within
    [``min_side``, ``max_side``] (small images are enlarged so labels stay legible), aspect kept.

    Returns:
        (grey, original_size (H, W) of the file). Raises ImageLoadError as ``read_grey_image``.
    """
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    grey = read_grey_image(path, downscale_to=max_side)
    array = grey.array
    height, width = array.shape
    longest = max(height, width)
    if not min_side <= longest <= max_side:
        scale = min(max(longest, min_side), max_side) / longest
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
        array = _resize_float(array, size, resample)
    return np.clip(array, 0, 1), grey.original_size


def _resize_float(array: np.ndarray, size: tuple[int, int], resample) -> np.ndarray:
    """Resize a float (h, w) array to ``size`` = (width, height) with Pillow's float mode."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
    return np.asarray(image.resize(tuple(int(v) for v in size), resample))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font
        return ImageFont.load_default()


def heatmap_panel(grey: np.ndarray, heatmap: np.ndarray | None = None, alpha: float = 0.45) -> Image.Image:
    """The radiograph in grey with an optional map laid over it.

    Args:
        grey: (h', w') float in [0, 1], the picture's pixels.
        heatmap: optional (h, w) map covering the whole image, min-max scaled here to [0, 1] (a constant map
            shows as the ramp's bottom); resized to (h', w') bilinearly.
        alpha: the heatmap's weight where the map is at its maximum; it fades to alpha/3 at the minimum, so
            the anatomy stays visible where the map is low.

    Returns:
        An RGB image of (w', h') pixels.
    """
    base = np.repeat((np.clip(grey, 0, 1) * 255)[..., None], 3, axis=-1)
    if heatmap is not None:
        heat = np.asarray(heatmap, dtype=np.float32)
        low, high = float(heat.min()), float(heat.max())
        heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
        heat = _resize_float(heat, grey.shape[::-1], Image.Resampling.BILINEAR)
        heat = np.clip(heat, 0, 1)
        weight = (alpha * (1 + 2 * heat) / 3)[..., None]
        base = (1 - weight) * base + weight * jet(heat)
    return Image.fromarray(base.round().astype(np.uint8))


def draw_marks(
    panel: Image.Image, marks: Sequence[BoxMark], original_size: Sequence[int], title: str = ""
) -> Image.Image:
    """Draw boxes (original pixels, scaled to the panel) with their labels, and a title at the top left.

    A label goes above its box (below first for ``label_below``), else on the other side, else inside the
    box's top edge; it is kept within the panel.
    Returns the same image, drawn on.
    """
    draw = ImageDraw.Draw(panel)
    width, height = panel.size
    scale_x, scale_y = width / original_size[1], height / original_size[0]
    line = max(2, round(min(width, height) / 170))
    font = _font(max(11, round(min(width, height) / 30)))
    title_bottom = _text(draw, (line, line), title, (255, 255, 255), font)[3] if title else 0
    for mark in marks:
        if mark.box is None or not np.all(np.isfinite(mark.box)):
            continue
        x0, y0, x1, y1 = (float(v) for v in mark.box)
        # Pillow's rectangle includes its last pixel: x1 - 1 keeps the right edge on the box's last column.
        left, top = x0 * scale_x, y0 * scale_y
        rect = [left, top, max(left, x1 * scale_x - 1), max(top, y1 * scale_y - 1)]
        draw.rectangle(rect, outline=mark.colour, width=line)
        if mark.label:
            text_w, text_h = _text_size(draw, mark.label, font)
            above, below = rect[1] - text_h - 2 * line, rect[3] + line
            fits_above, fits_below = above >= title_bottom, below + text_h + line <= height
            if fits_below and (mark.label_below or not fits_above):
                y = below
            elif fits_above:
                y = above
            else:
                y = max(rect[1] + line, title_bottom + line)
            x = min(max(rect[0] + line, 0), max(0, width - text_w - 2))
            _text(draw, (x, y), mark.label, mark.colour, font)
    return panel


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _text(draw: ImageDraw.ImageDraw, xy, text: str, colour, font) -> tuple[int, int, int, int]:
    """Text on a dark box, legible over any part of the image; returns that box (left, top, right, bottom)."""
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=TEXT_BACKGROUND)
    draw.text(xy, text, fill=colour, font=font)
    return left - 2, top - 1, right + 2, bottom + 1


def tile(panels: Sequence[Image.Image], columns: int = 4, gap: int = 4) -> Image.Image:
    """Panels of one size side by side, ``columns`` a row, on a black background."""
    if not panels:
        raise ValueError("no panels to tile")
    width, height = panels[0].size
    columns = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap))
    for index, panel in enumerate(panels):
        row, column = divmod(index, columns)
        sheet.paste(panel.resize((width, height)), (column * (width + gap), row * (height + gap)))
    return sheet


def findings_overlay(
    grey: np.ndarray,
    original_size: Sequence[int],
    findings: Sequence[dict],
    maps: dict[int, np.ndarray],
    fallback: tuple[str, float, np.ndarray] | None = None,
    max_panels: int = 4,
) -> Image.Image:
    """The inference picture of one image: one panel per finding (its class's map, its box in yellow).

    Args:
        grey: (h', w') display image in [0, 1] (``load_display_image``); original_size: (H, W).
        findings: the ``findings`` of the image's JSON (``custom.inference.findings.findings_document``).
        maps: {finding position: (h, w) map of that finding's class}.
        fallback: (class, probability, map) drawn when there is no finding: the most probable class.
        max_panels: at most this many findings are drawn (the most probable first).

    Returns:
        RGB image.
    """
    order = sorted(range(len(findings)), key=lambda i: -findings[i]["probability"])[:max_panels]
    panels = []
    for i in order:
        finding = findings[i]
        label = f"{finding['class']} p={finding['probability']:.2f} score={finding['score']:.3g}"
        panel = heatmap_panel(grey, maps.get(i))
        panels.append(
            draw_marks(
                panel,
                [BoxMark(finding["box"], PREDICTION_COLOUR, label)],
                original_size,
                title=f"map: {finding['map']}",
            )
        )
    if not panels:
        name, probability, heatmap = fallback if fallback is not None else ("", float("nan"), None)
        title = "no positive finding" + (f" (top: {name} p={probability:.2f})" if name else "")
        panels.append(draw_marks(heatmap_panel(grey, heatmap), [], original_size, title=title))
    return tile(panels, columns=len(panels))
