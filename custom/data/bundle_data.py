"""The datalist a bundle workflow trains and evaluates on: real ChestX-ray14, a prepared datalist, or the phantom.

Image paths in the returned datalist are absolute, so configs need no base folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .chestxray14 import build_chestxray14_datalist

logger = logging.getLogger(__name__)
SPLITS = ("training", "validation", "test")


CLASSIFICATION_KEYS = ("image", "label", "original_size")


def classification_items(items: list[dict]) -> list[dict]:
    """The items with only the keys a classification batch needs (image, label, original_size).

    Test items carry ragged ``boxes``/``box_labels`` on some images only, which PyTorch's collate cannot
    batch; evaluation of boxes reads them from the datalist instead.
    """
    return [{key: item[key] for key in CLASSIFICATION_KEYS if key in item} for item in items]


def _absolute_paths(datalist: dict, base_dir: str | os.PathLike) -> dict:
    for split in SPLITS:
        for item in datalist.get(split, []):
            item["image"] = os.path.abspath(os.path.join(base_dir, item["image"]))
    return datalist


def read_datalist_file(path: str | os.PathLike) -> dict:
    """A datalist JSON (from scripts/prepare_chestxray14.py); relative image paths are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: datalist file not found")
    try:
        datalist = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    missing = [key for key in (*SPLITS, "class_weights") if key not in datalist]
    if missing:
        raise ValueError(f"{path}: datalist lacks {missing}")
    return _absolute_paths(datalist, path.parent)


def phantom_folder(data_dir: str | os.PathLike, phantom: Mapping) -> Path:
    """Where the phantom of these settings lives: one folder per (images, size, seed)."""
    return Path(data_dir) / f"phantom-{int(phantom['num_images'])}x{int(phantom['image_size'])}px-seed{int(phantom['seed'])}"


def ensure_phantom(data_dir: str | os.PathLike, phantom: Mapping) -> Path:
    """Generate the phantom once (the main process writes, the others wait) and return its folder."""
    from .phantom import make_phantom  # imported here: only phantom runs need the generator

    folder = phantom_folder(data_dir, phantom)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        make_phantom(
            out_dir=str(folder),
            num_images=int(phantom["num_images"]),
            image_size=int(phantom["image_size"]),
            seed=int(phantom["seed"]),
            num_workers=int(phantom.get("num_workers", min(4, os.cpu_count() or 1))),
        )
    if distributed:
        torch.distributed.barrier()
    return folder


def load_datalist(
    dataset_dir: str | os.PathLike | None = None,
    datalist_file: str | os.PathLike | None = None,
    data_dir: str | os.PathLike = "data",
    phantom: Mapping | None = None,
    val_fraction: float = 0.1,
    seed: int = 34,
) -> dict:
    """Return the datalist (``training``, ``validation``, ``test``, ``class_weights``, ...) with absolute paths.

    In order of precedence: ``datalist_file`` (written by scripts/prepare_chestxray14.py, e.g. pointing at
    its decoded-image cache); ``dataset_dir`` (a ChestX-ray14 folder as NIH ships it, read and checked now);
    otherwise the synthetic phantom described by ``phantom`` (num_images, image_size, seed), generated
    once under ``data_dir``.
    """
    if datalist_file:
        return read_datalist_file(datalist_file)
    if dataset_dir is None:
        if phantom is None:
            raise ValueError("give dataset_dir (a ChestX-ray14 folder), datalist_file, or phantom settings")
        dataset_dir = ensure_phantom(data_dir, phantom)
        logger.info(f"no dataset_dir given: training on the synthetic phantom in {dataset_dir}")
    datalist = build_chestxray14_datalist(dataset_dir, val_fraction=val_fraction, seed=seed)
    return _absolute_paths(datalist, dataset_dir)
