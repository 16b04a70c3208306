"""The postprocessing transforms of ``inference.yaml``: model outputs -> Sal / Det / Mix maps -> boxes in
original pixels -> the findings document (paper Fig. 2). MONAI dictionary transforms, applied per image.

Input: one image's data dict after the ``inferer`` (``custom.inference.inferer.RpSalInferer``) and
decollation: ``pred`` = {field: tensor} of that image (``image_logits`` (K,), ``saliency_logits`` (K, h, w),
``proposal_logits`` (K, N), ``refined_boxes`` (K, N, 4) in model-input pixels, ...), ``image`` the model
input (3, S, S), ``original_size`` [H, W] from ``LoadChestXrayd``. Each transform adds keys; nothing is
written to disk here (the writers do that: ``custom.inference.writers``), so MONAI Label can run the same
chain and return the document.

    RpSalMapsd      pred                         -> probabilities (K,), positive (K,), maps {sal, det, mix} (K, h, w)
    MapBoxesd       maps, original_size          -> boxes (K, 4) original pixels, box_valid (K,), box_scores (K,)
    Findingsd       all of the above, the source -> findings (the document, ``custom.inference.findings``)
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.inference.findings import findings_document, item_source, model_description
from custom.localisation.box_rule import box_scores
from custom.localisation.maps import MAP_NAMES, rpsal_maps
from custom.thresholds_file import LOGITS, Thresholds


def _image_size(data: Mapping, image_key: str) -> tuple[int, int]:
    image = data.get(image_key)
    if image is None or not hasattr(image, "shape") or len(image.shape) < 2:
        raise KeyError(f"'{image_key}' (the model input) is needed for the input size")
    return int(image.shape[-2]), int(image.shape[-1])


def _original_size(data: Mapping, key: str) -> list[int]:
    if key not in data:
        raise KeyError(f"'{key}' ([H, W] of the original image, from LoadChestXrayd) is missing")
    value = data[key]
    value = value.tolist() if hasattr(value, "tolist") else list(value)
    value = [int(v.item() if hasattr(v, "item") else v) for v in value]
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"'{key}' must be [H, W] positive, got {value}")
    return value


class RpSalMapsd(MapTransform):
    """Probabilities, decisions and the three maps of one image from its network outputs.

    Args:
        keys: the key holding the inferer's dict (``pred``).
        thresholds: ``custom.thresholds_file.Thresholds`` (decision thresholds; Det's weighting).
        logits: "image" (the paper's y) or "combined" (y + z), the probabilities' logits.
        image_key: the model input, for the input size S the refined boxes are in.

    Adds ``probabilities`` (K,) float32, ``positive`` (K,) bool (probability >= decision threshold) and
    ``maps`` {"sal", "det", "mix"}: (K, h, w) float32 on the CPU (``custom.localisation.maps.rpsal_maps``).
    """

    def __init__(self, keys: KeysCollection, thresholds: Thresholds, logits: str = "image",
                 image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if logits not in LOGITS:
            raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
        self.thresholds = thresholds
        self.logits = logits
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            outputs = d[key]
            chosen = outputs["image_logits" if self.logits == "image" else "combined_logits"]
            probabilities = torch.sigmoid(torch.as_tensor(chosen).detach().float()).cpu()
            maps = rpsal_maps(
                outputs["saliency_logits"].detach().float()[None],
                outputs["proposal_logits"].detach().float()[None],
                outputs["refined_boxes"].detach().float()[None],
                _image_size(d, self.image_key),
                self.thresholds.weighting,
                self.thresholds.normalize,
                self.thresholds.sharpness,
            )
            decision = self.thresholds.decision_threshold_vector(self.logits)
            if len(decision) != len(probabilities):
                raise ValueError(f"the thresholds hold {len(decision)} classes, the network {len(probabilities)}")
            d["probabilities"] = probabilities
            d["positive"] = probabilities >= torch.as_tensor(decision, dtype=torch.float32)
            d["maps"] = {name: value[0].cpu() for name, value in maps.items()}
        return d


class MapBoxesd(MapTransform):
    """One box per class from one map by the thresholds file's box rule (``custom.localisation.BoxRule``).

    Args:
        keys: the key holding the maps dict (``maps``).
        thresholds: box thresholds and the rule they hold for.
        map_name: "sal", "det" or "mix" (the paper's best).
        original_size_key: [H, W] of the original image, the boxes' pixels.

    Adds ``boxes`` (K, 4) float32 xyxy in ORIGINAL pixels (NaN rows: no box), ``box_valid`` (K,) bool and
    ``box_scores`` (K,) float32 (mean of the map inside each box).
    """

    def __init__(self, keys: KeysCollection, thresholds: Thresholds, map_name: str = "mix",
                 original_size_key: str = "original_size", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if map_name not in MAP_NAMES:
            raise ValueError(f"map must be one of {MAP_NAMES}, got {map_name!r}")
        self.thresholds = thresholds
        self.map_name = map_name
        self.original_size_key = original_size_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            chosen = d[key][self.map_name]
            thresholds = self.thresholds.box_threshold_vector(self.map_name)
            if len(thresholds) != chosen.shape[0]:
                raise ValueError(f"the thresholds hold {len(thresholds)} classes, the network {chosen.shape[0]}")
            found = self.thresholds.box_rule.boxes(chosen, thresholds, _original_size(d, self.original_size_key))
            d["boxes"] = found.boxes
            d["box_valid"] = found.valid
            d["box_scores"] = box_scores(chosen, found.map_boxes)
        return d


class Findingsd(MapTransform):
    """The findings document of one image (``custom.inference.findings.findings_document``).

    Args:
        keys: the key to write the document to (``findings``).
        thresholds, map_name, logits: as the transforms before it (recorded in the document).
        class_names: the network's classes, in output order (default the thresholds file's).
        checkpoint: the weights file (recorded with its SHA-256 prefix); version: the bundle version.
        image_key, original_size_key: the model input and [H, W]; the source is ``item_source``'s.
    """

    def __init__(self, keys: KeysCollection, thresholds: Thresholds, map_name: str = "mix", logits: str = "image",
                 class_names=None, checkpoint: str | os.PathLike | None = None, version: str | None = None,
                 image_key: str = "image", original_size_key: str = "original_size") -> None:
        super().__init__(keys)
        self.thresholds = thresholds
        self.map_name = map_name
        self.logits = logits
        self.class_names = tuple(class_names or thresholds.class_names)
        self.checkpoint = checkpoint
        self.version = version
        self.image_key = image_key
        self.original_size_key = original_size_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        chosen = d["maps"][self.map_name]
        model = model_description(self.thresholds, self.map_name, self.logits, _image_size(d, self.image_key),
                                  self.checkpoint, self.version)
        document = findings_document(
            image=item_source(d, self.image_key),
            original_size=_original_size(d, self.original_size_key),
            class_names=self.class_names,
            probabilities=d["probabilities"],
            decision_thresholds=self.thresholds.decision_threshold_vector(self.logits),
            positive=d["positive"],
            boxes=d["boxes"],
            valid=d["box_valid"],
            scores=d["box_scores"],
            box_thresholds=self.thresholds.box_threshold_vector(self.map_name),
            threshold_sources=self.thresholds.box_threshold_sources(self.map_name),
            map_name=self.map_name,
            map_grid=chosen.shape[-2:],
            model=model,
        )
        for key in self.keys:  # new keys: key_iterator only yields keys already present
            d[key] = document
        return d
