"""Boxes from maps (paper Fig. 2, steps 3 and 4): ``BoxRule``, the one rule every caller applies, and the
steps it is made of (threshold values, binarisation, connected components, bounding rectangles).

Pixels and boxes follow ``custom.localisation.grid``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from custom.localisation.grid import _as_tensor, grid_boxes_to_image

ThresholdMode = Literal["percentile", "absolute"]
ComponentMode = Literal["largest", "max", "union"]
THRESHOLD_MODES = ("percentile", "absolute")
COMPONENT_MODES = ("largest", "max", "union")

# Maps labelled per scipy call: bounds the int32 label volume (1024 maps of 128 x 128 = 64 MiB).
_LABEL_CHUNK_PIXELS = 1 << 24


def _numpy_maps(maps) -> np.ndarray:
    """Maps as a CPU float32 or float64 array with finite values (box extraction runs on the CPU: scipy)."""
    if isinstance(maps, torch.Tensor):
        # float16 and bfloat16 (autocast outputs) become float32; numpy has no bfloat16.
        maps = maps.detach().cpu()
        maps = (maps if maps.dtype in (torch.float32, torch.float64) else maps.float()).numpy()
    maps = np.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"maps must have shape (..., h, w), got {maps.shape}")
    if maps.dtype not in (np.float32, np.float64):
        maps = maps.astype(np.float32)
    # min and max are NaN or infinite iff some value is: two fast reductions instead of an isfinite mask.
    if maps.size and not (np.isfinite(maps.min()) and np.isfinite(maps.max())):
        raise ValueError("maps contain NaN or infinite values")
    return maps


def _device_of(value) -> torch.device:
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def _numpy_values(values, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Per-map float64 values broadcast to ``shape``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        return np.broadcast_to(np.asarray(values, dtype=np.float64), shape)
    except ValueError as error:
        raise ValueError(f"{name} of shape {np.shape(values)} does not broadcast to the maps' {shape}") \
            from error


def _check_quantiles(quantiles: np.ndarray) -> None:
    defined = quantiles[~np.isnan(quantiles)]
    if ((defined < 0) | (defined > 1)).any():
        raise ValueError(f"percentile thresholds must lie in [0, 1] (0.9 = 90th percentile), "
                         f"got {np.unique(defined).tolist()}")


def _interpolate_sorted(ordered: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Quantiles (shape ordered.shape[:-1], in [0, 1]) of sorted values, interpolated as numpy's default."""
    position = quantiles * (ordered.shape[-1] - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, ordered.shape[-1] - 1)
    low_values = np.take_along_axis(ordered, low[..., None], -1)[..., 0].astype(np.float64)
    high_values = np.take_along_axis(ordered, high[..., None], -1)[..., 0].astype(np.float64)
    return low_values + (position - low) * (high_values - low_values)


def map_quantiles(maps, quantiles) -> torch.Tensor:
    """Return quantiles of each map's values, sorting each map once whatever the number of quantiles.

    Args:
        maps: (..., h, w) float maps.
        quantiles: (Q,) values in [0, 1] (0.9 = the 90th percentile); linear interpolation between order
            statistics, as ``numpy.quantile``'s default.

    Returns:
        (Q, ...) float64 threshold values, one per quantile and map, on the maps' device.
    """
    device = _device_of(maps)
    maps = _numpy_maps(maps)
    q = np.asarray(quantiles.cpu() if isinstance(quantiles, torch.Tensor) else quantiles, np.float64).ravel()
    if np.isnan(q).any():
        raise ValueError("quantiles contain NaN")
    _check_quantiles(q)
    # numpy's float sort is vectorised (SIMD) and an order of magnitude faster than torch's on the CPU.
    ordered = np.sort(maps.reshape(*maps.shape[:-2], -1), axis=-1)
    values = [_interpolate_sorted(ordered, np.full(maps.shape[:-2], quantile)) for quantile in q]
    return torch.from_numpy(np.stack(values).reshape(len(q), *maps.shape[:-2])).to(device)


