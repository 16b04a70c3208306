"""The evaluation's settings, in one object: how Det is painted, the box rule and its candidate thresholds,
the two-fold split, the T(IoU) levels, the report's pictures and the defaults the thresholds file records.

``bundle/configs/evaluate.yaml`` declares one (``evaluate#settings``); ``scripts/evaluate_report.py`` builds
one from its flags; ``RpSalEvaluation``, ``evaluate_and_report`` and ``evaluate_outputs`` take it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from custom.arguments import require_booleans
from custom.localisation.box_rule import BoxRule
from custom.localisation.maps import MAP_NAMES, WEIGHTINGS
from custom.metrics import DEFAULT_KAPPAS, percentile_grid
from custom.thresholds_file import DEFAULT_BOX_THRESHOLD, DEFAULT_DECISION_THRESHOLD


@dataclass
class EvaluationSettings:
    """Everything the evaluation can be told.

    Attributes:
        weighting, normalize, sharpness: Det map painting (``custom.localisation.maps.detection_map``).
        candidates: box thresholds tried (None: the authors' percentile grid 0.60, 0.61, ..., 1.00).
        mode, component, connectivity: the box rule (``custom.localisation.BoxRule``).
        seed: seed of the patient-disjoint two-fold split.
        kappas: IoU levels of T(IoU).
        num_overlays, overlay_map: Fig. 3-style pictures in the report.
        save_outputs: also write the network outputs (``evaluation_outputs.pt``) for rescoring.
        default_box_threshold, default_decision_threshold: recorded in the thresholds file for classes
            without a chosen threshold.
        workers: threads of the threshold sweep (None: one per core).
    """

    weighting: str = "sigmoid"
    normalize: bool = True
    sharpness: float = 1.0
    candidates: Sequence[float] | None = None
    mode: str = "percentile"
    component: str = "largest"
    connectivity: int = 8
    seed: int = 0
    kappas: Sequence[float] = field(default_factory=lambda: list(DEFAULT_KAPPAS))
    num_overlays: int = 8
    overlay_map: str = "mix"
    save_outputs: bool = True
    default_box_threshold: float = DEFAULT_BOX_THRESHOLD
    default_decision_threshold: float = DEFAULT_DECISION_THRESHOLD
    workers: int | None = None

    def __post_init__(self) -> None:
        require_booleans(normalize=self.normalize, save_outputs=self.save_outputs)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.overlay_map not in MAP_NAMES:
            raise ValueError(f"overlay_map must be one of {MAP_NAMES}, got {self.overlay_map!r}")
        self.box_rule  # checks mode, component and connectivity
        self.sharpness = float(self.sharpness)
        self.kappas = [float(k) for k in self.kappas]

    @property
    def box_rule(self) -> BoxRule:
        return BoxRule(self.mode, self.component, int(self.connectivity))

    def candidate_thresholds(self) -> np.ndarray:
        """The candidates as float64, rounded to 12 digits (linspace's 0.6599999999999999 reads 0.66 in the
        thresholds file)."""
        candidates = percentile_grid() if self.candidates is None else np.asarray(self.candidates, np.float64)
        return np.round(candidates, 12)
