"""The thresholds file stored with a model (``models/thresholds.json``), and how inference reads it.

Words, one meaning each: BOX THRESHOLDS turn a map into a box (``custom.localisation.BoxRule``); DECISION
THRESHOLDS turn a probability into a positive finding; the THRESHOLDS FILE holds both, with the settings they
were chosen for. ``bundle/configs/evaluate.yaml`` writes it; inference reads it so that boxes and decisions
follow what was measured. Files named ``calibration.json`` (this bundle before 0.2.0) are still read, with a
deprecation warning. It holds:

- box thresholds per map (sal, det, mix) and class, chosen to maximise mean IoU on the test box images under
  (a) the paper's protocol (all box images choose and are scored) and (b) the held-out two-fold protocol
  (patient-disjoint halves: chosen on one, scored on the other). INFERENCE USES (b): per class, the mean of
  the two folds' thresholds, none of which was chosen on the box it scored; a class without boxes (6 of the
  14) uses ``default_box_threshold``;
- decision thresholds per class (``positive`` in the inference JSON): Youden's J on the VALIDATION split,
  for the image logits (the paper's) and the combined logits, as probabilities;
- the settings the thresholds are valid for: map weighting, threshold mode, component, connectivity.

Without a file, inference uses the documented defaults: the 90th percentile of each map (the authors'
default), the largest component, decision threshold 0.5 on the probability.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from custom.atomic_file import atomic_output
from custom.localisation.box_rule import COMPONENT_MODES, THRESHOLD_MODES, BoxRule
from custom.localisation.maps import MAP_NAMES, WEIGHTINGS
from custom.atomic_file import json_text
from custom.labels import CLASS_NAMES

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FILE_NAME = "thresholds.json"
DEPRECATED_FILE_NAME = "calibration.json"  # the name before bundle 0.2.0
LOGITS = ("image", "combined")
DEFAULT_BOX_THRESHOLD = 0.9  # percentile; the authors' default
DEFAULT_DECISION_THRESHOLD = 0.5  # probability
INFERENCE_PROTOCOL = "two_fold"


@dataclass
class Thresholds:
    """Thresholds and the settings they hold for.

    Attributes:
        class_names: the K classes, in the network's output order.
        box_thresholds: {map name: {class: threshold}} used by inference (missing class: the default);
            quantiles in [0, 1] for ``mode="percentile"``, map values for ``"absolute"``.
        decision_thresholds: {"image" | "combined": {class: probability}}; missing class: the default.
        mode, component, connectivity: how box thresholds are applied (``custom.localisation.box_rule``).
        weighting, normalize, sharpness: Det map weighting (``custom.localisation.maps.detection_map``).
        default_box_threshold, default_decision_threshold: used where no calibrated value exists.
        source: the file read, or None for defaults only.
        details: everything else the file holds (both protocols' thresholds, summaries), kept as read.
    """

    class_names: tuple[str, ...] = CLASS_NAMES
    box_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    decision_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    mode: str = "percentile"
    component: str = "largest"
    connectivity: int = 8
    weighting: str = "sigmoid"
    normalize: bool = True
    sharpness: float = 1.0
    default_box_threshold: float = DEFAULT_BOX_THRESHOLD
    default_decision_threshold: float = DEFAULT_DECISION_THRESHOLD
    source: str | None = None
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        where = self.source or "thresholds file"
        if self.mode not in THRESHOLD_MODES:
            raise ValueError(f"{where}: mode must be one of {THRESHOLD_MODES}, got {self.mode!r}")
        if self.component not in COMPONENT_MODES:
            raise ValueError(f"{where}: component must be one of {COMPONENT_MODES}, got {self.component!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"{where}: connectivity must be 4 or 8, got {self.connectivity!r}")
        if not isinstance(self.normalize, bool):  # the string "false" from a command line would be truthy
            raise ValueError(f"{where}: normalize must be true or false, got {self.normalize!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"{where}: weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if isinstance(self.sharpness, bool) or not isinstance(self.sharpness, (int, float)) or not (
            math.isfinite(self.sharpness) and self.sharpness > 0
        ):
            raise ValueError(f"{where}: sharpness must be a positive number, got {self.sharpness!r}")
        for group, name_set in (("box_thresholds", MAP_NAMES), ("decision_thresholds", LOGITS)):
            for key, values in getattr(self, group).items():
                if key not in name_set:
                    raise ValueError(f"{where}: {group} has unknown key {key!r} (known: {name_set})")
                unknown = set(values) - set(self.class_names)
                if unknown:
                    raise ValueError(f"{where}: {group}[{key!r}] names unknown classes {sorted(unknown)}")
                bad = {
                    k: v for k, v in values.items() if not isinstance(v, (int, float)) or not math.isfinite(v)
                }
                if bad:
                    raise ValueError(f"{where}: {group}[{key!r}] has non-numeric or non-finite values {bad}")
        if self.mode == "percentile":
            for name, values in self.box_thresholds.items():
                outside = {k: v for k, v in values.items() if not 0 <= v <= 1}
                if outside or not 0 <= self.default_box_threshold <= 1:
                    raise ValueError(
                        f"{where}: percentile box thresholds must lie in [0, 1], got "
                        f"{outside or self.default_box_threshold}"
                    )

    @property
    def box_rule(self) -> BoxRule:
        """The box rule the box thresholds were chosen for."""
        return BoxRule(self.mode, self.component, self.connectivity)

    def box_threshold_vector(self, map_name: str) -> np.ndarray:
        """(K,) float64 box thresholds of ``map_name`` in class order; the default where none was
        calibrated."""
        if map_name not in MAP_NAMES:
            raise ValueError(f"map must be one of {MAP_NAMES}, got {map_name!r}")
        values = self.box_thresholds.get(map_name, {})
        return np.array([values.get(name, self.default_box_threshold) for name in self.class_names])

    def box_threshold_sources(self, map_name: str) -> list[str]:
        """Per class, where its box threshold comes from: the protocol name, or "default"."""
        values = self.box_thresholds.get(map_name, {})
        protocol = self.details.get("box_thresholds", {}).get("inference_protocol", INFERENCE_PROTOCOL)
        return [protocol if name in values else "default" for name in self.class_names]

    def decision_threshold_vector(self, logits: str) -> np.ndarray:
        """(K,) float64 decision thresholds (probabilities) for ``logits`` ("image" or "combined")."""
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        values = self.decision_thresholds.get(logits, {})
        return np.array([values.get(name, self.default_decision_threshold) for name in self.class_names])

    def to_json(self) -> dict:
        """The file's content (``load_thresholds`` reads it back)."""
        content = dict(self.details)
        content.update(
            {
                "format_version": FORMAT_VERSION,
                "class_names": list(self.class_names),
                "maps": {"weighting": self.weighting, "normalize": self.normalize,
                         "sharpness": self.sharpness},
                "box_rule": {
                    "mode": self.mode,
                    "component": self.component,
                    "connectivity": self.connectivity,
                    "default_threshold": self.default_box_threshold,
                },
                "inference_box_thresholds": self.box_thresholds,
                "inference_decision_thresholds": self.decision_thresholds,
                "default_decision_threshold": self.default_decision_threshold,
            }
        )
        return content


def thresholds_from_json(content: Mapping, source: str | None = None) -> Thresholds:
    """Build a Thresholds from the parsed file (see ``Thresholds.to_json``); errors name ``source``."""
    where = source or "thresholds file"
    if not isinstance(content, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(content).__name__}")
    version = content.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format_version {version!r} is not {FORMAT_VERSION}: written by another "
            "version of this bundle; rerun evaluate.yaml"
        )
    try:
        maps, rule = content["maps"], content["box_rule"]
        known = {
            "format_version",
            "class_names",
            "maps",
            "box_rule",
            "inference_box_thresholds",
            "inference_decision_thresholds",
            "default_decision_threshold",
        }
        return Thresholds(
            class_names=tuple(content["class_names"]),
            box_thresholds={k: dict(v) for k, v in content["inference_box_thresholds"].items()},
            decision_thresholds={k: dict(v) for k, v in content["inference_decision_thresholds"].items()},
            mode=rule["mode"],
            component=rule["component"],
            connectivity=int(rule["connectivity"]),
            weighting=maps["weighting"],
            normalize=bool(maps["normalize"]),
            # Files written before the softmax weighting have no sharpness (it did not apply then).
            sharpness=maps.get("sharpness", 1.0),
            default_box_threshold=float(rule["default_threshold"]),
            default_decision_threshold=float(content["default_decision_threshold"]),
            source=source,
            details={k: v for k, v in content.items() if k not in known},
        )
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{where}: malformed thresholds file ({type(error).__name__}: {error})") from error


