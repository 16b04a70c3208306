"""The no-image localisation prior: how well the mean box of a class localises that class's boxes.

For every box of a class, the mean of the OTHER boxes of that class (leave-one-out) is taken as the prediction
and its IoU with the box is measured. A localiser is only worth what it adds over this number, class by class
(on NIH's BBox_List_2017 the class mean is ~0.12, Cardiomegaly ~0.64, Nodule ~0.0).

Works on any file in NIH's BBox_List layout (the real list, or the phantom's): header row first (NIH's is the
malformed ``Image Index,Finding Label,Bbox [x,y,w,h],,,``), then rows ``name,label,x,y,w,h`` with x, y the
TOP-LEFT corner and w, h the size, in the pixels of the image file; trailing empty fields are ignored.
All boxes of one class are assumed to be in the pixels of images of one size (true of both files), so the
mean box is meaningful. Command line: ``python -m custom.data.box_prior PATH [--thresholds=...]``.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass

import numpy as np

from custom.localisation.iou import box_iou

from custom.labels import BOX_CLASS_NAMES, CLASS_NAMES, LABEL_ALIASES

HIT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def read_bbox_list(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a BBox_List file (``.csv`` or ``.csv.gz``) into boxes per class.

    Args:
        path: file in NIH's BBox_List layout (see the module docstring).

    Returns:
        ``{class name: float64 array [N, 4]}``, boxes as xyxy ``[x0, y0, x1, y1]`` (x1 = x + w) in the pixels
        of the image file, in file order; class names as in ``custom.labels.CLASS_NAMES`` ('Infiltrate' is
        read as 'Infiltration'). Only classes present in the file appear.

    Raises:
        ValueError: naming the file and line, for a short row, an unknown label, a non-numeric or non-finite
            coordinate, or a non-positive width or height.
    """
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        text = handle.read().decode("utf-8-sig")
    boxes: dict[str, list[list[float]]] = {}
    rows = csv.reader(io.StringIO(text))
    next(rows, None)  # NIH's header is malformed (the box columns are split over 4 names), so it is skipped.
    for line_number, row in enumerate(rows, start=2):
        fields = [field.strip() for field in row]
        while fields and not fields[-1]:
            fields.pop()
        if not fields:
            continue
        if len(fields) < 6:
            raise ValueError(f"{path}:{line_number}: expected 'name,label,x,y,w,h', got {row!r}")
        label = LABEL_ALIASES.get(fields[1], fields[1])
        if label not in CLASS_NAMES:
            raise ValueError(f"{path}:{line_number}: unknown finding label {fields[1]!r}")
        try:
            x, y, w, h = (float(value) for value in fields[2:6])
        except ValueError:
            raise ValueError(f"{path}:{line_number}: non-numeric box {fields[2:6]!r}") from None
        if not np.all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
            raise ValueError(f"{path}:{line_number}: invalid box x={x}, y={y}, w={w}, h={h}")
        boxes.setdefault(label, []).append([x, y, x + w, y + h])
    return {label: np.asarray(values, dtype=np.float64) for label, values in boxes.items()}


