"""Class-balance weights of the paper's weighted BCE (Eq. 1, 2), from the training labels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def class_balance_weights(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """betaP(k) = 1 - P_k / |D| and betaN(k) = P_k / |D| (paper Eq. 1), from training labels.

    Args:
        labels: (N, K) 0/1 labels of the |D| = N training images (tensor, array or nested sequence);
            P_k = the number of images positive for class k.

    Returns:
        (positive, negative): two float32 tensors of shape (K,). The positive term of class k is weighted by
        the fraction of negatives, so rare classes get positive weights near 1 and negative weights near 0.

    Raises:
        ValueError: for an empty set, a non-2-D input, or values other than 0 and 1.
    """
    fraction_positive = _positive_fraction(labels)
    positive = torch.as_tensor(1.0 - fraction_positive, dtype=torch.float32)
    negative = torch.as_tensor(fraction_positive, dtype=torch.float32)
    return positive, negative


def datalist_class_weights(items: Sequence[Mapping]) -> dict[str, list[float]]:
    """The datalist form of :func:`class_balance_weights` over items carrying ``label`` (K floats 0/1).

    Returns ``{"positive": [K floats], "negative": [K floats]}`` (Python floats, JSON-ready).
    """
    fraction_positive = _positive_fraction([item["label"] for item in items])
    return {"positive": (1.0 - fraction_positive).tolist(), "negative": fraction_positive.tolist()}


def _positive_fraction(labels) -> np.ndarray:
    """P_k / |D| in float64, shape (K,), after checking labels are a non-empty (N, K) 0/1 matrix."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(
            f"labels must be (N, K) with N, K > 0 (the training labels), got shape {array.shape}"
        )
    if not np.isin(array, (0, 1)).all():
        raise ValueError("labels must be 0/1; found other values (soft labels have no P_k count)")
    return array.astype(np.float64).sum(axis=0) / array.shape[0]
