"""Model -> maps -> boxes -> findings (paper Fig. 2), for a batch of images; the entry point other code calls.

``predict_findings(network, images, original_sizes, calibration)`` returns one JSON-ready dict per image
(the MONAI Label app, the DICOM writer and the bundle's inference all use it); ``predict`` returns the same as
tensors, with the maps, for writers that also draw or save them.

Conventions: ``images`` are the model inputs (B, 3, S, S), each the WHOLE original image resized (stretched)
to S x S and ImageNet-normalised; ``original_sizes`` are the (H, W) of the files; boxes come out as float xyxy
in ORIGINAL image pixels, origin at the top-left corner, inside [0, W] x [0, H].
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from custom.inference.boxes import grid_boxes, grid_boxes_to_image, threshold_values
from custom.inference.calibration_file import LOGITS, MAP_NAMES, Calibration
from custom.inference.maps import rpsal_maps
from custom.weights_file import load_weights_file


@dataclass
class Prediction:
    """Everything inference computes for B images, K classes, maps of h x w.

    probabilities: (B, K) float32 in [0, 1], from the ``logits`` named.
    positive: (B, K) bool, probability >= the class's decision threshold.
    decision_thresholds: (K,) float64 probabilities.
    maps: {"sal", "det", "mix"}: (B, K, h, w) float32 on the CPU.
    map_name: the map the boxes come from.
    boxes: (B, K, 4) float32 xyxy in ORIGINAL image pixels, NaN rows where the map gave no box.
    valid: (B, K) bool, a box was found.
    scores: (B, K) float32: mean of the map over the map pixels inside the box (NaN where no box).
    box_thresholds: (K,) float64 thresholds applied (``calibration.mode`` units); threshold_sources: (K,) str.
    logits: "image" or "combined".
    """

    probabilities: torch.Tensor
    positive: torch.Tensor
    decision_thresholds: np.ndarray
    maps: dict[str, torch.Tensor]
    map_name: str
    boxes: torch.Tensor
    valid: torch.Tensor
    scores: torch.Tensor
    box_thresholds: np.ndarray
    threshold_sources: list[str]
    logits: str


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike, device=None) -> torch.nn.Module:
    """Load an RpSalNet state dict (``model.pt`` of training) into ``network`` and put it in eval mode.

    Raises FileNotFoundError / RuntimeError naming the file when it is missing or does not fit the network
    (e.g. the network sizes in the config differ from the trained ones), and CheckpointFileError (a
    RuntimeError) when it holds pickled objects other than tensors (refused, never run) or is corrupt.
    Returns the network.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: model checkpoint not found (train first, or set ckpt_path)")
    state = load_weights_file(path, map_location=device or "cpu")  # weights_only: runs no code from the file
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(
            f"{path}: the checkpoint does not fit the configured network (are the network "
            f"sizes those it was trained with?): {str(error)[:600]}"
        ) from error
    return network.eval()


