"""The findings document: one image's result, in the one layout every output of the bundle uses.

The PNG/JSON writer, the DICOM writers and MONAI Label all return this document; its JSON Schema ships in the
bundle (``docs/findings_schema.json``, ``SCHEMA_FILE``) and ``docs/inference.md`` describes each field. Boxes
are float xyxy in the ORIGINAL image's pixels, origin at the top-left corner (``custom.localisation.grid``).

Version history: 1.0 (bundle 0.2.0) unified the three layouts of bundle 0.1.0 (the PNG runner's ``image`` /
``original_size``, the DICOM JSON's ``source`` / ``image_size``, MONAI Label's ``image_size`` / ``boxes_in``).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

SCHEMA_VERSION = "1.0"
SCHEMA_ID = "https://github.com/Project-MONAI/model-zoo/chestxray14_rpsal_detection/findings_schema.json"
# Inside a bundle folder (the repository's bundle/ or an exported one): docs/findings_schema.json.
SCHEMA_FILE = Path("docs") / "findings_schema.json"
BOXES_IN = "original image pixels, xyxy, origin top-left"
MODEL_NAME = "RpSal (Hermoza et al., MICCAI 2020)"


@lru_cache(maxsize=8)
def _cached_digest(path: str, size: int, mtime_ns: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of a file (identifies the model in the outputs); computed
    once per file version (path, size, modification time)."""
    status = os.stat(path)
    return _cached_digest(os.path.abspath(path), status.st_size, status.st_mtime_ns, length)


def item_source(item: dict, image_key: str = "image") -> str:
    """The input file of an item: its ``image_path``, else the MetaTensor's ``filename_or_obj``, else its
    ``output_name``."""
    if item.get("image_path") is not None:
        return str(item["image_path"])
    meta = getattr(item.get(image_key), "meta", None) or item.get(f"{image_key}_meta_dict") or {}
    return str(meta.get("filename_or_obj") or item.get("output_name") or "")


def model_description(thresholds, map_name: str, logits: str, input_size: Sequence[int],
                      checkpoint: str | os.PathLike | None = None, version: str | None = None) -> dict:
    """The document's ``model`` entry: which weights, logits, map and thresholds produced the result.

    Args:
        thresholds: ``custom.thresholds_file.Thresholds`` used; map_name, logits: as the postprocessing.
        input_size: the model input (H, W); checkpoint: the weights file; version: the bundle version.
    """
    from_file = thresholds.source is not None
    return {
        "name": MODEL_NAME,
        "version": version,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_digest(checkpoint) if checkpoint and os.path.isfile(checkpoint) else None,
        "logits": logits,
        "input_size": [int(v) for v in input_size],
        "map": map_name,
        "box_rule": {
            "mode": thresholds.mode,
            "component": thresholds.component,
            "connectivity": thresholds.connectivity,
        },
        "thresholds_file": thresholds.source,
        "box_thresholds": "held-out two-fold protocol: per class the mean of the two folds' thresholds; "
        f"default {thresholds.default_box_threshold} for classes without boxes"
        if from_file
        else f"default {thresholds.default_box_threshold} (no thresholds file)",
        "decision_thresholds": "Youden's J on the validation split"
        if from_file
        else f"default {thresholds.default_decision_threshold} (no thresholds file)",
    }


def findings_document(
    image: str,
    original_size: Sequence[int],
    class_names: Sequence[str],
    probabilities: torch.Tensor,
    decision_thresholds: np.ndarray,
    positive: torch.Tensor,
    boxes: torch.Tensor,
    valid: torch.Tensor,
    scores: torch.Tensor,
    box_thresholds: np.ndarray,
    threshold_sources: Sequence[str],
    map_name: str,
    map_grid: Sequence[int],
    model: dict,
) -> dict:
    """One image's findings document (schema ``SCHEMA_VERSION``).

    Args:
        image: the source (file path, or the id MONAI Label was given); original_size: its [H, W].
        class_names: the K classes in the network's order.
        probabilities: (K,) in [0, 1]; decision_thresholds: (K,) probabilities; positive: (K,) bool, the
            probability reached the class's decision threshold.
        boxes: (K, 4) float xyxy in original pixels (NaN rows: no box); valid: (K,) bool; scores: (K,) mean map
            value inside each box; box_thresholds: (K,) as applied; threshold_sources: (K,) where from.
        map_name: the map the boxes come from; map_grid: its (h, w); model: ``model_description``.

    Returns:
        {"schema_version", "image", "original_size", "boxes_in", "map_grid", "probabilities",
         "decision_thresholds", "positive", "findings": [{"class", "probability", "box", "box_format",
         "score", "map", "box_threshold", "threshold_source"}] (positive classes with a box, network order),
         "positive_without_box", "model", "files": {}} (writers add the files they write to "files").
    """
    names = list(class_names)
    probabilities = [float(p) for p in torch.as_tensor(probabilities).tolist()]
    positive = [bool(flag) for flag in torch.as_tensor(positive).tolist()]
    findings, without_box = [], []
    for k, name in enumerate(names):
        if not positive[k]:
            continue
        if not bool(valid[k]):
            without_box.append(name)
            continue
        findings.append(
            {
                "class": name,
                "probability": round(probabilities[k], 6),
                "box": [round(float(v), 3) for v in boxes[k].tolist()],
                "box_format": "xyxy",
                "score": round(float(scores[k]), 6),
                "map": map_name,
                "box_threshold": float(box_thresholds[k]),
                "threshold_source": threshold_sources[k],
            }
        )
    return {
        "schema_version": SCHEMA_VERSION,
        "image": str(image),
        "original_size": [int(v) for v in original_size],
        "boxes_in": BOXES_IN,
        "map_grid": [int(v) for v in map_grid],
        "probabilities": {name: round(p, 6) for name, p in zip(names, probabilities)},
        "decision_thresholds": {name: round(float(t), 6) for name, t in zip(names, decision_thresholds)},
        "positive": [name for name, flag in zip(names, positive) if flag],
        "findings": findings,
        "positive_without_box": without_box,
        "model": model,
        "files": {},
    }


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The ``version`` of a bundle folder's ``configs/metadata.json`` ("unknown" when there is none)."""
    import json

    path = Path(bundle_root) / "configs" / "metadata.json"
    if not path.is_file():
        return "unknown"
    return str(json.loads(path.read_text(encoding="utf-8")).get("version", "unknown"))


def schema_path(bundle_root: str | os.PathLike) -> Path:
    """The findings JSON Schema of a bundle folder."""
    return Path(bundle_root) / SCHEMA_FILE


def validate_findings(document: dict, bundle_root: str | os.PathLike) -> None:
    """Raise ``jsonschema.ValidationError`` when ``document`` does not follow the bundle's findings schema."""
    import json

    import jsonschema

    schema = json.loads(schema_path(bundle_root).read_text(encoding="utf-8"))
    jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
