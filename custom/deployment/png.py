"""A radiograph PNG to the network's input with numpy and Pillow only, as the bundle's preprocessing makes it.

The bundle (``inference.yaml``): ``LoadChestXrayd`` (one grey channel in [0, 1]: 8-bit / 255, 16-bit / 65535
or / (2^b - 1) for an sBIT of b bits the values respect; colour -> ITU-R 601 luma; alpha must be opaque),
``Resized(mode="area")`` to S x S (adaptive average pooling), 3 channels, ImageNet normalisation. Here the
same steps for PNG files (the formats a deployment is handed most; DICOM needs pydicom's decoders and the
bundle's reader). The result equals the bundle's to float rounding (``tests/test_deployment.py``).
"""

from __future__ import annotations

import os
import struct

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _significant_bits(path: str | os.PathLike) -> int | None:
    """The grey sample's significant bits of a PNG's sBIT chunk (before IDAT), or None."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"{path}: not a PNG file")
        while True:
            head = handle.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                return handle.read(length)[0]
            if kind == b"IDAT":
                return None
            handle.seek(length + 4, os.SEEK_CUR)


def read_grey(path: str | os.PathLike) -> np.ndarray:
    """One grey channel, float32 (H, W) in [0, 1], of a PNG file (the bundle's rules, module docstring)."""
    with Image.open(path) as image:
        image.load()
        mode = image.mode
        if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            grey = np.asarray(image).astype(np.uint16)
        else:
            if mode == "P":
                image, mode = image.convert("RGBA"), "RGBA"
            if mode in ("LA", "RGBA") and image.getchannel("A").getextrema()[0] != 255:
                raise ValueError(f"{path}: {mode} image has transparent pixels; a radiograph must be opaque")
            grey = np.asarray(image if mode == "L" else image.convert("L"))
    if grey.dtype != np.uint16:
        divisor = 255
    else:
        bits = _significant_bits(path)
        divisor = 2**bits - 1 if bits is not None and 8 <= bits < 16 and int(grey.max()) < 2**bits else 65535
    return grey.astype(np.float32) / np.float32(divisor)


def _area_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) averaging weights of adaptive average pooling along one axis (torch's windows:
    [floor(i * source / target), ceil((i + 1) * source / target)))."""
    weights = np.zeros((target, source), dtype=np.float64)
    for i in range(target):
        start = (i * source) // target
        stop = -((-(i + 1) * source) // target)
        weights[i, start:stop] = 1.0 / (stop - start)
    return weights


def area_resize(grey: np.ndarray, size: int) -> np.ndarray:
    """(H, W) -> (size, size) by adaptive average pooling (``F.interpolate(mode="area")``), float32."""
    rows = _area_matrix(grey.shape[0], size)
    cols = _area_matrix(grey.shape[1], size)
    return (rows @ grey.astype(np.float64) @ cols.T).astype(np.float32)


def network_input(path: str | os.PathLike, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The network input of one PNG: float32 (1, 3, size, size) ImageNet-normalised, and the file's (H, W)."""
    grey = read_grey(path)
    resized = area_resize(grey, size)
    image = (resized[None] - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
    return image[None].astype(np.float32), (int(grey.shape[0]), int(grey.shape[1]))
