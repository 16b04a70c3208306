"""Figures of the evaluation report: ROC curves, T(IoU) curves (matplotlib, Agg) and Fig. 3-style overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from custom.localisation.box_rule import BoxRule, box_scores
from custom.evaluation.outputs import MAP_NAMES, EvaluationOutputs
from custom.inference.inputs import safe_stem
from custom.inference.overlays import (
    PREDICTION_COLOUR,
    TRUTH_COLOUR,
    BoxMark,
    draw_marks,
    heatmap_panel,
    load_display_image,
    tile,
)
from custom.evaluation.scoring import EvaluationResult
from custom.metrics import patient_folds

_METHOD_STYLE = {
    "sal": ("Sal", "tab:blue"),
    "det": ("Det", "tab:orange"),
    "mix": ("Mix", "tab:green"),
    "prior": ("prior (LOO)", "grey"),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve of one class: (FPR, TPR) at every distinct score, from (0, 0) to (1, 1).

    Args:
        scores: (N,) scores; labels: (N,) 0/1.
    """
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], labels[order]
    last = np.r_[ranked[1:] != ranked[:-1], True]  # the end of each run of tied scores
    positives, negatives = hits.sum(), len(hits) - hits.sum()
    tpr = np.r_[0, np.cumsum(hits)[last] / max(positives, 1)]
    fpr = np.r_[0, np.cumsum(1 - hits)[last] / max(negatives, 1)]
    return fpr, tpr


def roc_curves(outputs: EvaluationOutputs, result: EvaluationResult, path: str | Path) -> Path:
    """One panel per class: ROC of the image logits and of the combined logits, AUC in the legend."""
    plt = _pyplot()
    names = outputs.class_names
    columns = 4
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows), squeeze=False)
    for k, axis in enumerate(axes.flat):
        if k >= len(names):
            axis.axis("off")
            continue
        labels = outputs.test_labels[:, k]
        for logits, style in (("image", "-"), ("combined", "--")):
            auc = result.auc[logits]["per_class"][k]
            if np.isnan(auc):
                continue
            fpr, tpr = roc_points(getattr(outputs, f"test_{logits}_logits")[:, k], labels)
            axis.plot(fpr, tpr, style, label=f"{logits} {auc:.3f}")
        axis.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        axis.set_title(names[k], fontsize=10)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.legend(loc="lower right", fontsize=8, title="AUC", title_fontsize=8)
        axis.tick_params(labelsize=7)
    figure.supxlabel("false positive rate")
    figure.supylabel("true positive rate")
    figure.suptitle(f"Test ROC per class ({len(outputs.test_labels)} images)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path)


def t_iou_curves(outputs: EvaluationOutputs, result: EvaluationResult, path: str | Path) -> Path:
    """T(IoU >= kappa) against kappa, one panel per box class and the mean: each map and the prior, solid
    for the held-out protocol and dashed for the paper's."""
    plt = _pyplot()
    panels = [*outputs.box_class_names, "mean"]
    columns = 3
    rows = -(-len(panels) // columns)
    kappas = result.settings["kappas"]
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.0 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        if index >= len(panels):
            axis.axis("off")
            continue
        panel = panels[index]
        for method, (label, colour) in _METHOD_STYLE.items():
            for protocol, style in (("two_fold", "-"), ("all_images", "--")):
                if method == "prior" and protocol == "all_images":
                    continue  # threshold-free: one curve
                t_iou = result.localisation(protocol, method)["t_iou"]
                values = [t_iou[f"{kappa:g}"].get(panel, np.nan) for kappa in kappas]
                name = (
                    label
                    if method == "prior"
                    else f"{label} ({'held-out' if protocol == 'two_fold' else 'paper'})"
                )
                axis.plot(kappas, values, style, color=colour, marker=".", label=name)
        axis.set_title(panel, fontsize=10)
        axis.set_ylim(-0.03, 1.03)  # lines at 0 and 1 stay visible
        axis.tick_params(labelsize=7)
        if index == 0:
            axis.legend(fontsize=6)
    figure.supxlabel("IoU threshold kappa")
    figure.supylabel("T(IoU >= kappa)")
    figure.suptitle("Localisation accuracy: held-out (solid) and paper (dashed) protocols")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return Path(path)


def _pick_boxes(outputs: EvaluationOutputs, count: int) -> list[int]:
    """Up to ``count`` boxes, spread over the classes: the first box of each class, then the second, ..."""
    per_class = [list(np.flatnonzero(outputs.gt_class == c)) for c in range(len(outputs.box_class_names))]
    chosen = []
    while len(chosen) < count and any(per_class):
        for boxes in per_class:
            if boxes and len(chosen) < count:
                chosen.append(int(boxes.pop(0)))
    return chosen


def evaluation_overlays(
    outputs: EvaluationOutputs,
    result: EvaluationResult,
    folder: str | Path,
    count: int = 8,
    map_name: str = "mix",
) -> Path | None:
    """Fig. 3-style pictures: the map of the box's class over the image, the predicted box in yellow (under
    the HELD-OUT thresholds applied to that box), the ground truth in green, class, score and IoU.

    Writes ``<folder>/overlays/<image>_<class>.png`` per box and ``<folder>/fig3_overlays.png`` (all tiled);
    returns the latter (None when no box was drawn).
    """
    if map_name not in MAP_NAMES:
        raise ValueError(f"map must be one of {MAP_NAMES}, got {map_name!r}")
    calibrated = result.calibration[map_name]
    rule = BoxRule(result.settings["mode"], result.settings["component"], result.settings["connectivity"])
    folds = patient_folds(np.asarray(outputs.patient_ids), result.settings["seed"])
    folder = Path(folder)
    (folder / "overlays").mkdir(parents=True, exist_ok=True)
    panels = []
    for m in _pick_boxes(outputs, count):
        b, c = int(outputs.gt_image[m]), int(outputs.gt_class[m])
        threshold = calibrated.two_fold.thresholds[1 - folds[b], c]  # chosen on the OTHER fold
        class_map = outputs.box_maps[map_name][b, c]
        found = rule.boxes(class_map[None], [threshold], outputs.original_sizes[b])
        valid, box = found.valid, found.boxes[0].numpy()
        score = float(box_scores(torch.as_tensor(class_map[None]), found.map_boxes)[0])
        name = outputs.box_class_names[c]
        grey, _ = load_display_image(outputs.box_images[b], 384)
        marks = [BoxMark(outputs.gt_boxes[m], TRUTH_COLOUR, "truth", label_below=True)]
        if bool(valid[0]):
            marks.append(
                BoxMark(box, PREDICTION_COLOUR, f"score={score:.3g} IoU={calibrated.two_fold.box_iou[m]:.2f}")
            )
        panel = draw_marks(
            heatmap_panel(grey, class_map),
            marks,
            outputs.original_sizes[b].astype(int),
            title=f"{name} ({map_name}, held-out)",
        )
        panel.save(folder / "overlays" / f"{safe_stem(outputs.box_images[b])}_{name}.png")
        panels.append(panel)
    if not panels:
        return None
    sheet = folder / "fig3_overlays.png"
    tile(panels, columns=4).save(sheet)
    return sheet
