"""The MONAI Label inference task of the RpSal bundle: MONAI Label's stock ``BundleInferTask`` on the bundle's
own ids.

MONAI Label runs the bundle's ``preprocessing`` (its first step, ``LoadChestXrayd``, reads PNG and DICOM),
its ``inferer`` (``custom.inference.inferer.RpSalInferer``: the maps' outputs of ``network_def``, whose own
``forward`` stays the (B, 14) classifier) and its ``postprocessing`` (maps -> boxes -> findings document), all
from ``configs/inference.yaml``: the same path as the bundle's batch inference. This subclass only sets the
task type and options, routes MONAI Label's detection step to that inferer, and returns the document.

``POST /infer/<name>?image=<id>&output=json`` (or ``-F file=@x.png``) returns the findings document of
``docs/findings_schema.json`` (probabilities, decision thresholds, positive classes, one box per positive
class in the ORIGINAL image's pixels, xyxy, origin top-left; for a DICOM its Rows x Columns grid), plus MONAI
Label's own ``label_names`` and ``latencies``.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

logger = logging.getLogger(__name__)


class RpSalInferTask(BundleInferTask):
    """MONAI Label infer task for ``chestxray14_rpsal_detection``: a 2D radiograph in, findings document out.

    Args:
        path: the exported bundle folder (``configs/inference.yaml``, ``configs/metadata.json``,
            ``models/model.pt``; ``models/thresholds.json`` optional, see the bundle's inference config).
        conf: the app's ``--conf`` pairs (``preload`` as in MONAI Label).

    The network must be the eager one (``models/model.pt``): the findings need the saliency and proposal
    outputs, which the TorchScript model (probabilities only) does not give.
    """

    def __init__(self, path: str, conf: dict[str, str], **kwargs: Any):
        # No Restored step: the findings are in original pixels already, and a (14,) output has no image grid.
        super().__init__(path, conf, type=InferType.DETECTION, add_post_restore=False, load_strict=True, **kwargs)
        if not self.valid:
            return
        if self.network is None:
            raise ValueError(f"{path}: models/model.pt is required (the TorchScript model gives "
                             "probabilities only, not the maps the boxes come from)")
        self.description = "RpSal: 14 chest X-ray disease probabilities and one box per positive class"

    def run_detector(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        """MONAI Label's detection step wants a RetinaNet-style ``detector`` id; this bundle's detection is its
        declared ``inferer`` followed by its ``postprocessing``, which MONAI Label's inferer step runs."""
        return self.run_inferer(data, convert_to_batch, device)

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        """No label file; the findings document (from the bundle's postprocessing) is the JSON returned."""
        return None, dict(data["findings"])
