"""Reading ChestX-ray14 as NIH ships it, and writing MONAI datalists from it.

The folder layout (NIH's download, or ``custom.data.phantom``'s synthetic copy of it)::

    <dataset_dir>/images/*.png
    <dataset_dir>/Data_Entry_2017_v2020.csv   (or Data_Entry_2017.csv; either may be .csv.gz)
    <dataset_dir>/BBox_List_2017.csv          (or .csv.gz)
    <dataset_dir>/train_val_list.txt
    <dataset_dir>/test_list.txt

Everything is validated before any training could start: a bad table raises
:class:`ChestXray14FormatError` naming the file, the line and the problem; missing images are listed by
name (first few and a count).

Boxes: NIH's ``x, y, w, h`` (x, y the TOP-LEFT corner) are in the pixels of the PNG file as stored (1024 px
for NIH's files); they become float xyxy ``[x, y, x + w, y + h]`` in the same pixels, never rescaled by an
assumed size. Labels: 14 floats 0/1 in the order of ``custom.labels.CLASS_NAMES``.

Datalist (JSON) written by :func:`build_chestxray14_datalist` / :func:`make_datalist`::

    {"class_names": [14 names], "class_weights": {"positive": [14], "negative": [14]},
     "split": {"by": "patient", "val_fraction": f, "seed": s},
     "training" | "validation" | "test": [
        {"image": "<path relative to the datalist's folder>", "label": [14 floats 0/1],
         "patient_id": "<str>", "original_size": [H, W],
         # test items with boxes only:
         "boxes": [[x0, y0, x1, y1], ...], "box_labels": [index into CLASS_NAMES, ...]}]}
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from custom.atomic_file import atomic_output
from custom.data.class_balance import datalist_class_weights
from custom.labels import CLASS_INDEX, CLASS_NAMES, LABEL_ALIASES, NO_FINDING
from custom.transforms.grey_image import ImageLoadError, read_image_size

LABEL_FILE_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
BOX_FILE_NAMES = ("BBox_List_2017.csv", "BBox_List_2017.csv.gz")
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"
IMAGE_DIR = "images"
SPLIT_KEYS = ("training", "validation", "test")

DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 34  # the seed of the authors' public implementation
# A box may touch the image border; beyond this many pixels it is in another image's pixel space.
BOX_OUTSIDE_TOLERANCE_PX = 1.0
MAX_NAMES_IN_MESSAGE = 5


class ChestXray14FormatError(ValueError):
    """A ChestX-ray14 table, list or folder that cannot be used; the message names the file and problem."""


@dataclass(frozen=True)
class LabelRecord:
    """One row of Data_Entry_2017*.csv: 14 labels (0/1 floats, CLASS_NAMES order), the patient, its line."""

    image: str
    label: tuple[float, ...]
    patient_id: str
    line: int


@dataclass(frozen=True)
class BoxRecord:
    """One row of BBox_List_2017.csv: ``box`` float xyxy in the PNG's own pixels, ``class_index`` into
    CLASS_NAMES, and the line it came from."""

    image: str
    box: tuple[float, float, float, float]
    class_index: int
    line: int


@dataclass
class ChestXray14Tables:
    """The validated tables of one ChestX-ray14 folder.

    ``labels``: image name -> LabelRecord; ``boxes``: image name -> list of BoxRecord; ``train_val`` and
    ``test``: image names in list order; ``files``: which file each came from (for messages).
    """

    labels: dict[str, LabelRecord]
    boxes: dict[str, list[BoxRecord]]
    train_val: list[str]
    test: list[str]
    files: dict[str, Path] = field(default_factory=dict)


def _error(path: str | os.PathLike, problem: str, line: int | None = None) -> ChestXray14FormatError:
    """A ChestXray14FormatError whose message reads '<file>, line <n>: <problem>'."""
    where = f"{path}, line {line}" if line is not None else str(path)
    return ChestXray14FormatError(f"{where}: {problem}")


def _open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a table for reading as text; ``.gz`` files are decompressed; a UTF-8 BOM is dropped."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError as error:
        raise _error(path, "file not found") from error
    except OSError as error:
        raise _error(path, f"cannot read file ({error.strerror or error})") from error


def _read_rows(path: str | os.PathLike) -> Iterable[tuple[int, list[str]]]:
    """Yield (line number, fields) of a CSV, skipping blank lines; decoding errors name the file."""
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield reader.line_num, [cell.strip() for cell in row]
        except (csv.Error, UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile) as error:
            raise _error(path, f"unreadable CSV ({error})", reader.line_num) from error


def _check_image_name(path, name: str, line: int) -> None:
    """An image index must be a bare file name: no folders, so it cannot point outside images/."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise _error(path, f"'{name}' is not an image file name", line)