def leave_one_out_ious(boxes: np.ndarray) -> np.ndarray:
    """IoU of each box with the mean of the other boxes (the no-image prediction for it).

    Args:
        boxes: float array [N, 4], N >= 2, xyxy boxes of one class in one pixel space.

    Returns:
        float array [N]: IoU of ``boxes[i]`` with the coordinate-wise mean of ``boxes[j], j != i``.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {boxes.shape}")
    if len(boxes) < 2:
        raise ValueError(f"leave-one-out needs at least 2 boxes, got {len(boxes)}")
    # The mean of xyxy corners equals the box of mean centre and mean size, so either convention gives this.
    others_mean = (boxes.sum(axis=0, keepdims=True) - boxes) / (len(boxes) - 1)
    return box_iou(boxes, others_mean).numpy()


@dataclass(frozen=True)
class PriorScore:
    """Leave-one-out mean-box score of one class.

    Attributes:
        num_boxes: boxes of the class.
        mean_iou: mean leave-one-out IoU.
        hit_rates: ``{kappa: fraction of boxes with IoU >= kappa}`` (NIH's T(IoU >= kappa)).
    """

    num_boxes: int
    mean_iou: float
    hit_rates: dict[float, float]


def leave_one_out_prior(
    boxes_by_class: dict[str, np.ndarray], thresholds: tuple[float, ...] = HIT_THRESHOLDS
) -> dict[str, PriorScore]:
    """Score the no-image prior of every class with at least 2 boxes.

    Args:
        boxes_by_class: ``{class name: float array [N, 4]}``, xyxy (as from ``read_bbox_list``).
        thresholds: IoU levels kappa for the hit rates.

    Returns:
        ``{class name: PriorScore}`` in ``BOX_CLASS_NAMES`` order, then any other class alphabetically.
    """
    order = [name for name in BOX_CLASS_NAMES if name in boxes_by_class]
    order += sorted(set(boxes_by_class) - set(order))
    scores = {}
    for name in order:
        boxes = np.asarray(boxes_by_class[name], dtype=np.float64).reshape(-1, 4)
        if len(boxes) < 2:
            continue
        ious = leave_one_out_ious(boxes)
        hits = {float(kappa): float(np.mean(ious >= kappa)) for kappa in thresholds}
        scores[name] = PriorScore(num_boxes=len(boxes), mean_iou=float(ious.mean()), hit_rates=hits)
    return scores


def overall(scores: dict[str, PriorScore]) -> dict[str, float]:
    """Summaries over classes.

    Args:
        scores: as from ``leave_one_out_prior``.

    Returns:
        ``{"class_mean_iou", "box_mean_iou"}`` (the mean over classes, as papers report it, and the mean over
        all boxes), plus ``"class_mean_t<kappa>"`` for each threshold: the class mean of the hit rates.
    """
    if not scores:
        raise ValueError("no class has 2 or more boxes")
    counts = np.array([score.num_boxes for score in scores.values()], dtype=np.float64)
    means = np.array([score.mean_iou for score in scores.values()])
    summary = {
        "class_mean_iou": float(means.mean()),
        "box_mean_iou": float((means * counts).sum() / counts.sum()),
    }
    for kappa in next(iter(scores.values())).hit_rates:
        summary[f"class_mean_t{kappa:g}"] = float(
            np.mean([score.hit_rates[kappa] for score in scores.values()])
        )
    return summary


def format_table(scores: dict[str, PriorScore]) -> str:
    """Render scores as a Markdown table (one row per class, then the class mean)."""
    thresholds = list(next(iter(scores.values())).hit_rates)
    header = "| class | boxes | LOO mean IoU | " + " | ".join(f"T({kappa:g})" for kappa in thresholds) + " |"
    lines = [header, "|" + "---|" * (3 + len(thresholds))]
    for name, score in scores.items():
        hits = " | ".join(f"{score.hit_rates[kappa]:.3f}" for kappa in thresholds)
        lines.append(f"| {name} | {score.num_boxes} | {score.mean_iou:.3f} | {hits} |")
    summary = overall(scores)
    hits = " | ".join(f"{summary[f'class_mean_t{kappa:g}']:.3f}" for kappa in thresholds)
    total = sum(score.num_boxes for score in scores.values())
    lines.append(f"| class mean | {total} | {summary['class_mean_iou']:.3f} | {hits} |")
    return "\n".join(lines)


def main(path: str, thresholds: tuple[float, ...] = HIT_THRESHOLDS) -> None:
    """Print the leave-one-out prior table of a BBox_List file (``.csv`` or ``.csv.gz``)."""
    scores = leave_one_out_prior(read_bbox_list(path), tuple(float(kappa) for kappa in thresholds))
    print(format_table(scores))
    print(f"box mean IoU: {overall(scores)['box_mean_iou']:.3f}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
