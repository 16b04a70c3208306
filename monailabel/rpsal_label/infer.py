"""The MONAI Label inference task of the RpSal bundle: per-class probabilities and boxes as JSON.

Why not the stock ``monaibundle`` app: its classification path appends a ``Restored`` step that crashes on a
(14,) output, its detection path needs a ``detector`` object in the bundle config and drops the scores in its
writer, and it runs the bundle's ``postprocessing`` as transforms (ours is a settings block). This task keeps
everything else of MONAI Label's ``BundleInferTask`` (the bundle's ``preprocessing``, ``network_def`` and
``models/model.pt``, device handling, model caching) and replaces the model step and the writer: the model
step is the bundle's own ``custom.inference.pipeline.predict_findings``, so MONAI Label returns exactly what
``configs/inference.yaml`` writes per image.

``POST /infer/<name>?image=<id>&output=json`` (or ``-F file=@x.png``) returns::

    {"probabilities": {class: p, ...14}, "decision_thresholds": {...}, "positive": [classes],
     "findings": [{"class", "probability", "box": [x0, y0, x1, y1], "box_format": "xyxy", "score", "map",
                   ...}], "positive_without_box": [...], "image_size": [H, W], "boxes_in": "original pixels",
     "label_names": {...}, "latencies": {...}}

Boxes are float xyxy in the ORIGINAL image's pixels (origin top-left, x1 = x0 + w): for a DICOM, its Rows x
Columns grid.
"""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from typing import Any

import torch
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)


@contextmanager
def _bundle_on_path(path: str):
    """The bundle root first on sys.path while its ``custom`` package is imported or used."""
    sys.path.insert(0, path)
    try:
        yield
    finally:
        if path in sys.path:
            sys.path.remove(path)


class RpSalInferTask(BundleInferTask):
    """MONAI Label infer task for ``chestxray14_rpsal_detection``: a 2D radiograph in, findings JSON out.

    Args:
        path: the exported bundle folder (``configs/inference.yaml``, ``configs/metadata.json``,
            ``models/model.pt``; ``models/calibration.json`` optional, see the bundle's inference config).
        conf: the app's ``--conf`` pairs (``preload`` as in MONAI Label).

    The network must be the eager one (``models/model.pt``): the findings need the saliency and proposal
    outputs, which the TorchScript model (probabilities only) does not give.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any):
        super().__init__(path, conf, type=InferType.DETECTION, add_post_restore=False, load_strict=True,
                         post_filter=None, **kwargs)
        if not self.valid:
            return
        if self.network is None:
            raise ValueError(f"{path}: models/model.pt is required (the TorchScript model gives "
                             "probabilities only, not the maps the boxes come from)")
        with _bundle_on_path(self.bundle_path):
            self.calibration = self.bundle_config.get_parsed_content("calibration", instantiate=True)
        self.map_name = str(self.bundle_config.get("postprocessing", {}).get("map", "mix"))
        self.description = "RpSal: 14 chest X-ray disease probabilities and one box per positive class"

    def post_transforms(self, data=None) -> list:
        """None: the findings are complete after the model step."""
        return []

    def detector(self, data=None):
        """Unused: ``run_detector`` below calls the bundle's pipeline directly."""

    def run_detector(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        """Run the network and the bundle's maps -> boxes -> findings; the result goes to ``data["result"]``.

        ``data["image"]`` is the preprocessed (3, S, S) tensor, ``data["original_size"]`` the file's [H, W]
        (both from the bundle's ``preprocessing``, whose first step is ``LoadChestXrayd``).
        """
        network = self._get_network(device, data)
        if not callable(getattr(network, "outputs", None)):
            raise TypeError(f"{type(network).__name__} has no .outputs(): serve models/model.pt with an "
                            "RpSalProbabilities network_def")
        image = data[self.input_key]
        image = image if torch.is_tensor(image) else torch.as_tensor(image)
        if image.ndim != 3:
            raise ValueError(f"preprocessed image must be (3, S, S), got shape {tuple(image.shape)}")
        original_size = [int(v) for v in data["original_size"]]
        with _bundle_on_path(self.bundle_path):
            from custom.inference.pipeline import predict_findings

            with torch.no_grad():
                result = predict_findings(network, image[None].to(torch.device(device)), [original_size],
                                          self.calibration, self.map_name)[0]
        result["image_size"] = original_size
        result["boxes_in"] = "original image pixels, xyxy, origin top-left"
        data["result"] = result
        return data

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        """No label file; the findings dict is the JSON MONAI Label returns."""
        return None, dict(data["result"])
