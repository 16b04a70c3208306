"""What an inference run reads: the list of input images, and a safe, unique output name for each.

An input is one image file, a folder of them, or a datalist JSON. Every output file of an input is named
from its ``output_name``, a bare file-name stem made of safe characters only, so no input name
(``../../x.png``, a DICOM name with ``(0008,0018)`` or spaces, a name of dots) can write outside the output
folder; two inputs sharing a stem get distinct names (the later ones take a short hash of their full path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from custom.transforms.grey_image import DICOM_EXTENSIONS

logger = logging.getLogger(__name__)

# Files of a folder taken as images by their name; any other file is skipped (README, CSV, JSON beside them).
IMAGE_EXTENSIONS = (".png", ".npy", *DICOM_EXTENSIONS)
MAX_STEM_CHARS = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _is_dicom_without_extension(path: Path) -> bool:
    """DICOM files from archives often have no extension: recognised by the 'DICM' magic at byte 128."""
    try:
        with open(path, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (not recursive), sorted by name.

    Images by name: ``IMAGE_EXTENSIONS`` (any case), plus files without an extension that carry DICOM's
    'DICM' magic. Hidden files are ignored. A file is listed by its name only: a corrupt ``.png`` is listed
    (and fails when read, recorded by the run); other files are skipped with one INFO log line.

    Returns:
        Paths in the folder, sorted.
    """
    folder = Path(folder)
    chosen, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_EXTENSIONS or (not suffix and _is_dicom_without_extension(path)):
            chosen.append(path)
        else:
            skipped.append(path.name)
    if skipped:
        logger.info(f"{folder}: skipped {len(skipped)} file(s) that are not images by name: {skipped[:5]}")
    return chosen


def _datalist_items(path: Path, key: str) -> list[dict]:
    """Items of a datalist JSON: a list, or a dict holding the list under ``key``; relative paths are taken
    from the JSON's folder."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a valid JSON datalist ({error})") from error
    if isinstance(content, dict):
        if key not in content:
            raise ValueError(
                f"{path}: the datalist has no '{key}' list (keys: {sorted(content)[:10]}); set datalist_key"
            )
        content = content[key]
    if not isinstance(content, list):
        raise ValueError(
            f"{path}: expected a list of items (or of image paths), got {type(content).__name__}"
        )
    items = []
    for position, entry in enumerate(content):
        item = (
            {"image": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
        )
        if item is None or not isinstance(item.get("image"), str):
            raise ValueError(f"{path}: item {position} has no 'image' path: {entry!r:.200}")
        item["image"] = os.path.normpath(os.path.join(path.parent, item["image"]))
        items.append(item)
    return items


def safe_stem(path: str | os.PathLike) -> str:
    """A file-name stem made from an input path's last component, safe to join to any folder.

    Keeps letters, digits, '.', '_' and '-' (others become '_'), drops the extension, leading dots and
    dashes, and cuts to ``MAX_STEM_CHARS``; never empty (``image``), never '.' or '..'.
    """
    name = Path(str(path).replace("\\", "/")).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    stem = _UNSAFE.sub("_", stem).lstrip(".-")[:MAX_STEM_CHARS].rstrip(".")
    return stem or "image"


def assign_output_names(items: list[dict]) -> list[dict]:
    """Give every item a unique ``output_name`` (``safe_stem``), in list order, comparing names case-blind.

    The first input of a stem keeps it; later ones get ``<stem>_<8 hex of sha1(path)>`` (a counter is added
    in the unlikely case that is taken too). The names depend only on the list, not on processing order.

    Returns:
        New dicts, each with ``output_name`` set.
    """
    taken: set[str] = set()
    named = []
    for item in items:
        stem = safe_stem(item["image"])
        name = stem
        if name.lower() in taken:
            digest = hashlib.sha1(
                os.path.abspath(item["image"]).encode("utf-8", "surrogateescape")
            ).hexdigest()
            name = f"{stem}_{digest[:8]}"
            counter = 2
            while name.lower() in taken:
                name = f"{stem}_{digest[:8]}_{counter}"
                counter += 1
        taken.add(name.lower())
        named.append({**item, "output_name": name})
    return named


def resolve_inputs(source: str | os.PathLike | None, datalist_key: str = "test") -> list[dict]:
    """The items an inference run processes, from a file, a folder or a datalist JSON.

    Args:
        source: an image file (PNG / DICOM / ``.npy``), a folder of them (``folder_images``), or a ``.json``
            datalist: a list of paths or of ``{"image": path, ...}`` dicts, or a dict with such a list under
            ``datalist_key`` (the bundle's datalists: "training", "validation", "test"). Relative paths in a
            datalist are taken from the JSON's folder.
        datalist_key: which list of a dict datalist to read.

    Returns:
        ``[{"image": path str, "output_name": str, ...other datalist keys}]`` in input order.

    Raises:
        ValueError / FileNotFoundError naming the input when it is missing, empty or not understood.
    """
    if source is None or str(source) == "":
        raise ValueError("no input given: pass --input <image file | folder | datalist .json>")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{path}: input not found")
    if path.is_dir():
        items = [{"image": str(image)} for image in folder_images(path)]
        if not items:
            raise ValueError(f"{path}: the folder has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    elif path.suffix.lower() == ".json":
        items = _datalist_items(path, datalist_key)
        if not items:
            raise ValueError(f"{path}: the datalist is empty")
    else:
        items = [{"image": str(path)}]
    return assign_output_names(items)