def parse_finding_labels(text: str) -> tuple[float, ...] | str:
    """'A|B' (NIH's Finding Labels) -> 14 floats 0/1 in CLASS_NAMES order; an error message str if invalid.

    'No Finding' (alone) gives all zeros; NIH's spellings in LABEL_ALIASES are accepted.
    """
    names = [name.strip() for name in text.split("|")]
    if not text.strip() or any(not name for name in names):
        return f"empty finding label in '{text}'"
    if NO_FINDING in names:
        return (
            f"'{NO_FINDING}' together with other labels in '{text}'"
            if len(names) > 1
            else (0.0,) * len(CLASS_NAMES)
        )
    label = [0.0] * len(CLASS_NAMES)
    for name in names:
        canonical = LABEL_ALIASES.get(name, name)
        if canonical not in CLASS_INDEX:
            return f"unknown label '{name}' (known: {', '.join(CLASS_NAMES)}, '{NO_FINDING}')"
        if label[CLASS_INDEX[canonical]]:
            return f"label '{name}' repeated in '{text}'"
        label[CLASS_INDEX[canonical]] = 1.0
    return tuple(label)


def read_label_table(path: str | os.PathLike) -> dict[str, LabelRecord]:
    """Read Data_Entry_2017[_v2020].csv[.gz]: image name -> LabelRecord.

    Needs the columns 'Image Index', 'Finding Labels' and 'Patient ID' (others are ignored; NIH's header
    splits 'OriginalImage[Width,Height]' over two columns, which is harmless here).
    Raises ChestXray14FormatError for a missing column, a short row, an unknown label, an empty patient id
    or a duplicated image, naming the file and line.
    """
    rows = iter(_read_rows(path))
    try:
        _, header = next(rows)
    except StopIteration:
        raise _error(path, "the label file is empty") from None
    columns = {}
    for needed in ("Image Index", "Finding Labels", "Patient ID"):
        if needed not in header:
            raise _error(path, f"missing column '{needed}' in the header {header}", 1)
        columns[needed] = header.index(needed)
    width = max(columns.values()) + 1
    records: dict[str, LabelRecord] = {}
    for line, row in rows:
        if len(row) < width:
            raise _error(path, f"row has {len(row)} fields, fewer than the {width} the header needs", line)
        name, findings, patient = (
            row[columns[key]] for key in ("Image Index", "Finding Labels", "Patient ID")
        )
        _check_image_name(path, name, line)
        label = parse_finding_labels(findings)
        if isinstance(label, str):
            raise _error(path, f"image {name}: {label}", line)
        if not patient:
            raise _error(path, f"image {name}: empty Patient ID", line)
        if name in records:
            raise _error(path, f"duplicate row for image {name} (first on line {records[name].line})", line)
        records[name] = LabelRecord(name, label, patient, line)
    if not records:
        raise _error(path, "the label file has a header but no rows")
    return records


def read_box_table(
    path: str | os.PathLike, known_images: Collection[str] | None = None
) -> dict[str, list[BoxRecord]]:
    """Read BBox_List_2017.csv[.gz]: image name -> its boxes (float xyxy in that PNG's own pixels).

    NIH's header is malformed (``Image Index,Finding Label,Bbox [x,y,w,h],,,``: the bracket splits over four
    columns and three empty ones trail); columns are therefore taken by position: image, label, x, y, w, h,
    with x, y the TOP-LEFT corner. 'Infiltrate' is read as 'Infiltration'. Any of the 14 classes is accepted.
    Raises ChestXray14FormatError (file, line) for an unexpected header, a short row, a non-numeric or
    non-positive size, an unknown label, a repeated row, or (with ``known_images``) an image not in the label
    file.
    """
    rows = iter(_read_rows(path))
    try:
        _, header = next(rows)
    except StopIteration:
        raise _error(path, "the box file is empty") from None
    if len(header) < 6 or header[0] != "Image Index" or header[1] != "Finding Label":
        raise _error(
            path, f"unexpected header {header}: expected 'Image Index,Finding Label,Bbox [x,y,w,h]'", 1
        )
    boxes: dict[str, list[BoxRecord]] = {}
    seen: dict[tuple, int] = {}
    for line, row in rows:
        if len(row) < 6 or any(row[6:]):
            raise _error(path, f"expected 6 fields (image, label, x, y, w, h), got {row}", line)
        name, label_name = row[0], row[1]
        _check_image_name(path, name, line)
        try:
            x, y, w, h = (float(value) for value in row[2:6])
        except ValueError:
            raise _error(path, f"image {name}: non-numeric box {row[2:6]}", line) from None
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise _error(
                path, f"image {name}: box x, y, w, h = {row[2:6]} needs finite values and w, h > 0", line
            )
        canonical = LABEL_ALIASES.get(label_name, label_name)
        if canonical not in CLASS_INDEX:
            raise _error(path, f"image {name}: unknown box label '{label_name}'", line)
        if known_images is not None and name not in known_images:
            raise _error(path, f"image {name} has a box but is not in the label file", line)
        key = (name, canonical, x, y, w, h)
        if key in seen:
            raise _error(path, f"duplicate box row for image {name} (same as line {seen[key]})", line)
        seen[key] = line
        boxes.setdefault(name, []).append(BoxRecord(name, (x, y, x + w, y + h), CLASS_INDEX[canonical], line))
    return boxes


