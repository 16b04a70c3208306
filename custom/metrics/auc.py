"""Area under the ROC curve, per class and averaged (the paper's classification measure, Table 1)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata


def _as_2d(values, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (N,) or (N, K), got {array.shape}")
    return array


def auc_per_class(scores, labels, class_names=None) -> tuple[np.ndarray, float]:
    """ROC AUC of each class, and their mean over the classes where it is defined.

    The AUC is the Mann-Whitney statistic: the probability that a random positive scores above a random
    negative, ties counting 1/2 (average ranks), identical to the trapezoidal area under the ROC curve.

    Args:
        scores: (N,) or (N, K) scores (logits or probabilities; only their order matters).
        labels: same shape, 0/1 ground truth.
        class_names: optional K names, used in the warning.

    Returns:
        per_class (K,) float64 AUCs, NaN for a class whose labels are all 0 or all 1 (a warning names it);
        mean: the mean over the defined classes (NaN, with the warning, if none is defined).
    """
    scores, labels = _as_2d(scores, "scores"), _as_2d(labels, "labels")
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positives = labels.sum(axis=0)
    negatives = labels.shape[0] - positives
    ranks = rankdata(scores, method="average", axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * labels).sum(axis=0) - positives * (positives + 1) / 2) / (positives * negatives)
    undefined = (positives == 0) | (negatives == 0)
    auc[undefined] = np.nan
    if undefined.any():
        names = [class_names[k] if class_names is not None else str(k) for k in np.flatnonzero(undefined)]
        warnings.warn(f"AUC undefined (a single label value) for classes {names}: NaN, left out of the mean",
                      RuntimeWarning, stacklevel=2)
    mean = float(np.mean(auc[~undefined])) if (~undefined).any() else float("nan")
    return auc, mean
