"""MONAI dictionary transform loading a radiograph (PNG, DICOM or cache ``.npy``) as one grey channel."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from custom.transforms.grey_image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, ImageLoadError, read_grey_image


class LoadChestXrayd(MapTransform):
    """Load a chest radiograph to a (1, H, W) float32 MetaTensor in [0, 1], bone bright and air dark.

    Reads the file itself with Pillow / pydicom / numpy (MONAI's PILReader would transpose to (W, H)), so
    rows stay rows: the tensor's dim 1 is the image's y (H rows), dim 2 its x (W columns), origin top-left.
    Sources: PNG (L, LA, RGB, RGBA with alpha 255, P; 8-bit or 16-bit grey), DICOM (single-frame CR / DX /
    Secondary Capture; Modality LUT/rescale then VOI LUT/window as the file says; MONOCHROME1 inverted) and
    the ``.npy`` files written by ``scripts/prepare_chestxray14.py`` (uint8 / uint16 / float in [0, 1]).
    See :func:`custom.transforms.grey_image.read_grey_image` for the details.

    ``original_size`` = [H, W] is the size of the ORIGINAL image, the pixel space boxes are given in:
    - PNG / DICOM: the size of the file as read. If the data dict already carries ``original_size`` (from a
      datalist) and it differs, ImageLoadError is raised (a datalist built from other files).
    - cache ``.npy``: the value already in the data dict is kept (the cache is resized; the datalist keeps the
      PNG's size); when absent, the array's own size is used.
    It is written to ``data[original_size_key]`` (a list of two ints) and to the MetaTensor's meta.

    Args:
        keys: the key(s) holding the file path; one key when ``original_size_key`` is set.
        min_size: smallest accepted height and width (pixels); smaller images raise ImageLoadError.
        max_pixels: largest accepted H * W, checked from the header before decoding.
        downscale_to: optional side; the image is reduced on load by an exact integer factor keeping both
            sides >= this (see read_grey_image), which saves memory and time for films much larger than the
            model input. The tensor is then smaller than ``original_size``; geometry stays exact.
        original_size_key: the data key for [H, W]; None to leave the dict alone (meta still has it).
        allow_missing_keys: as in MONAI.

    Returns (from ``__call__``): a new dict with ``data[key]`` = MetaTensor (1, H', W') float32 (meta:
    ``filename_or_obj``, ``original_size``, ``spatial_shape`` (H', W'), ``source_format``, ``load_reduction``;
    affine identity 3x3) and ``data[original_size_key]`` = [H, W].

    Raises:
        ImageLoadError (a ValueError) naming the file and the reason.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_size: int = DEFAULT_MIN_SIZE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        downscale_to: int | None = None,
        original_size_key: str | None = "original_size",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if original_size_key is not None and len(self.keys) != 1:
            raise ValueError(
                f"LoadChestXrayd writes one '{original_size_key}' entry, so it takes one key, "
                f"got {self.keys}; "
                "use one transform per key, or original_size_key=None"
            )
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        self.min_size = int(min_size)
        self.max_pixels = int(max_pixels)
        self.downscale_to = downscale_to
        self.original_size_key = original_size_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
                raise TypeError(
                    f"LoadChestXrayd: data['{key}'] must be a file path, got {type(path).__name__}"
                )
            grey = read_grey_image(path, self.min_size, self.max_pixels, self.downscale_to)
            original_size = self._original_size(d, path, grey.original_size, grey.source_format)
            height, width = grey.array.shape
            meta = {
                "filename_or_obj": str(path),
                "original_size": list(original_size),
                "spatial_shape": np.array([height, width]),
                "source_format": grey.source_format,
                "load_reduction": grey.reduction,
                # Already channel-first: a later EnsureChannelFirstd must not add another channel.
                "original_channel_dim": 0,
            }
            affine = torch.eye(3, dtype=torch.float64)
            d[key] = MetaTensor(torch.from_numpy(grey.array)[None], affine=affine, meta=meta)
            if self.original_size_key is not None:
                d[self.original_size_key] = list(original_size)
        return d

    def _original_size(
        self, d: Mapping[Hashable, object], path, file_size: tuple[int, int], source_format: str
    ) -> tuple[int, int]:
        """The [H, W] boxes refer to: the file's size, or for a cache file the size the datalist carries."""
        listed = d.get(self.original_size_key) if self.original_size_key is not None else None
        if listed is None:
            return file_size
        listed = _as_size(path, listed)
        if source_format == "npy":
            return listed
        if listed != file_size:
            raise ImageLoadError(
                path,
                f"the data dict says original_size {list(listed)} (HxW) but the file is {list(file_size)}: "
                "was the datalist built from other files?",
            )
        return listed


def _as_size(path, value: object) -> tuple[int, int]:
    """Validate an [H, W] pair from a data dict (list, tuple, array or tensor of two positive integers)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or len(value) != 2 or any(float(v) != int(v) or v <= 0 for v in value):
        raise ImageLoadError(path, f"original_size must be [H, W], two positive integers; got {value!r}")
    return int(value[0]), int(value[1])
