"""Time the localisation evaluation at the scale of NIH's box set, on synthetic data.

880 images x 8 classes by default: network outputs at 512 px (saliency logits at 128 x 128 and 395
proposals), the Sal/Det/Mix maps, then for each map the threshold calibration over a grid of candidate
percentiles (paper protocol and two-fold), cDice and T(IoU). 984 random boxes as NIH's by default;
--num_boxes=7040 gives every image a box of every class, an upper bound. The synthetic maps are smooth fields
(bicubic-upsampled noise), closer to real saliency than white noise, which would only time the labelling of
thousands of specks.

Usage: python scripts/benchmark_eval.py [--num_images=880] [--num_classes=8] [--num_boxes=984]
       [--input_size=512] [--num_thresholds=10] [--component=largest] [--seed=0] [--threads=1]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.localisation.maps import rpsal_maps  # noqa: E402
from custom.labels import BOX_CLASS_NAMES  # noqa: E402
from custom.metrics import choose_box_thresholds, gt_box_dice, percentile_grid  # noqa: E402


def synthetic_outputs(num_images: int, num_classes: int, input_size: int, num_proposals: int,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random network outputs: smooth saliency logits (B, K, S/4, S/4), proposal logits (B, K, N) and
    refined boxes (B, K, N, 4) xyxy in input pixels."""
    grid = input_size // 4
    coarse = torch.randn(num_images, num_classes, grid // 16, grid // 16, generator=generator)
    saliency = 3 * F.interpolate(coarse, size=(grid, grid), mode="bicubic", align_corners=False)
    centres = torch.rand(num_images, num_classes, num_proposals, 2, generator=generator) * input_size
    sizes = torch.rand(num_images, num_classes, num_proposals, 2, generator=generator) * 0.45 + 0.05
    sizes = sizes * input_size
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1).clamp(0, input_size)
    logits = 2 * torch.randn(num_images, num_classes, num_proposals, generator=generator)
    return {"saliency_logits": saliency, "proposal_logits": logits, "refined_boxes": boxes}


def synthetic_ground_truth(num_images: int, num_classes: int, num_boxes: int, rng: np.random.Generator):
    """Random boxes in 1024 x 1024 originals (NIH's size), at most one per image and class, every image with
    at least one; about 1.2 images per patient (NIH's 880 box images come from 726 patients)."""
    if not num_images <= num_boxes <= num_images * num_classes:
        raise ValueError(f"num_boxes must lie in [{num_images}, {num_images * num_classes}], got {num_boxes}")
    # A random class order per image; image i takes its first 1, 2, ... classes, the extras spread at random.
    per_image = np.ones(num_images, dtype=np.int64)
    extra = rng.choice(num_images * (num_classes - 1), size=num_boxes - num_images, replace=False)
    per_image += np.bincount(extra % num_images, minlength=num_images)
    class_order = np.argsort(rng.random((num_images, num_classes)), axis=1)
    gt_image = np.repeat(np.arange(num_images), per_image)
    gt_class = np.concatenate([class_order[i, :n] for i, n in enumerate(per_image)])
    corner = rng.uniform(0, 700, size=(num_boxes, 2))
    size = rng.uniform(30, 320, size=(num_boxes, 2))
    gt_boxes = np.concatenate([corner, corner + size], axis=1)
    original_sizes = np.full((num_images, 2), 1024.0)
    patient_ids = rng.integers(0, max(2, round(num_images / 1.2)), size=num_images)
    return gt_image, gt_class, gt_boxes, original_sizes, patient_ids


def main(num_images: int = 880, num_classes: int = 8, num_boxes: int = 984, input_size: int = 512,
         num_thresholds: int = 10, component: str = "largest", seed: int = 0, batch_size: int = 40,
         threads: int = 1) -> None:
    """Run the benchmark; print the time of each step and the total.

    num_boxes: ground truths, one per (image, class) at most; NIH has 984 on 880 images, and
        num_images * num_classes (7040) boxes every map (an upper bound).
    threads: torch CPU threads. One by default: the box extraction (scipy, numpy) is single-threaded
        anyway, and the small memory-bound torch steps ran 2-4x slower on two threads than on one when
        other processes shared the two cores.
    """
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    class_names = BOX_CLASS_NAMES[:num_classes] if num_classes <= len(BOX_CLASS_NAMES) else \
        tuple(f"class{k}" for k in range(num_classes))
    outputs = synthetic_outputs(num_images, num_classes, input_size, 395, generator)
    gt_image, gt_class, gt_boxes, original_sizes, patient_ids = synthetic_ground_truth(
        num_images, num_classes, num_boxes, rng)
    candidates = percentile_grid(0.6, 0.96, num_thresholds)

    start = time.perf_counter()
    maps = {"sal": [], "det": [], "mix": []}
    for first in range(0, num_images, batch_size):
        part = slice(first, first + batch_size)
        batch_maps = rpsal_maps(outputs["saliency_logits"][part], outputs["proposal_logits"][part],
                                outputs["refined_boxes"][part], input_size)
        for name, value in batch_maps.items():
            maps[name].append(value)
    maps = {name: torch.cat(parts) for name, parts in maps.items()}
    timings = {"maps": time.perf_counter() - start}
    print(f"{num_images} images x {num_classes} classes, {len(gt_image)} boxes, maps "
          f"{tuple(maps['sal'].shape[-2:])}, {num_thresholds} percentile thresholds, component={component}")
    for name, values in maps.items():
        step = time.perf_counter()
        dice = gt_box_dice(values, gt_image, gt_class, gt_boxes, original_sizes).numpy()
        result = choose_box_thresholds(values, gt_image, gt_class, gt_boxes, original_sizes, patient_ids,
                                          class_names, candidates, "percentile", component, dice=dice)
        timings[name] = time.perf_counter() - step
        paper, honest = result.all_images.summary, result.two_fold.summary
        print(f"  {name}: {timings[name]:.2f} s; mean IoU {paper['iou']['mean']:.3f} (paper protocol) "
              f"{honest['iou']['mean']:.3f} (two-fold); cDice {paper['cdice']['mean']:.3f}; "
              f"T(0.5) {paper['t_iou']['0.5']['mean']:.3f}")
    total = time.perf_counter() - start
    print(f"maps {timings['maps']:.2f} s; total {total:.2f} s on {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    fire.Fire(main)
