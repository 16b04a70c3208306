"""Writing inference outputs: JSON files (atomically), maps as NIfTI for viewers, and the errors file.

Every path is ``<output folder>/<safe name><suffix>``, the name from ``custom.inference.inputs.safe_stem``;
``output_path`` refuses anything else, so no input name can place a file outside the output folder.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from custom.atomic_file import atomic_output


def output_path(folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """``folder / (name + suffix)``, checked to be a plain file name directly inside ``folder``.

    Raises ValueError when ``name + suffix`` holds a path separator, is '.', '..' or empty (names from
    ``safe_stem`` never do; this guards any other caller).
    """
    file_name = f"{name}{suffix}"
    if not name or file_name in (".", "..") or "/" in file_name or "\\" in file_name or "\0" in file_name:
        raise ValueError(f"unsafe output file name {file_name!r}")
    return Path(folder) / file_name


_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\s]+?)\s+\]")


def json_text(content) -> str:
    """JSON indented one space per level, with lists of numbers (boxes, sizes) kept on one line.

    NaN/inf are refused (``allow_nan=False``): strict JSON readers reject them.
    """
    text = json.dumps(content, indent=1, allow_nan=False)
    return _NUMBER_LIST.sub(lambda match: "[" + " ".join(match.group(1).split()) + "]", text)


def write_json(path: str | os.PathLike, content) -> Path:
    """Write ``json_text(content)`` atomically (temporary file beside it, then rename): a reader never sees
    half a file. Returns the path.
    """
    path = Path(path)
    with atomic_output(path) as temp:
        temp.write_text(json_text(content) + "\n", encoding="utf-8")
    return path


def write_nifti_maps(path: str | os.PathLike, maps, original_size: Sequence[int]) -> Path:
    """Save one image's maps (K, h, w) as a NIfTI volume a viewer can lay over the image.

    The volume is (w, h, K): NIfTI's first axis is x (columns), the second y (rows), the third the class
    (slice k = class k, in the network's class order). The affine maps voxel (i, j, k) to ORIGINAL image
    pixel coordinates: x = (i + 0.5) W/w, y = (j + 0.5) H/h (map pixel centres; units are original pixels,
    not mm), z = k. Written with nibabel (imported here: only runs that ask for NIfTI need it).

    Args:
        path: output file (``.nii.gz``); maps: (K, h, w) float array or tensor; original_size: (H, W).

    Returns:
        The path.
    """
    import nibabel as nib

    maps = np.asarray(maps.detach().cpu() if hasattr(maps, "detach") else maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must have shape (K, h, w), got {maps.shape}")
    height, width = maps.shape[1:]
    scale_y, scale_x = original_size[0] / height, original_size[1] / width
    affine = np.array(
        [[scale_x, 0, 0, 0.5 * scale_x], [0, scale_y, 0, 0.5 * scale_y], [0, 0, 1, 0], [0, 0, 0, 1]],
        dtype=np.float64,
    )
    image = nib.Nifti1Image(np.ascontiguousarray(maps.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("unknown")
    path = Path(path)
    with atomic_output(path, suffix=".nii.gz") as temp:
        nib.save(image, temp)
    return path


class ErrorLog:
    """The inputs a run could not process: ``<folder>/errors.txt`` (one ``path<TAB>reason`` line each), a
    log line on stderr per failure, and the list in memory.

    The file is emptied when the log is opened (a rerun starts fresh) and each line is flushed as it is
    written, so a run that dies midway still leaves its record.
    """

    FILE_NAME = "errors.txt"

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / self.FILE_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("", encoding="utf-8")
        self.failures: list[tuple[str, str]] = []

    def add(self, image: str, reason: str) -> None:
        """Record one failed input (tabs and newlines in the reason become spaces: one line per input)."""
        reason = " ".join(str(reason).split())
        image = " ".join(str(image).split("\n"))
        self.failures.append((image, reason))
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{image}\t{reason}\n")
        # stderr, not the logger: the bundle's logging.conf sends log records to stdout.
        print(f"inference: skipped {image}: {reason}", file=sys.stderr, flush=True)
