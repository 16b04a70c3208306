"""Validation AUC over the 14 labels as an Ignite metric, gathered across distributed processes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from ignite.metrics import Metric
from monai.utils import evenly_divisible_all_gather

from ..labels import CLASS_NAMES
from ..metrics.auc import auc_per_class


class MultiLabelAUC(Metric):
    # Ignite picks these keys out of the engine's output dict and passes them to update() as a tuple.
    required_output_keys = ("pred", "label")

    """Mean ROC AUC over classes of one logits field of RpSalOutput (``image_logits`` or ``combined_logits``).

    ``update`` takes the evaluator's (undecollated) output: ``pred`` = RpSalOutput and ``label`` (B, K);
    ``compute`` gathers every process's scores (no padding duplicates: the distributed validation
    sampler must not pad) and returns the mean AUC over the classes where it is defined. The per-class values
    of the last ``compute`` are in ``per_class``. A field the network did not compute (stage 1 skips the
    detection module) gives NaN.
    """

    def __init__(self, field: str = "image_logits", class_names: Sequence[str] = CLASS_NAMES, **kwargs):
        self.field = field
        self.class_names = tuple(class_names)
        self.per_class: list[float] = []
        self.num_samples = 0  # images behind the last compute(), over all processes
        super().__init__(**kwargs)

    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._missing = False

    def update(self, output) -> None:
        prediction, labels = output
        logits = getattr(prediction, self.field)
        if logits is None:
            self._missing = True
            return
        k = len(self.class_names)
        self._scores.append(logits.detach().float().reshape(-1, k))
        self._labels.append(torch.as_tensor(labels).detach().float().reshape(-1, k))

    def compute(self) -> float:
        device = self._device if torch.distributed.is_initialized() else "cpu"
        empty = torch.zeros(0, len(self.class_names), device=device)
        scores = torch.cat(self._scores).to(device) if self._scores else empty
        labels = torch.cat(self._labels).to(device) if self._labels else empty
        scores = evenly_divisible_all_gather(scores, concat=True)
        labels = evenly_divisible_all_gather(labels, concat=True)
        self.num_samples = int(scores.shape[0])
        if self._missing or scores.shape[0] == 0:
            self.per_class = [float("nan")] * len(self.class_names)
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # classes absent from a small split give NaN
            per_class, mean = auc_per_class(scores.cpu().numpy(), labels.cpu().numpy(), self.class_names)
        self.per_class = [float(v) for v in per_class]
        return float(mean)
