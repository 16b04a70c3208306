"""Running the trained network over the evaluation data once, keeping what the paper's tables need.

One pass over the test split gives the image and combined logits of every test image (Table 1) and, for the
test images with boxes, the Sal, Det and Mix maps of the box classes (Tables 2, 3); one pass over the
validation split gives the logits the decision thresholds are chosen on. ``EvaluationOutputs`` holds all of
it and saves to / loads from one ``.pt`` file, so the scoring and the report can be rerun from saved maps
(``scripts/evaluate_report.py``) without the network.

Ground-truth boxes are ragged (0 to several per image), so they never go through a DataLoader: the loader
sees ``loader_items`` (image, label, original_size, index) and the boxes are read from the datalist by index.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from custom.atomic_file import atomic_output
from custom.arguments import require_booleans
from custom.localisation.maps import rpsal_maps
from custom.inference.inferer import RpSalInferer
from custom.labels import CLASS_NAMES
from custom.weights_file import load_weights_file

logger = logging.getLogger(__name__)

MAP_NAMES = ("sal", "det", "mix")
FORMAT_VERSION = 1


def loader_items(items: Sequence[dict]) -> list[dict]:
    """Datalist items reduced to what a DataLoader can collate: image, label, original_size and ``index``
    (the item's position in ``items``, to find its boxes and patient again)."""
    reduced = []
    for index, item in enumerate(items):
        entry = {"image": item["image"], "label": item["label"], "index": index}
        if "original_size" in item:
            entry["original_size"] = item["original_size"]
        reduced.append(entry)
    return reduced


@dataclass
class EvaluationOutputs:
    """What the network produced on the evaluation data (N test images, V validation images, K classes).

    test_image_logits, test_combined_logits, test_labels: (N, K) float32.
    validation_image_logits, validation_combined_logits, validation_labels: (V, K) float32.
    box_class_names: the C classes that have boxes (CLASS_NAMES order); box_class_indices: (C,) their K index.
    box_maps: {"sal", "det", "mix"}: (B, C, h, w) float32 maps of the B test images with boxes.
    box_images: (B,) paths; box_test_index: (B,) int64 index in the test split; patient_ids: (B,) str.
    original_sizes: (B, 2) float64 (H, W) of the box images.
    gt_image: (M,) int64 index in B; gt_class: (M,) int64 index in C; gt_boxes: (M, 4) float64 xyxy in
        ORIGINAL image pixels.
    input_size: S; weighting, normalize, sharpness: how Det was painted; class_names: the K classes.
    """

    test_image_logits: np.ndarray
    test_combined_logits: np.ndarray
    test_labels: np.ndarray
    validation_image_logits: np.ndarray
    validation_combined_logits: np.ndarray
    validation_labels: np.ndarray
    box_class_names: tuple[str, ...]
    box_class_indices: np.ndarray
    box_maps: dict[str, np.ndarray]
    box_images: list[str]
    box_test_index: np.ndarray
    patient_ids: list[str]
    original_sizes: np.ndarray
    gt_image: np.ndarray
    gt_class: np.ndarray
    gt_boxes: np.ndarray
    input_size: int
    weighting: str = "sigmoid"
    normalize: bool = True
    class_names: tuple[str, ...] = CLASS_NAMES
    sharpness: float = 1.0

    def save(self, path: str | os.PathLike) -> Path:
        """Write every field to one ``.pt`` file (tensors and plain containers: loads with weights_only)."""
        content = {"format_version": FORMAT_VERSION}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(np.ascontiguousarray(value))
            elif item.name == "box_maps":
                value = {name: torch.from_numpy(np.ascontiguousarray(maps)) for name, maps in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            content[item.name] = value
        path = Path(path)
        with atomic_output(path) as temp:
            torch.save(content, temp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvaluationOutputs":
        """Read a file written by ``save``; errors name the file."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: evaluation outputs not found")
        content = load_weights_file(path)  # weights_only: runs no code from the file
        if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not evaluation outputs of format {FORMAT_VERSION}")
        values = {}
        for item in fields(cls):
            if item.name not in content:
                if item.name == "sharpness":  # files written before the softmax weighting
                    continue
                raise ValueError(f"{path}: missing field {item.name!r}")
            value = content[item.name]
            if isinstance(value, torch.Tensor):
                value = value.numpy()
            elif item.name == "box_maps":
                value = {name: maps.numpy() for name, maps in value.items()}
            elif item.name in ("box_class_names", "class_names"):
                value = tuple(value)
            values[item.name] = value
        return cls(**values)


def _split_batch(batch, image_key: str = "image"):
    images = batch[image_key]
    images = images.as_tensor() if hasattr(images, "as_tensor") else torch.as_tensor(images)
    labels = batch["label"]
    labels = labels.as_tensor() if hasattr(labels, "as_tensor") else torch.as_tensor(labels)
    return images, labels.float(), torch.as_tensor(batch["index"]).long()


@torch.no_grad()
def _run_split(network, loader, device, inferer: Callable, on_batch: Callable | None = None):
    """Image and combined logits (N, K), labels (N, K) of a loader, rows in the order of ``index``, and the
    input side S."""
    image_logits, combined_logits, labels, order = [], [], [], []
    for batch in loader:
        images, batch_labels, index = _split_batch(batch)
        output = inferer(images.to(device), network)
        image_logits.append(output["image_logits"].cpu())
        combined_logits.append(output["combined_logits"].cpu())
        labels.append(batch_labels)
        order.append(index)
        if on_batch is not None:
            on_batch(output, index, images.shape[-2:])
    if not order:
        raise ValueError("the evaluation loader yielded no images")
    order = torch.cat(order)
    if torch.unique(order).numel() != order.numel():
        raise ValueError("the loader repeated items: use shuffle=False and no sampler")
    rank = torch.argsort(order)
    return (
        torch.cat(image_logits)[rank].numpy(),
        torch.cat(combined_logits)[rank].numpy(),
        torch.cat(labels)[rank].numpy(),
        int(images.shape[-1]),
    )


def collect_outputs(
    network: torch.nn.Module,
    test_loader,
    validation_loader,
    test_items: Sequence[dict],
    device=None,
    amp: bool = False,
    weighting: str = "sigmoid",
    normalize: bool = True,
    inferer: Callable | None = None,
    class_names: Sequence[str] = CLASS_NAMES,
    sharpness: float = 1.0,
) -> EvaluationOutputs:
    """Run the network over the test and validation loaders and keep logits, labels and box-image maps.

    Args:
        network: RpSalNet (or RpSalProbabilities), weights loaded; put in eval mode here.
        test_loader, validation_loader: DataLoaders over ``loader_items`` of the splits (batches with
            ``image`` (B, 3, S, S), ``label`` (B, K), ``index``), shuffle off.
        test_items: the test split's datalist items (``boxes`` xyxy in original pixels, ``box_labels``,
            ``patient_id``, ``original_size``), indexed by the loader's ``index``.
        device: the network's device (default: its parameters'); amp: bf16 autocast on CUDA (when no
            inferer is given).
        weighting, normalize, sharpness: Det map painting (``custom.localisation.maps.detection_map``).
        inferer: the bundle's ``custom.inference.inferer.RpSalInferer`` (default: one with ``amp``), the same
            as inference.yaml's.

    Returns:
        ``EvaluationOutputs``.
    """
    require_booleans(normalize=normalize)
    device = torch.device(device) if device is not None else next(network.parameters()).device
    network.eval()
    box_labels = sorted({int(k) for item in test_items for k in item.get("box_labels", [])})
    if not box_labels:
        raise ValueError("no test image has a box: the localisation tables need the test boxes")
    box_class_names = tuple(class_names[k] for k in box_labels)
    column = {k: c for c, k in enumerate(box_labels)}
    maps = {name: {} for name in MAP_NAMES}

    def keep_maps(output, index, input_size):
        rows = [i for i, item_index in enumerate(index.tolist()) if test_items[item_index].get("boxes")]
        if not rows:
            return
        pick = torch.as_tensor(rows, device=output["saliency_logits"].device)
        classes = torch.as_tensor(box_labels, device=pick.device)
        batch_maps = rpsal_maps(
            output["saliency_logits"][pick][:, classes],
            output["proposal_logits"][pick][:, classes],
            output["refined_boxes"][pick][:, classes],
            input_size,
            weighting,
            normalize,
            sharpness,
        )
        for name, values in batch_maps.items():
            for row, value in zip(rows, values.cpu().numpy()):
                maps[name][int(index[row])] = value

    inferer = inferer or RpSalInferer(amp=amp)
    test = _run_split(network, test_loader, device, inferer, keep_maps)
    validation = _run_split(network, validation_loader, device, inferer)
    box_test_index = np.array(sorted(maps["mix"]), dtype=np.int64)
    gt_image, gt_class, gt_boxes = [], [], []
    for b, item_index in enumerate(box_test_index):
        item = test_items[item_index]
        for box, label in zip(item["boxes"], item["box_labels"]):
            gt_image.append(b)
            gt_class.append(column[int(label)])
            gt_boxes.append([float(v) for v in box])
    sizes = []
    for item_index in box_test_index:
        if "original_size" not in test_items[item_index]:
            raise ValueError(
                f"{test_items[item_index]['image']}: box images need original_size in the datalist"
            )
        sizes.append([float(v) for v in test_items[item_index]["original_size"]])
    return EvaluationOutputs(
        test_image_logits=test[0],
        test_combined_logits=test[1],
        test_labels=test[2],
        validation_image_logits=validation[0],
        validation_combined_logits=validation[1],
        validation_labels=validation[2],
        box_class_names=box_class_names,
        box_class_indices=np.array(box_labels, dtype=np.int64),
        box_maps={
            name: np.stack([values[i] for i in box_test_index]).astype(np.float32)
            for name, values in maps.items()
        },
        box_images=[str(test_items[i]["image"]) for i in box_test_index],
        box_test_index=box_test_index,
        patient_ids=[str(test_items[i].get("patient_id", test_items[i]["image"])) for i in box_test_index],
        original_sizes=np.array(sizes, dtype=np.float64),
        gt_image=np.array(gt_image, dtype=np.int64),
        gt_class=np.array(gt_class, dtype=np.int64),
        gt_boxes=np.array(gt_boxes, dtype=np.float64).reshape(-1, 4),
        input_size=test[3],
        weighting=weighting,
        normalize=normalize,
        class_names=tuple(class_names),
        sharpness=float(sharpness),
    )
