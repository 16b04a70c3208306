"""Boxes from maps (paper Fig. 2, steps 3 and 4) and boxes painted onto a map grid.

Grid convention, shared with ``custom.inference.maps`` and the metrics: a map of h x w pixels covers an
image of H x W pixels (the model input for the Det painting, the original image for ground truths and
predicted boxes). Map pixel (i, j) spans [j W/w, (j + 1) W/w) x [i H/h, (i + 1) H/h) of that image and its
centre is ((j + 0.5) W/w, (i + 0.5) H/h). A float xyxy box [x0, y0, x1, y1] covers map pixel (i, j) when
that centre lies in [x0, x1) x [y0, y1). Sizes are always given as (H, W), rows first.

This assumes the model input is the whole original image resized (stretched, no padding or crop) to the
input size, so that one map pixel spans the same fraction of both images.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Sequence

import numpy as np
import torch
from scipy import ndimage

ThresholdMode = Literal["percentile", "absolute"]
ComponentMode = Literal["largest", "max", "union"]
THRESHOLD_MODES = ("percentile", "absolute")
COMPONENT_MODES = ("largest", "max", "union")

# Maps labelled per scipy call: bounds the int32 label volume (1024 maps of 128 x 128 = 64 MiB).
_LABEL_CHUNK_PIXELS = 1 << 24


def _as_tensor(values, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values if dtype is None else values.to(dtype)
    try:
        return torch.as_tensor(np.asarray(values), dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name}: expected a tensor or an array, got {type(values).__name__}") from error


def _grid_size(grid_size: int | Sequence[int]) -> tuple[int, int]:
    size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(int(s) for s in grid_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"grid_size must be an int or (h, w) with positive sides, got {grid_size!r}")
    return size


def box_grid_ranges(
    boxes, image_sizes, grid_size: int | Sequence[int], min_one_pixel: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the map pixels each box covers, as half-open row and column ranges.

    Args:
        boxes: (..., 4) float xyxy in pixels of an image of size ``image_sizes``.
        image_sizes: (H, W) of that image, shape (2,) or broadcastable to (..., 2).
        grid_size: (h, w) of the map grid (an int for a square grid).
        min_one_pixel: a box that overlaps the image but, being thinner than a map pixel, contains no pixel
            centre along an axis gets the one pixel holding its centre on that axis (so that every ground
            truth has a non-empty mask); off by default, where the pure centre rule holds.

    Returns:
        (r0, r1, c0, c1), each int64 (...): the box covers rows r0 <= i < r1 and columns c0 <= j < c1
        (empty when r1 == r0 or c1 == c0); 0 <= r0 <= r1 <= h and 0 <= c0 <= c1 <= w.
    """
    boxes = _as_tensor(boxes, "boxes", torch.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4) xyxy, got {tuple(boxes.shape)}")
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or infinite coordinates")
    sizes = _as_tensor(image_sizes, "image_sizes", torch.float64).to(boxes.device)
    if sizes.shape[-1:] != (2,) or (sizes <= 0).any():
        raise ValueError(f"image_sizes must be positive (H, W) pairs, got shape {tuple(sizes.shape)}")
    grid_h, grid_w = _grid_size(grid_size)
    ranges = []
    # Column j's centre (j + 0.5) W/w is >= x0 iff j >= x0 w/W - 0.5, and < x1 iff j < x1 w/W - 0.5.
    for low, high, length, cells in ((boxes[..., 1], boxes[..., 3], sizes[..., 0], grid_h),
                                     (boxes[..., 0], boxes[..., 2], sizes[..., 1], grid_w)):
        scale = cells / length
        start = torch.ceil(low * scale - 0.5).clamp(0, cells)
        stop = torch.ceil(high * scale - 0.5).clamp(0, cells)
        stop = torch.maximum(stop, start)
        if min_one_pixel:
            thin = (stop == start) & (high > low) & (high > 0) & (low < length)
            centre_cell = torch.floor((low + high) / 2 * scale).clamp(0, cells - 1)
            start = torch.where(thin, centre_cell, start)
            stop = torch.where(thin, centre_cell + 1, stop)
        ranges += [start.long(), stop.long()]
    r0, r1, c0, c1 = ranges
    return r0, r1, c0, c1