def read_image_list(path: str | os.PathLike, known_images: Collection[str] | None = None) -> list[str]:
    """Read train_val_list.txt / test_list.txt: one image name a line (blank lines ignored), in file order.

    Raises ChestXray14FormatError (file, line) for a repeated name or, with ``known_images``, a name absent
    from the label file.
    """
    names: list[str] = []
    first_line: dict[str, int] = {}
    with _open_text(path) as handle:
        for line, text in enumerate(handle, start=1):
            name = text.strip()
            if not name:
                continue
            _check_image_name(path, name, line)
            if name in first_line:
                raise _error(path, f"image {name} listed twice (first on line {first_line[name]})", line)
            if known_images is not None and name not in known_images:
                raise _error(path, f"image {name} is not in the label file", line)
            first_line[name] = line
            names.append(name)
    return names


def _find_one(dataset_dir: Path, candidates: Sequence[str], what: str) -> Path:
    """The first of ``candidates`` present in ``dataset_dir``, or an error naming what was looked for."""
    for name in candidates:
        if (dataset_dir / name).is_file():
            return dataset_dir / name
    raise _error(dataset_dir, f"no {what} found (looked for {', '.join(candidates)})")


def read_tables(
    label_file: str | os.PathLike,
    box_file: str | os.PathLike,
    train_val_file: str | os.PathLike,
    test_file: str | os.PathLike,
) -> ChestXray14Tables:
    """Read and cross-check the four NIH tables (works without any image).

    Checks, beyond each table's own: every listed image is in the label file; no image is in both lists; no
    patient has images in both lists (the official split is patient-disjoint; a shared patient would leak).
    Raises ChestXray14FormatError naming the file and the offending images/patients.
    """
    labels = read_label_table(label_file)
    boxes = read_box_table(box_file, known_images=labels)
    train_val = read_image_list(train_val_file, known_images=labels)
    test = read_image_list(test_file, known_images=labels)
    in_both = sorted(set(train_val) & set(test))
    if in_both:
        raise _error(
            test_file, f"{len(in_both)} image(s) also in {Path(train_val_file).name}: {_few(in_both)}"
        )
    shared = sorted({labels[n].patient_id for n in train_val} & {labels[n].patient_id for n in test})
    if shared:
        raise _error(
            test_file,
            f"{len(shared)} patient(s) have images in both {Path(train_val_file).name} and this list "
            f"(the split must be patient-disjoint): patient ids {_few(shared)}",
        )
    files = {"labels": Path(label_file), "boxes": Path(box_file), "train_val": Path(train_val_file)}
    files["test"] = Path(test_file)
    return ChestXray14Tables(labels, boxes, train_val, test, files)


def read_dataset_tables(dataset_dir: str | os.PathLike) -> ChestXray14Tables:
    """:func:`read_tables` on a folder laid out as NIH ships it (the label file v2020 preferred)."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise _error(dataset_dir, "dataset folder not found")
    return read_tables(
        _find_one(dataset_dir, LABEL_FILE_NAMES, "label file"),
        _find_one(dataset_dir, BOX_FILE_NAMES, "box file"),
        _find_one(dataset_dir, (TRAIN_VAL_LIST,), "train/val list"),
        _find_one(dataset_dir, (TEST_LIST,), "test list"),
    )


def split_by_patient(
    images: Sequence[str],
    patient_of: Mapping[str, str] | Callable[[str], str],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
) -> tuple[list[str], list[str]]:
    """Split images into (training, validation) by patient, reproducibly.

    The patients are sorted, shuffled with ``numpy.random.default_rng(seed)``, and the first
    round(val_fraction * n_patients) (at least one when val_fraction > 0 and there are >= 2 patients) go to
    validation with all their images. The fraction is of patients, so the image fraction is close to it but
    not equal. Both outputs keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    lookup = patient_of if callable(patient_of) else patient_of.__getitem__
    patients = sorted({lookup(name) for name in images})
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and n_val == 0 and len(patients) >= 2:
        n_val = 1
    order = np.random.default_rng(seed).permutation(len(patients))
    val_patients = {patients[i] for i in order[:n_val]}
    training = [name for name in images if lookup(name) not in val_patients]
    validation = [name for name in images if lookup(name) in val_patients]
    return training, validation


