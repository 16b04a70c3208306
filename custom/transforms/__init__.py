"""MONAI dictionary transforms of this bundle (loading PNG/DICOM/cache to one grey channel, box mapping).

- :class:`LoadChestXrayd` (``load.py``): a radiograph file -> MetaTensor (1, H, W) float32 in [0, 1],
  bone bright.
- ``grey_image.py``: the decoder behind it (numpy/Pillow/pydicom only), ``ImageLoadError``,
  ``read_png_header``, ``read_image_size`` (PNG/DICOM size from the header alone).
- ``boxes.py``: exact xyxy box mapping between original and model pixels, clipping.

``LoadChestXrayd`` is imported on first use (PEP 562), so code that only decodes images or maps boxes (the
cache builder and its worker processes) does not pay for importing MONAI.
"""

from custom.transforms.boxes import boxes_to_model, boxes_to_original, clip_boxes, scale_boxes
from custom.transforms.grey_image import (
    GreyImage,
    ImageLoadError,
    PngHeader,
    read_grey_image,
    read_image_size,
    read_png_header,
)

__all__ = [
    "GreyImage",
    "ImageLoadError",
    "LoadChestXrayd",
    "PngHeader",
    "boxes_to_model",
    "boxes_to_original",
    "clip_boxes",
    "read_grey_image",
    "read_image_size",
    "read_png_header",
    "scale_boxes",
]


def __getattr__(name: str):
    """Import LoadChestXrayd (and MONAI with it) only when asked for."""
    if name == "LoadChestXrayd":
        from custom.transforms.load import LoadChestXrayd

        return LoadChestXrayd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