def file_digest(path: str | os.PathLike, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of a file (identifies the model in the outputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def network_outputs(network: torch.nn.Module, images: torch.Tensor, inferer: Callable | None = None):
    """The full RpSalOutput of ``network`` on ``images`` (B, 3, S, S), detection module included.

    Works with RpSalNet (``forward(x, with_detection)``) and RpSalProbabilities (``outputs``); ``inferer``
    (MONAI's, e.g. SimpleInferer) is called as ``inferer(images, fn, with_detection=True)``.
    """
    function = getattr(network, "outputs", network)
    if inferer is not None:
        return inferer(images, function, with_detection=True)
    return function(images, with_detection=True)


def box_scores(maps: torch.Tensor, map_boxes: torch.Tensor) -> torch.Tensor:
    """Mean of each map over the map pixels inside its box, by an integral image (no per-box loop).

    Args:
        maps: (..., h, w) float maps; map_boxes: (..., 4) xyxy in MAP pixels, integer-valued (``grid_boxes``),
            NaN rows for no box.

    Returns:
        (...) float32; NaN where the box is missing or empty.
    """
    height, width = maps.shape[-2:]
    integral = torch.zeros(*maps.shape[:-2], height + 1, width + 1, dtype=torch.float64, device=maps.device)
    integral[..., 1:, 1:] = maps.double().cumsum(-1).cumsum(-2)
    missing = torch.isnan(map_boxes).any(-1)
    corners = torch.nan_to_num(map_boxes).round().long().to(maps.device)
    c0, r0, c1, r1 = corners.unbind(-1)
    flat = integral.flatten(-2)
    stride = width + 1

    def at(rows, cols):
        return flat.gather(-1, (rows * stride + cols)[..., None])[..., 0]

    total = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
    area = ((r1 - r0) * (c1 - c0)).double()
    mean = torch.where(area > 0, total / area.clamp(min=1), torch.nan)
    return torch.where(missing, torch.nan, mean).float()


def predict_from_outputs(
    output, input_size, original_sizes, calibration: Calibration, map_name: str = "mix", logits: str = "image"
) -> Prediction:
    """``predict`` from network outputs already computed (an RpSalOutput with the detection module's fields).

    Args:
        output: RpSalOutput of B images of ``input_size`` (S or (H, W)).
        original_sizes: (B, 2) (H, W) of the original images (tensor, array or list).
        calibration, map_name, logits: as ``predict``.
    """
    if map_name not in MAP_NAMES:
        raise ValueError(f"map must be one of {MAP_NAMES}, got {map_name!r}")
    if logits not in LOGITS:
        raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")
    if output.proposal_logits is None:
        raise ValueError("the network output has no detection fields: run it with with_detection=True")
    chosen = output.image_logits if logits == "image" else output.combined_logits
    probabilities = torch.sigmoid(chosen.detach().float()).cpu()
    maps = rpsal_maps(
        output.saliency_logits.detach().float(),
        output.proposal_logits.detach().float(),
        output.refined_boxes.detach().float(),
        input_size,
        calibration.weighting,
        calibration.normalize,
        calibration.sharpness,
    )
    maps = {name: value.cpu() for name, value in maps.items()}
    chosen_map = maps[map_name]
    sizes = torch.as_tensor(np.asarray(original_sizes, dtype=np.float64)).reshape(-1, 2)
    if len(sizes) != chosen_map.shape[0]:
        raise ValueError(f"original_sizes has {len(sizes)} rows for {chosen_map.shape[0]} images")
    thresholds = calibration.box_threshold_vector(map_name)
    if len(thresholds) != chosen_map.shape[1]:
        raise ValueError(f"the calibration has {len(thresholds)} classes, the network {chosen_map.shape[1]}")
    values = threshold_values(chosen_map, thresholds, calibration.mode)
    map_boxes, valid = grid_boxes(chosen_map, values, calibration.component, calibration.connectivity)
    boxes = grid_boxes_to_image(map_boxes, chosen_map.shape[-2:], sizes[:, None, :])
    # Float rounding of the scale may step past the border by ~1e-5 px: the contract is "inside the image".
    boxes = torch.minimum(boxes.clamp(min=0), torch.cat([sizes.flip(-1)] * 2, -1)[:, None, :].float())
    decision = calibration.decision_threshold_vector(logits)
    return Prediction(
        probabilities=probabilities,
        positive=probabilities >= torch.as_tensor(decision, dtype=torch.float32),
        decision_thresholds=decision,
        maps=maps,
        map_name=map_name,
        boxes=boxes,
        valid=valid,
        scores=box_scores(chosen_map, map_boxes),
        box_thresholds=thresholds,
        threshold_sources=calibration.box_threshold_sources(map_name),
        logits=logits,
    )


@torch.no_grad()
def predict(
    network: torch.nn.Module,
    images: torch.Tensor,
    original_sizes,
    calibration: Calibration,
    map_name: str = "mix",
    logits: str | None = None,
    inferer: Callable | None = None,
) -> Prediction:
    """Probabilities, decisions, maps and one box per class for a batch.

    Args:
        network: RpSalNet or RpSalProbabilities, in eval mode, on the device of ``images``.
        images: (B, 3, S, S) model inputs (module docstring).
        original_sizes: (B, 2) (H, W) of each original image.
        calibration: thresholds and box rule (``custom.inference.calibration_file``).
        map_name: "sal", "det" or "mix" (the paper's best, default).
        logits: "image" (the paper's y) or "combined" (y + z); None: the network's ``logits`` attribute
            (RpSalProbabilities), else "image".
        inferer: optional MONAI inferer.

    Returns:
        ``Prediction``.
    """
    logits = logits or getattr(network, "logits", "image")
    output = network_outputs(network, images, inferer)
    return predict_from_outputs(output, images.shape[-2:], original_sizes, calibration, map_name, logits)


def findings_json(prediction: Prediction, index: int, class_names=None) -> dict:
    """The JSON-ready result of image ``index`` of a Prediction (no file paths; the caller adds them).

    Returns:
        {"probabilities": {class: p}, "decision_thresholds": {class: t}, "positive": [classes],
         "findings": [{"class", "probability", "box" [x0, y0, x1, y1] original pixels, "box_format": "xyxy",
                       "score", "map", "box_threshold", "threshold_source"}] for each positive class whose
         map gave a box (classes in network order), "positive_without_box": [classes]}.
    """
    names = list(class_names) if class_names is not None else None
    probabilities = prediction.probabilities[index].tolist()
    names = names or [str(k) for k in range(len(probabilities))]
    positive = prediction.positive[index].tolist()
    findings, without_box = [], []
    for k, name in enumerate(names):
        if not positive[k]:
            continue
        if not bool(prediction.valid[index, k]):
            without_box.append(name)
            continue
        findings.append(
            {
                "class": name,
                "probability": round(float(probabilities[k]), 6),
                "box": [round(float(v), 3) for v in prediction.boxes[index, k].tolist()],
                "box_format": "xyxy",
                "score": round(float(prediction.scores[index, k]), 6),
                "map": prediction.map_name,
                "box_threshold": float(prediction.box_thresholds[k]),
                "threshold_source": prediction.threshold_sources[k],
            }
        )
    return {
        "probabilities": {name: round(float(p), 6) for name, p in zip(names, probabilities)},
        "decision_thresholds": {
            name: round(float(t), 6) for name, t in zip(names, prediction.decision_thresholds)
        },
        "positive": [name for name, flag in zip(names, positive) if flag],
        "findings": findings,
        "positive_without_box": without_box,
    }


def predict_findings(
    network: torch.nn.Module,
    images: torch.Tensor,
    original_sizes,
    calibration: Calibration,
    map_name: str = "mix",
    logits: str | None = None,
    inferer: Callable | None = None,
) -> list[dict]:
    """One findings dict per image (``findings_json``): the function the MONAI Label app and DICOM writer use.

    Args:
        network, images (B, 3, S, S), original_sizes (B, 2) (H, W), calibration, map_name, logits, inferer:
            as ``predict``.

    Returns:
        B dicts, boxes float xyxy in ORIGINAL image pixels.
    """
    prediction = predict(network, images, original_sizes, calibration, map_name, logits, inferer)
    return [findings_json(prediction, b, calibration.class_names) for b in range(images.shape[0])]