def box_masks(
    boxes, image_sizes, grid_size: int | Sequence[int], min_one_pixel: bool = True
) -> torch.Tensor:
    """Paint each box as a binary mask on the map grid (the ground truth g of cDice).

    Args:
        boxes: (..., 4) float xyxy in pixels of the image of size ``image_sizes`` (H, W), broadcastable.
        grid_size: (h, w) of the map grid.
        min_one_pixel: see ``box_grid_ranges``; on by default so no box that overlaps the image is empty.

    Returns:
        (..., h, w) float32 mask, 1 on the map pixels whose centre lies in the box (module docstring).
    """
    r0, r1, c0, c1 = box_grid_ranges(boxes, image_sizes, grid_size, min_one_pixel)
    grid_h, grid_w = _grid_size(grid_size)
    rows = torch.arange(grid_h, device=r0.device)
    cols = torch.arange(grid_w, device=r0.device)
    in_rows = (rows >= r0[..., None]) & (rows < r1[..., None])
    in_cols = (cols >= c0[..., None]) & (cols < c1[..., None])
    return (in_rows[..., :, None] & in_cols[..., None, :]).float()


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


def grid_boxes_to_image(boxes, grid_size: int | Sequence[int], image_sizes) -> torch.Tensor:
    """Convert xyxy boxes from map pixels to pixels of an image of size ``image_sizes`` (H, W).

    Args:
        boxes: (..., 4) float xyxy in map pixels (``mask_boxes``); NaN rows stay NaN.
        grid_size: (h, w) of the map.
        image_sizes: (H, W), shape (2,) or broadcastable to (..., 2), e.g. (B, 1, 2) for (B, K, 4) boxes.

    Returns:
        (..., 4) float32 xyxy in image pixels: map column j spans [j W/w, (j + 1) W/w).
    """
    boxes = _as_tensor(boxes, "boxes", torch.float64)
    sizes = _as_tensor(image_sizes, "image_sizes", torch.float64).to(boxes.device)
    if sizes.shape[-1:] != (2,) or (sizes <= 0).any():
        raise ValueError(f"image_sizes must be positive (H, W) pairs, got shape {tuple(sizes.shape)}")
    grid_h, grid_w = _grid_size(grid_size)
    scale = torch.stack([sizes[..., 1] / grid_w, sizes[..., 0] / grid_h] * 2, dim=-1)
    return (boxes * scale).float()


def extract_boxes(
    maps,
    thresholds,
    original_sizes,
    mode: ThresholdMode = "percentile",
    component: ComponentMode = "largest",
    connectivity: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One box per image and class from maps: threshold, choose a component, take its bounding rectangle.

    Args:
        maps: (B, K, h, w) Sal, Det or Mix maps (tensor or ndarray).
        thresholds: (K,) per-class thresholds (or (B, K)): quantiles in [0, 1] of each map's values for
            ``mode="percentile"`` (0.9 = 90th percentile), map values for ``mode="absolute"``. NaN: no box.
        original_sizes: (B, 2) (H, W) of each original image, or (2,) for all.
        mode: "percentile" or "absolute".
        component: "largest" (paper), "max" or "union" (``select_component``).
        connectivity: 8 or 4 (``select_component``).

    Returns:
        boxes (B, K, 4) float32 xyxy in ORIGINAL image pixels (NaN rows where the mask is empty),
        valid (B, K) bool.
    """
    device = _device_of(maps)
    maps = _numpy_maps(maps)
    if maps.ndim != 4:
        raise ValueError(f"maps must have shape (B, K, h, w), got {maps.shape}")
    sizes = _as_tensor(original_sizes, "original_sizes", torch.float64).cpu()
    if sizes.shape not in ((2,), (maps.shape[0], 2)):
        raise ValueError(f"original_sizes must be (2,) or (B={maps.shape[0]}, 2), got {tuple(sizes.shape)}")
    map_boxes, valid = grid_boxes(maps, threshold_values(maps, thresholds, mode), component, connectivity)
    boxes = grid_boxes_to_image(map_boxes, maps.shape[-2:], sizes.reshape(-1, 1, 2))
    return boxes.to(device), valid.to(device)
