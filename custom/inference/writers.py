"""The writers of ``inference.yaml``: Ignite handlers of the inference evaluator, one per output kind.

Each writer runs after the postprocessing, per image of the iteration: it reads the image's findings
document (and maps) from ``engine.state.output[i]`` and its ``output_name`` from ``engine.state.batch[i]``,
writes its file, and records the file in the document's ``files``; the findings JSON writer comes last and
writes the document itself. A writer's failure on one image is that image's (``record_failure``: errors.txt,
stderr, no further writer for it); the run goes on. The DICOM writers (``custom.dicom.writers``) plug in the
same way.

Every path is ``<output folder>/<safe name><suffix>``, the name from ``custom.inference.inputs.safe_stem``;
``output_path`` refuses anything else, so no input name can place a file outside the output folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from custom.atomic_file import atomic_output, write_json
from custom.inference.findings import item_source
from custom.localisation.maps import MAP_NAMES


def output_path(folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """``folder / (name + suffix)``, checked to be a plain file name directly inside ``folder``.

    Raises ValueError when ``name + suffix`` holds a path separator, is '.', '..' or empty (names from
    ``safe_stem`` never do; this guards any other caller).
    """
    file_name = f"{name}{suffix}"
    if not name or file_name in (".", "..") or "/" in file_name or "\\" in file_name or "\0" in file_name:
        raise ValueError(f"unsafe output file name {file_name!r}")
    return Path(folder) / file_name


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


class ItemWriter:
    """Base of the writers: calls ``write(batch_item, output_item, engine)`` for every image of an iteration
    that has a findings document and no failure so far.

    Args:
        output_dir: the folder written to (created on the first write).
        findings_key: where the postprocessing left the document.
    """

    def __init__(self, output_dir: str | os.PathLike, findings_key: str = "findings") -> None:
        self.output_dir = Path(output_dir)
        self.findings_key = findings_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item, output in zip(engine.state.batch, engine.state.output):
            if self.findings_key not in output or output.get("failed"):
                continue
            try:
                self.write(item, output, engine)
            except Exception as error:  # one image's writing failure is reported; the others go on
                record_failure(engine, item, output, f"writing outputs failed: {failure_reason(error)}")

    def write(self, item: dict, output: dict, engine: Engine) -> None:
        raise NotImplementedError

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.output_dir))


class FindingsJsonWriter(ItemWriter):
    """``<output_dir>/<name><suffix>``: the findings document, atomically; put it after the other writers
    (the document lists their files)."""

    def __init__(self, output_dir: str | os.PathLike, suffix: str = ".json", findings_key: str = "findings") -> None:
        super().__init__(output_dir, findings_key)
        self.suffix = suffix

    def write(self, item: dict, output: dict, engine: Engine) -> None:
        write_json(output_path(self.output_dir, item["output_name"], self.suffix), output[self.findings_key])
        written = getattr(engine, "written", None)
        if written is not None:
            written.append(item["output_name"])


class OverlayWriter(ItemWriter):
    """``<output_dir>/overlays/<name>.png``: one panel per finding (its map as a heatmap, its box in yellow),
    at most ``max_panels`` (the most probable first); with no finding, the most probable class's map.

    Args:
        output_dir: the run's folder; size: longest side of a panel (px); max_panels: findings drawn.
        map_name: the maps drawn ("mix", as the boxes).
    """

    def __init__(self, output_dir: str | os.PathLike, size: int = 512, max_panels: int = 4, map_name: str = "mix",
                 findings_key: str = "findings") -> None:
        super().__init__(output_dir, findings_key)
        if map_name not in MAP_NAMES:
            raise ValueError(f"map must be one of {MAP_NAMES}, got {map_name!r}")
        self.size, self.max_panels, self.map_name = int(size), int(max_panels), map_name

    def write(self, item: dict, output: dict, engine: Engine) -> None:
        from custom.inference.overlays import findings_overlay, load_display_image

        document = output[self.findings_key]
        grey, _ = load_display_image(document["image"], self.size)
        class_maps = output["maps"][self.map_name].numpy()
        names = list(document["probabilities"])
        column = {name: k for k, name in enumerate(names)}
        maps = {i: class_maps[column[f["class"]]] for i, f in enumerate(document["findings"])}
        probabilities = torch.as_tensor(output["probabilities"])
        top = int(torch.argmax(probabilities))
        fallback = (names[top], float(probabilities[top]), class_maps[top])
        picture = findings_overlay(grey, document["original_size"], document["findings"], maps, fallback,
                                   self.max_panels)
        path = output_path(self.output_dir / "overlays", item["output_name"], ".png")
        with atomic_output(path, suffix=".png") as temp:
            picture.save(temp)
        document["files"]["overlay"] = self.relative(path)


class NiftiMapsWriter(ItemWriter):
    """``<output_dir>/maps/<name>_<map>.nii.gz`` for each map named (``write_nifti_maps``)."""

    def __init__(self, output_dir: str | os.PathLike, maps: Sequence[str] = (), findings_key: str = "findings") -> None:
        super().__init__(output_dir, findings_key)
        if isinstance(maps, str):
            raise ValueError(f"maps must be a list of map names, got the string {maps!r}")
        unknown = set(maps) - set(MAP_NAMES)
        if unknown:
            raise ValueError(f"maps must be among {MAP_NAMES}, got {sorted(unknown)}")
        self.maps = tuple(maps)

    def write(self, item: dict, output: dict, engine: Engine) -> None:
        document = output[self.findings_key]
        for map_name in self.maps:
            path = output_path(self.output_dir / "maps", item["output_name"], f"_{map_name}.nii.gz")
            write_nifti_maps(path, output["maps"][map_name], document["original_size"])
            document["files"][f"{map_name}_nifti"] = self.relative(path)


def failure_reason(error: BaseException) -> str:
    """The message that best explains a failure: MONAI wraps a transform's error in its own RuntimeError, and
    a decoder's low-level error (struct, zlib) is wrapped in ImageLoadError naming the file. The first
    ImageLoadError of the chain is taken, else the innermost exception."""
    from custom.transforms.grey_image import ImageLoadError

    chain = [error]
    while chain[-1].__cause__ is not None or (
        chain[-1].__context__ is not None and not chain[-1].__suppress_context__
    ):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 50:  # a cycle would be a bug elsewhere; never loop on it
            break
    chosen = next((e for e in chain if isinstance(e, ImageLoadError)), chain[-1])
    return f"{type(chosen).__name__}: {chosen}"


def record_failure(engine: Engine, item: dict, output: dict | None, reason: str) -> None:
    """Mark one image failed: a line in the engine's ``errors`` log (errors.txt and stderr); no further writer
    touches it."""
    if output is not None:
        output["failed"] = True
    errors = getattr(engine, "errors", None)
    if errors is None:
        raise RuntimeError(f"{item_source(item)}: {reason}")
    errors.add(item_source(item), reason)