def deprecated_name(path: str | os.PathLike | None) -> Path | None:
    """Where an older bundle kept the file named ``path``: ``calibration.json`` beside a missing
    ``thresholds.json``, when that exists; else None."""
    if path is None or Path(path).is_file() or Path(path).name != FILE_NAME:
        return None
    old = Path(path).with_name(DEPRECATED_FILE_NAME)
    return old if old.is_file() else None


def _deprecated_id(action: str, path) -> None:
    warnings.warn("the config id 'calibration_file' is deprecated: set 'thresholds_file'", DeprecationWarning,
                  stacklevel=3)
    logger.warning(f"calibration_file is deprecated (use thresholds_file): {action} {path}")


def output_path(folder: str | os.PathLike, deprecated_path: str | os.PathLike | None = None) -> str:
    """Where evaluate.yaml writes the thresholds file: ``<folder>/thresholds.json``, or the deprecated config
    id ``calibration_file``'s path when that is set (with a deprecation warning)."""
    if deprecated_path is not None:
        _deprecated_id("writing", deprecated_path)
        return str(deprecated_path)
    return str(Path(folder) / FILE_NAME)


def load_thresholds(path: str | os.PathLike | None, required: bool = False, deprecated_path=None,
                    deprecated_defaults: Mapping | None = None, **defaults) -> Thresholds:
    """Read the thresholds file; without one, Thresholds of defaults.

    Args:
        path: the file (``thresholds.json``), or None. When it is missing and a ``calibration.json`` (the
            name before bundle 0.2.0) lies beside it, that one is read, with a deprecation warning.
        required: raise FileNotFoundError when the file is missing (else: defaults, with a warning).
        deprecated_path: the value of the deprecated config id ``calibration_file``; when set, it is read
            instead of ``path``, with a deprecation warning.
        deprecated_defaults: entries of the deprecated config id ``calibration_defaults``; they override
            ``defaults``, with a deprecation warning.
        defaults: Thresholds fields used when there is no file (e.g. ``component="max"``); ignored when the
            file exists, since its thresholds only hold for the settings it was made with.

    Returns:
        ``Thresholds``; ``source`` is the path read, or None.

    Raises:
        ValueError naming the file when it is not valid JSON or not a thresholds file of this format.
    """
    if deprecated_path is not None:
        _deprecated_id("reading", deprecated_path)
        path = deprecated_path
    if deprecated_defaults:
        warnings.warn("the config id 'calibration_defaults' is deprecated: set 'threshold_defaults'",
                      DeprecationWarning, stacklevel=2)
        logger.warning(f"calibration_defaults is deprecated (use threshold_defaults): {dict(deprecated_defaults)}")
        defaults = {**defaults, **deprecated_defaults}
    old = deprecated_name(path)
    if old is not None:
        warnings.warn(f"{old}: the thresholds file's old name; rename it {FILE_NAME}", DeprecationWarning,
                      stacklevel=2)
        logger.warning(f"{path} not found: reading {old} (its name before bundle 0.2.0; rename it {FILE_NAME})")
        path = old
    if path is None or not Path(path).is_file():
        if required:
            raise FileNotFoundError(f"{path}: thresholds file not found (run evaluate.yaml to make it)")
        logger.warning(
            f"no thresholds file at {path}: box thresholds default to percentile "
            f"{defaults.get('default_box_threshold', DEFAULT_BOX_THRESHOLD)} and decision "
            f"thresholds to {defaults.get('default_decision_threshold', DEFAULT_DECISION_THRESHOLD)}"
        )
        return Thresholds(**defaults)
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return thresholds_from_json(content, str(path))


def save_thresholds(thresholds: Thresholds, path: str | os.PathLike) -> Path:
    """Write ``thresholds.to_json()`` atomically (a temporary file beside it, then rename).

    Returns the path.
    """
    path = Path(path)
    with atomic_output(path) as temp:
        temp.write_text(json_text(thresholds.to_json()) + "\n", encoding="utf-8")
    return path


def fold_mean_thresholds(by_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per class, the mean of the folds' thresholds (classes present in every fold and finite in all)."""
    names = set.intersection(*(set(fold) for fold in by_fold)) if by_fold else set()
    mean = {}
    for name in sorted(names):
        values = [float(fold[name]) for fold in by_fold]
        if all(math.isfinite(v) for v in values):
            # Rounded: the mean of 0.85 and 0.95 reads 0.9, not 0.8999999999999999.
            mean[name] = round(float(np.mean(values)), 12)
    return mean


def as_plain(value):
    """A JSON-ready copy of nested dicts/lists holding numpy scalars or arrays; NaN and inf become None
    (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return as_plain(value.tolist())
    if isinstance(value, np.generic):
        return as_plain(value.item())
    if hasattr(value, "__dataclass_fields__"):
        return as_plain(asdict(value))
    return value
