"""Findings from an exported model (``model.pt2`` or ``model.onnx``) and the thresholds file, without the
bundle: what a deployment runs beside the exported program.

Imports numpy, Pillow, torch (for ``.pt2``; ``.onnx`` runs on onnxruntime), ``custom.localisation`` (the box
rule) and ``custom.labels``; nothing of MONAI and no other part of ``custom``.

    runner = ExportedRpSal("models/model.onnx", "models/thresholds.json")
    result = runner("image.png")   # {"image", "original_size", "probabilities", "positive", "findings": [...]}

The decisions, box rule and box thresholds follow the bundle's inference (``docs/inference.md``): decision
thresholds of the image logits, the held-out box thresholds of the Mix map, the file's box rule; without a
file the bundle's defaults (percentile 0.9, largest component, 8-connectivity, decision 0.5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from custom.deployment.png import network_input
from custom.labels import CLASS_NAMES
from custom.localisation.box_rule import BoxRule

OUTPUT_NAMES = ("probabilities", "sal", "det", "mix")


def read_thresholds(path: str | os.PathLike | None, class_names=CLASS_NAMES, map_name: str = "mix",
                    logits: str = "image") -> tuple[BoxRule, np.ndarray, np.ndarray]:
    """(box rule, box thresholds (K,), decision thresholds (K,)) from the bundle's thresholds file (its
    ``box_rule``, ``inference_box_thresholds``, ``inference_decision_thresholds`` and defaults)."""
    if path is None or not Path(path).is_file():
        return BoxRule(), np.full(len(class_names), 0.9), np.full(len(class_names), 0.5)
    content = json.loads(Path(path).read_text(encoding="utf-8"))
    rule = content["box_rule"]
    boxes = content["inference_box_thresholds"].get(map_name, {})
    decisions = content["inference_decision_thresholds"].get(logits, {})
    box_default, decision_default = float(rule["default_threshold"]), float(content["default_decision_threshold"])
    return (
        BoxRule(rule["mode"], rule["component"], int(rule["connectivity"])),
        np.array([boxes.get(name, box_default) for name in class_names], dtype=np.float64),
        np.array([decisions.get(name, decision_default) for name in class_names], dtype=np.float64),
    )


class ExportedRpSal:
    """An exported RpSal model and its thresholds: a PNG in, findings out.

    Args:
        model_path: ``model.pt2`` (``torch.export``) or ``model.onnx``.
        thresholds_path: the bundle's ``thresholds.json`` (None: the defaults).
        input_size: S of the network input (None: the exported program's, from its input).
    """

    def __init__(self, model_path: str | os.PathLike, thresholds_path: str | os.PathLike | None = None,
                 input_size: int | None = None, class_names=CLASS_NAMES) -> None:
        self.model_path = Path(model_path)
        self.class_names = tuple(class_names)
        self.rule, self.box_thresholds, self.decision_thresholds = read_thresholds(thresholds_path, class_names)
        if self.model_path.suffix == ".onnx":
            import onnxruntime

            self.session = onnxruntime.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
            size = self.session.get_inputs()[0].shape[-1]
        elif self.model_path.suffix == ".pt2":
            program = torch.export.load(str(self.model_path))
            self.module = program.module()
            size = program.example_inputs[0][0].shape[-1] if program.example_inputs else None
        else:
            raise ValueError(f"{self.model_path}: expected a .pt2 or .onnx file")
        self.input_size = int(input_size or size)

    def outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The exported program on a (B, 3, S, S) float32 batch: {probabilities, sal, det, mix} arrays."""
        if self.model_path.suffix == ".onnx":
            values = self.session.run(list(OUTPUT_NAMES), {"images": images})
        else:
            with torch.no_grad():
                values = [value.numpy() for value in self.module(torch.from_numpy(images))]
        return dict(zip(OUTPUT_NAMES, values))

    def __call__(self, path: str | os.PathLike) -> dict:
        """Findings of one PNG: probabilities, positive classes, and per positive class its box (float xyxy in
        the ORIGINAL image's pixels, from the Mix map)."""
        image, original_size = network_input(path, self.input_size)
        out = self.outputs(image)
        probabilities = out["probabilities"][0]
        positive = probabilities >= self.decision_thresholds.astype(np.float32)
        found = self.rule.boxes(out["mix"][0], self.box_thresholds, original_size)
        findings = [
            {"class": name, "probability": float(probabilities[k]), "box": [float(v) for v in found.boxes[k]]}
            for k, name in enumerate(self.class_names) if positive[k] and bool(found.valid[k])
        ]
        return {
            "image": str(path),
            "original_size": list(original_size),
            "probabilities": {name: float(p) for name, p in zip(self.class_names, probabilities)},
            "positive": [name for name, flag in zip(self.class_names, positive) if flag],
            "findings": findings,
        }
