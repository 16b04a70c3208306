"""The three localisation maps of the paper's ablation (Sec. 3.2, Fig. 2): Sal, Det (xRPN) and Mix (xFS).

All maps live on the saliency grid, 1/4 of the model input (h x w = S/4 x S/4). The refined proposals are
xyxy boxes in model-input pixels; a box covers map pixel (i, j) when the pixel's centre
((j + 0.5) S/w, (i + 0.5) S/h) lies in [x0, x1) x [y0, y1) (``custom.localisation.grid`` states the grid
convention in full).

Det weighting. The paper calls xRPN "the average of all refined region proposals weighted by their
confidence": xRPN(k) = sum_n c(n, k) * mask(n, k) / sum_n c(n, k), which is ``weighting="sigmoid",
normalize=True`` (the default), in [0, 1]. The authors' public code instead sums the RAW (pre-sigmoid)
confidences of the boxes covering each pixel (``weighting="raw", normalize=False``); such a map has an
arbitrary sign and scale, so Mix min-max scales it to [0, 1] per image and class before multiplying.
Beyond the paper, ``weighting="softmax"`` weighs the boxes by softmax(r c(n, k)) over the N proposals: the
attention of the LSE pooling with sharpness r that the multiple-instance term trains the confidences through
(``custom.networks.gumbel_selection.proposal_pooling``), so Det paints the proposals that term picks. Sigmoid
weights instead give every proposal at least sigmoid(min c): with N = 395 boxes the many weak ones wash out the
few strong ones (held-out Det mean IoU of one MIL-trained demo model, docs/evaluation.md rows mil_sigmoid_det
and mil: 0.112 sigmoid, 0.202 softmax r = 5).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

from custom.localisation.grid import box_grid_ranges

# The three maps, in the order the paper's ablation lists them (Table 2: Sal, Det = xRPN, Mix = xFS).
MAP_NAMES = ("sal", "det", "mix")
Weighting = Literal["sigmoid", "raw", "softmax"]
WEIGHTINGS = ("sigmoid", "raw", "softmax")


def _pair(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be an int or (H, W) with positive sides, got {size!r}")
    return pair


def minmax_scale(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1]: (x - min) / (max - min), per map over its last two dims.

    Args:
        maps: (..., h, w) float.

    Returns:
        (..., h, w), same dtype; a constant map (max == min) carries no localisation and becomes all zeros.
    """
    low, high = torch.aminmax(maps.flatten(-2), dim=-1)
    spread = (high - low)[..., None, None]
    # A constant map has maps - low == 0 exactly, so any positive divisor leaves it at 0.
    return (maps - low[..., None, None]) / torch.where(spread > 0, spread, 1)