def read_image_sizes(
    image_dir: str | os.PathLike, names: Sequence[str], num_workers: int = 8
) -> tuple[dict[str, tuple[int, int]], list[str], dict[str, str]]:
    """Read each image's size [H, W] from its header only (no pixel decoding): NIH's PNGs, or DICOM
    radiographs (``custom.transforms.grey_image.read_image_size``). What the header already shows to be
    unusable (not an image, CT/SR/multi-frame DICOM, smaller than 32 px a side ...) is unreadable, with the
    loader's reason.

    Returns (sizes: name -> (H, W), missing: names with no file, unreadable: name -> reason). Threads
    (``num_workers``; 0 = in this thread) overlap the file-system latency, which dominates on network disks.
    """

    def one(name: str) -> tuple[str, tuple[int, int] | None, str | None]:
        path = Path(image_dir) / name
        try:
            size = read_image_size(path)
        except ImageLoadError as error:
            return name, None, "missing" if not path.exists() else error.reason
        return name, size, None

    if num_workers > 0 and len(names) > 256:
        with ThreadPoolExecutor(num_workers) as pool:
            results = list(pool.map(one, names, chunksize=256))
    else:
        results = [one(name) for name in names]
    sizes, missing, unreadable = {}, [], {}
    for name, size, problem in results:
        if size is not None:
            sizes[name] = size
        elif problem == "missing":
            missing.append(name)
        else:
            unreadable[name] = problem
    return sizes, missing, unreadable


