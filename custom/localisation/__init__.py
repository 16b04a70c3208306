"""Localisation: the paper's maps, the grid and box conventions, the box rule and the IoU.

The layer below inference, evaluation, metrics and DICOM: it imports nothing of MONAI and nothing of
``custom`` but ``custom.labels`` (torch, numpy and scipy only), so a deployment can take it beside an exported
model. ``docs/architecture.md`` shows where it sits in the data flow.

- ``grid``: which image's pixels, xyxy, top-left origin, map pixel <-> image pixel.
- ``maps``: Sal, Det and Mix from the network's outputs (paper Sec. 3.2, Fig. 2).
- ``box_rule``: ``BoxRule``, threshold -> component -> box in original pixels, one or many thresholds.
- ``iou``: ``box_iou`` of matched boxes.
"""

from custom.localisation.box_rule import COMPONENT_MODES, THRESHOLD_MODES, BoxRule, MapBoxes, box_scores
from custom.localisation.grid import box_grid_ranges, box_masks, grid_boxes_to_image
from custom.localisation.iou import box_iou
from custom.localisation.maps import MAP_NAMES, WEIGHTINGS, detection_map, mix_map, rpsal_maps, saliency_map

__all__ = [
    "COMPONENT_MODES",
    "MAP_NAMES",
    "THRESHOLD_MODES",
    "WEIGHTINGS",
    "BoxRule",
    "MapBoxes",
    "box_grid_ranges",
    "box_iou",
    "box_masks",
    "box_scores",
    "detection_map",
    "grid_boxes_to_image",
    "mix_map",
    "rpsal_maps",
    "saliency_map",
]