def saliency_map(saliency_logits: torch.Tensor, grid_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Sal = x_S: the sigmoid of the saliency logits.

    Args:
        saliency_logits: (B, K, h, w) pre-sigmoid saliency maps.
        grid_size: optional (h', w') to resize to (bilinear, align_corners=False) when the maps are needed
            on another grid; None keeps (h, w).

    Returns:
        (B, K, h, w) or (B, K, h', w') in [0, 1].
    """
    if saliency_logits.ndim != 4:
        raise ValueError(f"saliency_logits must have shape (B, K, h, w), got {tuple(saliency_logits.shape)}")
    sal = torch.sigmoid(saliency_logits)
    if grid_size is not None and tuple(sal.shape[-2:]) != _pair(grid_size, "grid_size"):
        sal = F.interpolate(sal, size=_pair(grid_size, "grid_size"), mode="bilinear", align_corners=False)
    return sal


def detection_map(
    proposal_logits: torch.Tensor,
    refined_boxes: torch.Tensor,
    input_size: int | Sequence[int],
    grid_size: int | Sequence[int],
    weighting: Weighting = "sigmoid",
    normalize: bool = True,
    sharpness: float = 1.0,
) -> torch.Tensor:
    """Det = x_RPN: the refined proposals painted on the map grid, weighted by their confidence.

    Cost O(K N + K h w) per image, whatever the box sizes: each box adds its weight at its four corners of a
    (h + 1) x (w + 1) difference array (one ``scatter_add_``), and a 2D cumulative sum turns the corners into
    filled rectangles. The accumulation runs in float64, so the result matches a per-box loop to float
    rounding of the output dtype.

    Args:
        proposal_logits: (B, K, N) pre-sigmoid confidence c(n, k) of each proposal for each class.
        refined_boxes: (B, K, N, 4) float xyxy in MODEL INPUT pixels (0..W, 0..H).
        input_size: the model input (H, W) (an int for S x S).
        grid_size: the map's (h, w), normally the saliency grid (S/4).
        weighting: "sigmoid" (weights sigmoid(c), the paper), "raw" (c itself, the authors' code) or
            "softmax" (softmax(sharpness * c) over the N proposals; beyond the paper).
        normalize: divide by the class's total weight sum_n w(n, k), making the map the weighted average of
            the box masks (in [0, 1]); only with "sigmoid", since raw weights can sum to zero or less
            ("softmax" weights sum to 1 already: the flag changes nothing there).
        sharpness: r of the "softmax" weighting (positive); unused by the others.

    Returns:
        (B, K, h, w) in the dtype of ``proposal_logits``: per pixel, the sum over the boxes covering its
        centre of their weights (divided by the total weight if ``normalize``).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if weighting == "softmax" and not (math.isfinite(sharpness) and sharpness > 0):
        raise ValueError(f"sharpness must be a positive number, got {sharpness!r}")
    if weighting == "raw" and normalize:
        raise ValueError("normalize=True needs positive weights: use weighting='sigmoid' (raw logits can sum "
                         "to zero or less; the authors' raw map is unnormalised)")
    if proposal_logits.ndim != 3 or refined_boxes.shape != (*proposal_logits.shape, 4):
        raise ValueError(f"expected proposal_logits (B, K, N) and refined_boxes (B, K, N, 4), got "
                         f"{tuple(proposal_logits.shape)} and {tuple(refined_boxes.shape)}")
    # Value checks need the data; a torch.export / ONNX trace has none (the exported program skips them).
    if not torch.compiler.is_compiling() and not torch.isfinite(proposal_logits).all():
        raise ValueError("proposal_logits contain NaN or infinite values")
    grid_h, grid_w = _pair(grid_size, "grid_size")
    input_h, input_w = _pair(input_size, "input_size")
    batch, classes, _ = proposal_logits.shape
    weights = proposal_logits.double()
    if weighting == "sigmoid":
        weights = torch.sigmoid(weights)
    elif weighting == "softmax":
        weights = torch.softmax(sharpness * weights, dim=-1)
    if normalize and weighting != "softmax":
        # Dividing the weights, not the painted map: the average costs O(K N), not O(K h w).
        total = weights.sum(dim=-1, keepdim=True)
        # Sigmoid weights only vanish by float64 underflow (logits below about -745): such a class is empty.
        weights = torch.where(total > 0, weights / torch.where(total > 0, total, 1), 0)
    r0, r1, c0, c1 = box_grid_ranges(refined_boxes.detach(), (input_h, input_w), (grid_h, grid_w))
    stride = grid_w + 1
    corners = torch.stack([r0 * stride + c0, r0 * stride + c1, r1 * stride + c0, r1 * stride + c1], dim=-1)
    signed = torch.stack([weights, -weights, -weights, weights], dim=-1)
    diff = torch.zeros(batch, classes, (grid_h + 1) * stride, dtype=torch.float64, device=weights.device)
    diff.scatter_add_(-1, corners.flatten(-2), signed.flatten(-2))
    det = diff.view(batch, classes, grid_h + 1, stride).cumsum(-1).cumsum(-2)[..., :grid_h, :grid_w]
    return det.to(proposal_logits.dtype)


def mix_map(sal: torch.Tensor, det: torch.Tensor, scale_det: bool) -> torch.Tensor:
    """Mix = x_FS = Sal * Det, element-wise.

    Args:
        sal: (B, K, h, w) saliency map in [0, 1].
        det: (B, K, h, w) detection map on the same grid.
        scale_det: min-max scale Det to [0, 1] per image and class first (needed for raw-weighted Det).

    Returns:
        (B, K, h, w).
    """
    if sal.shape != det.shape:
        raise ValueError(f"Sal {tuple(sal.shape)} and Det {tuple(det.shape)} must share a grid")
    return sal * (minmax_scale(det) if scale_det else det)


def rpsal_maps(
    saliency_logits: torch.Tensor,
    proposal_logits: torch.Tensor,
    refined_boxes: torch.Tensor,
    input_size: int | Sequence[int],
    weighting: Weighting = "sigmoid",
    normalize: bool = True,
    sharpness: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The Sal, Det and Mix maps of a batch, from the network's outputs.

    Args:
        saliency_logits: (B, K, h, w) pre-sigmoid saliency maps; their grid is the maps' grid.
        proposal_logits: (B, K, N) pre-sigmoid proposal confidences.
        refined_boxes: (B, K, N, 4) float xyxy in model input pixels.
        input_size: the model input (H, W), or S.
        weighting, normalize, sharpness: Det's weighting (``detection_map``); Det is min-max scaled inside
            Mix when the weights are raw.

    Returns:
        {"sal", "det", "mix"}: each (B, K, h, w).
    """
    sal = saliency_map(saliency_logits)
    det = detection_map(proposal_logits, refined_boxes, input_size, sal.shape[-2:], weighting, normalize,
                        sharpness)
    return {"sal": sal, "det": det, "mix": mix_map(sal, det, scale_det=weighting == "raw")}