def threshold_values(maps, thresholds, mode: ThresholdMode = "percentile") -> torch.Tensor:
    """Turn per-map thresholds into absolute values.

    Args:
        maps: (..., h, w) float maps.
        thresholds: broadcastable to (...): absolute values, or quantiles in [0, 1] of each map's own values
            (``mode="percentile"``). NaN means "no threshold" and gives NaN (an empty mask downstream).
        mode: "percentile" or "absolute".

    Returns:
        (...) float64 absolute thresholds, on the maps' device.
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    device = _device_of(maps)
    maps = _numpy_maps(maps)
    values = _numpy_values(thresholds, maps.shape[:-2], "thresholds")
    if mode == "percentile":
        _check_quantiles(values)
        missing = np.isnan(values)
        ordered = np.sort(maps.reshape(*maps.shape[:-2], -1), axis=-1)
        values = np.where(missing, np.nan, _interpolate_sorted(ordered, np.where(missing, 0.0, values)))
    return torch.from_numpy(np.array(values, dtype=np.float64)).to(device)


def _binarise(maps: np.ndarray, values: np.ndarray, minima: np.ndarray | None = None) -> np.ndarray:
    """``binarise`` on checked maps and broadcast float64 values, as one comparison in the maps' dtype;
    ``minima`` are the maps' minima when already known."""
    strict = values <= (maps.min(axis=(-2, -1)) if minima is None else minima)
    # For maps of dtype T: x >= v <=> x >= (smallest T >= v), and x > v <=> x >= (smallest T > v). One
    # comparison in T, exact against the float64 thresholds, without a float64 copy of the maps.
    nearest = values.astype(maps.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        at_least = np.where(nearest < values, np.nextafter(nearest, maps.dtype.type(np.inf)), nearest)
        above = np.where(nearest <= values, np.nextafter(nearest, maps.dtype.type(np.inf)), nearest)
        return maps >= np.where(strict, above, at_least)[..., None, None]


def binarise(maps, values) -> torch.Tensor:
    """Threshold each map at its absolute value: map >= value, or map > value when value <= the map's min.

    The strict comparison at the minimum (as in the authors' code) keeps a threshold that falls on a map's
    floor, e.g. the zeros of a Det map outside every proposal, from selecting the whole image; a constant
    map thus gives an empty mask.

    Args:
        maps: (..., h, w) float maps.
        values: broadcastable to (...), absolute thresholds (``threshold_values``); NaN gives an empty mask.

    Returns:
        (..., h, w) bool masks, on the maps' device.
    """
    device = _device_of(maps)
    maps = _numpy_maps(maps)
    return torch.from_numpy(_binarise(maps, _numpy_values(values, maps.shape[:-2], "values"))).to(device)


def _label_structure(connectivity: int) -> np.ndarray:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    plane = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    # Stacked maps are labelled in one call: neighbours only within a plane, never across maps.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = plane
    return structure


def _check_component(component: str) -> None:
    if component not in COMPONENT_MODES:
        raise ValueError(f"component must be one of {COMPONENT_MODES}, got {component!r}")


def _largest_labels(labels: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Label of the largest component of each of the (m, h, w) labelled maps (0 if none); ``masks`` are
    the labelled (m, h, w) bool masks.

    scipy numbers components in the order their first pixel is met in a C-order scan, so the labels of map
    i form the contiguous range (last label of maps < i, last label of maps <= i]. Ties in size go to the
    lowest label, the component met first in row-major order.
    """
    flat = labels.reshape(labels.shape[0], -1)
    last = np.maximum.accumulate(flat.max(axis=1))  # (m,) highest label up to each map
    chosen = np.zeros(labels.shape[0], dtype=labels.dtype)
    if last[-1] == 0:
        return chosen
    # Counting foreground pixels only: the long runs of background zeros make bincount several times slower.
    sizes = np.bincount(labels[masks], minlength=int(last[-1]) + 1)[1:]
    first = np.r_[0, last[:-1]]  # labels first+1 .. last belong to map i
    owner = np.searchsorted(last, np.arange(1, last[-1] + 1), side="left")
    # Per map, the largest size: stable sort by (owner, -size) puts it first in each owner's run.
    order = np.lexsort((-sizes, owner))
    has = last > first
    starts = np.searchsorted(owner[order], np.flatnonzero(has), side="left")
    chosen[has] = order[starts] + 1
    return chosen


def _keep_component(masks: np.ndarray, component: str, structure: np.ndarray, peaks: np.ndarray | None):
    """The chosen component of each (m, h, w) bool mask, as a new (m, h, w) bool array."""
    kept = np.empty_like(masks)
    num_maps, height, width = masks.shape
    chunk = max(1, _LABEL_CHUNK_PIXELS // (height * width))
    for start in range(0, num_maps, chunk):
        part = slice(start, start + chunk)
        labels, _ = ndimage.label(masks[part], structure=structure)
        if component == "max":
            # The first maximum lies in the mask whenever the mask is not empty (see binarise).
            flat = labels.reshape(labels.shape[0], -1)
            chosen = flat[np.arange(flat.shape[0]), peaks[part]]
        else:
            chosen = _largest_labels(labels, masks[part])
        chosen = np.where(chosen > 0, chosen, -1)  # -1 matches no pixel: an empty mask stays empty
        np.equal(labels, chosen[:, None, None], out=kept[part])
    return kept


def _select_component(masks: np.ndarray, maps: np.ndarray | None, component: str,
                      structure: np.ndarray) -> np.ndarray:
    """``select_component`` on checked numpy inputs."""
    if component == "union":
        return masks
    height, width = masks.shape[-2:]
    stack = masks.reshape(-1, height, width)
    peaks = maps.reshape(stack.shape[0], -1).argmax(axis=1) if component == "max" else None
    return _keep_component(stack, component, structure, peaks).reshape(masks.shape)


def select_component(
    masks, maps=None, component: ComponentMode = "largest", connectivity: int = 8
) -> torch.Tensor:
    """Keep one connected component of each mask (or all of them).

    Args:
        masks: (..., h, w) bool masks (``binarise``).
        maps: (..., h, w) the maps the masks came from; needed for ``component="max"``.
        component: "largest" (the paper: the component with the most pixels; ties -> the one met first in
            row-major order), "max" (the component holding the map's first row-major maximum; the authors'
            "split"), or "union" (every masked pixel; the authors' "union").
        connectivity: 8 (diagonal neighbours connect, as the contours of the authors' OpenCV code) or 4.

    Returns:
        (..., h, w) bool masks, on the masks' device.
    """
    device = _device_of(masks)
    masks = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks)
    _check_component(component)
    structure = _label_structure(connectivity)
    if masks.dtype != bool or masks.ndim < 2:
        raise ValueError(f"masks must be bool (..., h, w), got {masks.dtype} {masks.shape}")
    if component == "max":
        if maps is None:
            raise ValueError('component="max" needs the maps the masks came from')
        maps = _numpy_maps(maps)
        if maps.shape != masks.shape:
            raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    return torch.from_numpy(_select_component(masks, maps, component, structure)).to(device)


def _mask_boxes(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    height, width = masks.shape[-2:]
    rows = masks.any(axis=-1)
    cols = masks.any(axis=-2)
    valid = rows.any(axis=-1)
    # argmax returns the first maximum: the first occupied row/column, from either end.
    r0 = rows.argmax(axis=-1)
    r1 = height - rows[..., ::-1].argmax(axis=-1)
    c0 = cols.argmax(axis=-1)
    c1 = width - cols[..., ::-1].argmax(axis=-1)
    boxes = np.stack([c0, r0, c1, r1], axis=-1).astype(np.float32)
    boxes[~valid] = np.nan
    return boxes, valid


def mask_boxes(masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest rectangle covering each mask's pixels, in map pixels.

    Args:
        masks: (..., h, w) bool.

    Returns:
        boxes (..., 4) float32 xyxy in map pixels, pixel edges included: rows r0..r1-1 and columns
        c0..c1-1 give [c0, r0, c1, r1]; NaN rows for empty masks.
        valid (...) bool, False for empty masks; both on the masks' device.
    """
    device = _device_of(masks)
    masks = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks)
    if masks.dtype != bool or masks.ndim < 2:
        raise ValueError(f"masks must be bool (..., h, w), got {masks.dtype} {masks.shape}")
    boxes, valid = _mask_boxes(masks)
    return torch.from_numpy(boxes).to(device), torch.from_numpy(valid).to(device)


def grid_boxes(maps, values, component: ComponentMode = "largest",
               connectivity: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``binarise``, ``select_component`` and ``mask_boxes`` in one call.

    Args:
        maps: (..., h, w) float maps.
        values: broadcastable to (...), ABSOLUTE thresholds (``threshold_values`` or ``map_quantiles``).
        component, connectivity: as ``select_component``.

    Returns:
        boxes (..., 4) float32 xyxy in map pixels (NaN rows where empty), valid (...) bool; on the maps'
        device.
    """
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    boxes, valid = grid_boxes_per_threshold(maps, values[None], component, connectivity)
    return boxes[0], valid[0]


def grid_boxes_per_threshold(maps, values, component: ComponentMode = "largest", connectivity: int = 8,
                             workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_boxes`` for Q sets of thresholds at once (a calibration sweep), the maps checked once.

    Args:
        maps: (..., h, w) float maps.
        values: (Q, ...) ABSOLUTE thresholds, each values[q] broadcastable to (...) (``map_quantiles``).
        component, connectivity: as ``select_component``.
        workers: threads running the Q thresholds in parallel (scipy's labelling and numpy release the
            GIL); None: one per CPU core, at most Q. Results do not depend on it.

    Returns:
        boxes (Q, ..., 4) float32 xyxy in map pixels (NaN rows where empty), valid (Q, ...) bool; on the
        maps' device.
    """
    device = _device_of(maps)
    maps = _numpy_maps(maps)
    _check_component(component)
    structure = _label_structure(connectivity)
    values = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if values.ndim < 1:
        raise ValueError("values must have a leading threshold axis (Q, ...)")
    values = _numpy_values(values, (values.shape[0], *maps.shape[:-2]), "values")
    minima = maps.min(axis=(-2, -1))

    def boxes_at(row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _mask_boxes(_select_component(_binarise(maps, row, minima), maps, component, structure))

    workers = min(len(values), os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1 or len(values) == 1:
        results = [boxes_at(row) for row in values]
    else:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(boxes_at, values))
    boxes, valid = zip(*results)
    return torch.from_numpy(np.stack(boxes)).to(device), torch.from_numpy(np.stack(valid)).to(device)


def box_scores(maps, map_boxes) -> torch.Tensor:
    """Mean of each map over the map pixels inside its box, by an integral image (no per-box loop).

    Args:
        maps: (..., h, w) float maps; map_boxes: (..., 4) xyxy in MAP pixels, integer-valued
            (``MapBoxes.map_boxes``), NaN rows for no box.

    Returns:
        (...) float32; NaN where the box is missing or empty.
    """
    maps = torch.as_tensor(maps)
    map_boxes = torch.as_tensor(map_boxes)
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


@dataclass(frozen=True)
class MapBoxes:
    """What the box rule gives for maps of leading shape (...) (e.g. (B, K)), with a leading Q axis for
    ``BoxRule.boxes_per_threshold``.

    boxes: (..., 4) float32 xyxy in ORIGINAL image pixels, inside [0, W] x [0, H]; NaN rows where no box.
    map_boxes: (..., 4) float32 xyxy in map pixels (integer-valued, pixel edges); NaN rows where no box.
    valid: (...) bool, a box was found.
    """

    boxes: torch.Tensor
    map_boxes: torch.Tensor
    valid: torch.Tensor


def _sizes_for(original_sizes, lead_shape: tuple[int, ...]) -> torch.Tensor:
    """(H, W) per map as float64 (*prefix, 1, ..., 1, 2), broadcastable to (*lead_shape, 2): the sizes may
    be one (2,) pair, or one pair per entry of a prefix of the maps' leading dims (e.g. (B, 2) for (B, K))."""
    sizes = _as_tensor(original_sizes, "original_sizes", torch.float64).cpu()
    prefix = tuple(sizes.shape[:-1])
    if sizes.shape[-1:] != (2,) or tuple(lead_shape[: len(prefix)]) != prefix or (sizes <= 0).any():
        raise ValueError(f"original_sizes must be positive (H, W) pairs of shape (2,) or (*prefix, 2) for maps "
                         f"of leading shape {tuple(lead_shape)}, got {tuple(sizes.shape)}")
    return sizes.reshape(*prefix, *([1] * (len(lead_shape) - len(prefix))), 2)


def _image_boxes(map_boxes: torch.Tensor, grid_size, sizes: torch.Tensor) -> torch.Tensor:
    boxes = grid_boxes_to_image(map_boxes.cpu(), grid_size, sizes)
    # Float rounding of the scale may step past the border by ~1e-5 px: the contract is "inside the image".
    return torch.minimum(boxes.clamp(min=0), torch.cat([sizes.flip(-1)] * 2, -1).float())


@dataclass(frozen=True)
class BoxRule:
    """The paper's box rule (Fig. 2, steps 3 and 4): threshold each map, keep one connected component, take
    its bounding rectangle, and express it in the original image's pixels (``custom.localisation.grid``).

    Every caller (inference, the threshold sweep of the evaluation, the report's pictures, benchmarks) applies
    boxes through this class, with one threshold per map (``boxes``) or many candidates at once
    (``boxes_per_threshold``, which sorts each map once for all percentile candidates).

    Args:
        mode: "percentile" (thresholds are quantiles in [0, 1] of each map's own values; 0.9 = the 90th
            percentile, the authors' default) or "absolute" (map values).
        component: "largest" (the paper), "max" (the component holding the map's peak; the authors' "split")
            or "union" (every thresholded pixel; the authors' "union"). See ``select_component``.
        connectivity: 8 (diagonal neighbours connect, as the authors' OpenCV contours) or 4.
    """

    mode: ThresholdMode = "percentile"
    component: ComponentMode = "largest"
    connectivity: int = 8

    def __post_init__(self) -> None:
        if self.mode not in THRESHOLD_MODES:
            raise ValueError(f"mode must be one of {THRESHOLD_MODES}, got {self.mode!r}")
        _check_component(self.component)
        _label_structure(self.connectivity)

    def boxes(self, maps, thresholds, original_sizes) -> MapBoxes:
        """One box per map.

        Args:
            maps: (..., h, w) Sal, Det or Mix maps (tensor or ndarray), e.g. (B, K, h, w) or (K, h, w).
            thresholds: broadcastable to (...), e.g. (K,) per class, in ``mode``'s units; NaN: no box.
            original_sizes: (H, W) of the original image(s): (2,), or one pair per leading entry, e.g. (B, 2).

        Returns:
            ``MapBoxes`` of leading shape (...), on the CPU.
        """
        checked = _numpy_maps(maps)
        sizes = _sizes_for(original_sizes, checked.shape[:-2])
        values = threshold_values(checked, thresholds, self.mode)
        map_boxes, valid = grid_boxes(checked, values, self.component, self.connectivity)
        return MapBoxes(_image_boxes(map_boxes, checked.shape[-2:], sizes), map_boxes.cpu(), valid.cpu())

    def boxes_per_threshold(self, maps, candidates, original_sizes, workers: int | None = None) -> MapBoxes:
        """One box per map for each of Q candidate thresholds (a threshold sweep), the maps checked once.

        Args:
            maps, original_sizes: as ``boxes``.
            candidates: (Q,) thresholds in ``mode``'s units, each applied to every map.
            workers: threads running the candidates in parallel (``grid_boxes_per_threshold``).

        Returns:
            ``MapBoxes`` of leading shape (Q, ...), on the CPU.
        """
        checked = _numpy_maps(maps)
        sizes = _sizes_for(original_sizes, checked.shape[:-2])
        candidates = np.asarray(candidates, dtype=np.float64).reshape(-1)
        if self.mode == "percentile":
            values = map_quantiles(checked, candidates)
        else:
            values = torch.as_tensor(candidates).reshape(-1, *([1] * (checked.ndim - 2)))
        map_boxes, valid = grid_boxes_per_threshold(checked, values, self.component, self.connectivity, workers)
        return MapBoxes(_image_boxes(map_boxes, checked.shape[-2:], sizes), map_boxes.cpu(), valid.cpu())