def check_image_sizes(
    image_dir: str | os.PathLike, missing: Sequence[str], unreadable: Mapping[str, str]
) -> None:
    """Raise ChestXray14FormatError listing missing and unreadable images by name (first few and a count)."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} listed image(s) missing: {_few(sorted(missing))}")
    if unreadable:
        few = [f"{name} ({reason})" for name, reason in sorted(unreadable.items())[:MAX_NAMES_IN_MESSAGE]]
        more = f" and {len(unreadable) - len(few)} more" if len(unreadable) > len(few) else ""
        problems.append(f"{len(unreadable)} image(s) unreadable: {', '.join(few)}{more}")
    if problems:
        raise _error(image_dir, "; ".join(problems))


def make_datalist(
    tables: ChestXray14Tables,
    splits: Mapping[str, Sequence[str]],
    image_path: Callable[[str], str] = lambda name: f"{IMAGE_DIR}/{name}",
    image_sizes: Mapping[str, Sequence[int]] | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict:
    """Build the datalist dict from validated tables and a split (see the module docstring for the format).

    Args:
        tables: from :func:`read_tables` / :func:`read_dataset_tables`.
        splits: ``{"training": [names], "validation": [names], "test": [names]}``.
        image_path: image name -> the item's ``image`` string (relative to the datalist's folder).
        image_sizes: image name -> (H, W) of the file as read; every item needs one. None (tables only, no
            images) leaves ``original_size`` out and skips the box-inside-image check.
        extra: more top-level entries (e.g. the split parameters).

    ``class_weights`` come from the training labels (paper Eq. 1). Only test items carry boxes (weak
    supervision: training never sees them). A box lying outside its image by more than 1 px raises
    ChestXray14FormatError (its coordinates are in another image's pixel space).
    """
    missing_keys = [key for key in SPLIT_KEYS if key not in splits]
    if missing_keys:
        raise ValueError(f"splits lacks {missing_keys}; it needs {SPLIT_KEYS}")
    items = {
        key: [_item(tables, name, key == "test", image_path, image_sizes) for name in splits[key]]
        for key in SPLIT_KEYS
    }
    if not items["training"]:
        raise ChestXray14FormatError("the training split is empty: no class-balance weights can be computed")
    datalist: dict = {
        "class_names": list(CLASS_NAMES),
        "class_weights": datalist_class_weights(items["training"]),
    }
    datalist.update(extra or {})
    datalist.update(items)
    return datalist


def _item(
    tables: ChestXray14Tables,
    name: str,
    with_boxes: bool,
    image_path: Callable[[str], str],
    image_sizes: Mapping[str, Sequence[int]] | None,
) -> dict:
    """One datalist item for image ``name``."""
    record = tables.labels[name]
    item: dict = {"image": image_path(name), "label": list(record.label), "patient_id": record.patient_id}
    size = None
    if image_sizes is not None:
        if name not in image_sizes:
            raise ValueError(f"no image size for {name}")
        size = [int(v) for v in image_sizes[name]]
        item["original_size"] = size
    if with_boxes and name in tables.boxes:
        for box in tables.boxes[name]:
            if size is not None and not _inside(box.box, size):
                raise _error(
                    tables.files.get("boxes", "box file"),
                    f"image {name}: box xyxy {[round(v, 2) for v in box.box]} lies outside the image, "
                    "which is "
                    f"{size[0]}x{size[1]} (HxW) px: box coordinates must be in the PNG's own pixels",
                    box.line,
                )
        item["boxes"] = [list(box.box) for box in tables.boxes[name]]
        item["box_labels"] = [box.class_index for box in tables.boxes[name]]
    return item


def _inside(box: Sequence[float], size: Sequence[int]) -> bool:
    """True when an xyxy box lies within an [H, W] image, up to BOX_OUTSIDE_TOLERANCE_PX."""
    x0, y0, x1, y1 = box
    tol = BOX_OUTSIDE_TOLERANCE_PX
    return x0 >= -tol and y0 >= -tol and x1 <= size[1] + tol and y1 <= size[0] + tol


def _few(names: Sequence[str]) -> str:
    """The first MAX_NAMES_IN_MESSAGE names, then 'and N more'."""
    shown = ", ".join(str(n) for n in names[:MAX_NAMES_IN_MESSAGE])
    return shown + (
        f" and {len(names) - MAX_NAMES_IN_MESSAGE} more" if len(names) > MAX_NAMES_IN_MESSAGE else ""
    )


def build_chestxray14_datalist(
    dataset_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = DEFAULT_SEED,
    num_workers: int = 8,
) -> dict:
    """Read a ChestX-ray14 folder (NIH layout) and return its datalist, images checked.

    Args:
        dataset_dir: the folder (see the module docstring).
        base_dir: the folder the datalist JSON will live in; ``image`` paths are made relative to it
            (default ``dataset_dir``). MONAI's ``load_decathlon_datalist(..., base_dir=<that folder>)`` joins
            them back.
        val_fraction, seed: the patient-level validation split of train_val (:func:`split_by_patient`).
        num_workers: threads reading PNG headers.

    Raises:
        ChestXray14FormatError: bad tables, or images missing/unreadable (listed by name, first few + count).
    """
    dataset_dir = Path(dataset_dir)
    base_dir = Path(base_dir) if base_dir is not None else dataset_dir
    tables = read_dataset_tables(dataset_dir)
    image_dir = dataset_dir / IMAGE_DIR
    if not image_dir.is_dir():
        raise _error(
            image_dir, f"image folder not found ({len(tables.train_val) + len(tables.test)} images listed)"
        )
    names = tables.train_val + tables.test
    sizes, missing, unreadable = read_image_sizes(image_dir, names, num_workers)
    check_image_sizes(image_dir, missing, unreadable)
    training, validation = split_by_patient(
        tables.train_val, lambda n: tables.labels[n].patient_id, val_fraction, seed
    )
    splits = {"training": training, "validation": validation, "test": tables.test}
    return make_datalist(
        tables,
        splits,
        image_path=lambda name: relative_path(image_dir / name, base_dir),
        image_sizes=sizes,
        extra={"split": split_description(val_fraction, seed)},
    )


def split_description(val_fraction: float, seed: int) -> dict:
    """The ``split`` entry recorded in datalists: how training/validation were drawn from train_val."""
    return {"by": "patient", "val_fraction": float(val_fraction), "seed": int(seed), "source": TRAIN_VAL_LIST}


def relative_path(path: str | os.PathLike, base_dir: str | os.PathLike) -> str:
    """``path`` relative to ``base_dir`` with '/' separators (what a datalist item's ``image`` holds)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir))).as_posix()


def write_datalist(datalist: Mapping, path: str | os.PathLike) -> Path:
    """Write a datalist as JSON, one item a line, atomically (temp file beside it, then os.replace).

    One item a line keeps the full 112,120-image datalist around 20 MB and diffable. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for key, value in datalist.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            body = ",\n".join("  " + json.dumps(item) for item in value)
            parts.append(f" {json.dumps(key)}: [\n{body}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    with atomic_output(path) as temp:
        temp.write_text("{\n" + ",\n".join(parts) + "\n}\n", encoding="utf-8")
    return path
