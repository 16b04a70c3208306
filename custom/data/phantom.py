"""A synthetic ChestX-ray14 ("phantom") written in exactly NIH's layout, with known lesion boxes.

CI and the CPU demo cannot have NIH's images, so this writes chest-like radiographs that the project's NIH
loader reads unchanged::

    <out>/images/<8-digit patient>_<3-digit follow-up>.png  8-bit grey, S x S
    <out>/Data_Entry_2017_v2020.csv         NIH's header; 'No Finding' for healthy images
    <out>/train_val_list.txt, test_list.txt patient-disjoint, one image name a line
    <out>/BBox_List_2017.csv                NIH's malformed header; TEST images only; x, y = TOP-LEFT corner,
                                            w, h, in the PNG's pixels; 'Infiltrate' for Infiltration (NIH's)
    <out>/phantom.json                      the settings and a summary (written last)

Design: anatomy (``phantom_anatomy``) varies per patient and per image; each of the 14 findings
(``phantom_lesions``) has its own appearance and location prior. The 8 box classes take their boxes from the
statistics of NIH's real BBox_List (``BOX_STATISTICS``), so the no-image prior (the mean box) is about as
strong as on real data. Everything is drawn from ``seed``: the same settings give byte-identical files,
whatever the number of worker processes. See ``docs/phantom.md`` for the design and measured numbers.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from custom.data.phantom_anatomy import (
    Anatomy,
    ValueNoise,
    emphysematous,
    jitter_anatomy,
    pixel_grid,
    render_anatomy,
    sample_patient_anatomy,
    with_heart,
)
from custom.data.phantom_lesions import LESIONS, Canvas, Lesion, lesion_region
from custom.labels import BOX_CLASS_NAMES, CLASS_NAMES, NO_FINDING

logger = logging.getLogger(__name__)

# Bump when a change alters the files written for given settings: an existing phantom then no longer matches.
PHANTOM_VERSION = 1

DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
BBOX_LABEL_SPELLING = {"Infiltration": "Infiltrate"}  # NIH's spelling in BBox_List_2017.csv
FILES = ("Data_Entry_2017_v2020.csv", "BBox_List_2017.csv", "train_val_list.txt", "test_list.txt")

# Fraction of images with each finding. Roughly NIH's order (Infiltration and Effusion commonest), but every
# class has enough positives to learn from and, at 2,000 images, >= 30 test boxes per box class.
PREVALENCE = {
    "Atelectasis": 0.11,
    "Cardiomegaly": 0.09,
    "Effusion": 0.12,
    "Infiltration": 0.15,
    "Mass": 0.09,
    "Nodule": 0.09,
    "Pneumonia": 0.09,
    "Pneumothorax": 0.09,
    "Consolidation": 0.06,
    "Edema": 0.05,
    "Emphysema": 0.05,
    "Fibrosis": 0.05,
    "Pleural_Thickening": 0.06,
    "Hernia": 0.05,
}
NO_FINDING_FRACTION = 0.42
TEST_FRACTION = 0.22  # of images, split by patient
FIELD_OF_VIEW_MM = 430.0  # physical width of every phantom image, for the pixel-spacing column
# An enlarged heart is drawn at least this wide (normalised); normal hearts stay below ~0.36.
MIN_CARDIOMEGALY_WIDTH = 0.38

BOX_GROUPS = (
    "right",
    "both",
    "left",
)  # box centre u < 0.45 (image left = patient's right), 0.45-0.55, >= 0.55
GROUP_EDGES = (0.45, 0.55)
MIN_GROUP_BOXES = 3  # groups with fewer real boxes are left out of the table


class BoxStatistics(NamedTuple):
    """Statistics of one class's boxes in one group, in image fractions (box / image side).

    Fields: the class, the group (``BOX_GROUPS``), the number of real boxes, mean and s.d. of the box centre
    u (across) and v (down), mean and s.d. of log width and log height, and the correlation of the two logs.
    """

    name: str
    group: str
    count: int
    centre_u_mean: float
    centre_u_std: float
    centre_v_mean: float
    centre_v_std: float
    log_width_mean: float
    log_width_std: float
    log_height_mean: float
    log_height_std: float
    log_size_correlation: float


# Computed ONCE by ``box_statistics(read_bbox_list(path), 1024)`` from NIH's BBox_List_2017.csv (984 boxes on
# 1024 x 1024 images) as shipped in torchxrayvision's data folder (``BBox_List_2017.csv.gz``), rounded to 4
# decimals; tests/test_phantom.py recomputes it from that file. Boxes split by centre into the patient's right
# lung, both sides (bilateral findings, central hearts) and the left lung, because a single mean would put
# most classes' boxes on the mediastinum.
BOX_STATISTICS = tuple(
    BoxStatistics(*row)
    for row in (
        ("Atelectasis", "right", 86, 0.3063, 0.0649, 0.5529, 0.1171, -1.8618, 0.4162, -2.1952, 0.487, 0.3069),
        ("Atelectasis", "both", 14, 0.5097, 0.0256, 0.5985, 0.1006, -0.5895, 0.416, -1.8243, 0.5167, -0.2492),
        ("Atelectasis", "left", 80, 0.727, 0.0728, 0.5799, 0.1155, -1.7434, 0.4622, -2.0986, 0.5199, 0.3246),
        ("Cardiomegaly", "both", 44, 0.5256, 0.0215, 0.5641, 0.064, -0.7732, 0.1207, -0.9914, 0.1288, 0.4447),
        (
            "Cardiomegaly",
            "left",
            100,
            0.5989,
            0.0345,
            0.5694,
            0.064,
            -0.7605,
            0.1078,
            -1.0045,
            0.1592,
            0.5115,
        ),
        ("Effusion", "right", 77, 0.2312, 0.0639, 0.5273, 0.1175, -1.6986, 0.5715, -1.2642, 0.7458, 0.4463),
        ("Effusion", "both", 5, 0.51, 0.0204, 0.5701, 0.0891, -0.3198, 0.1364, -1.9283, 0.292, 0.8842),
        ("Effusion", "left", 71, 0.781, 0.0625, 0.5975, 0.1131, -1.7216, 0.3871, -1.5005, 0.6947, 0.1833),
        (
            "Infiltration",
            "right",
            42,
            0.3152,
            0.0577,
            0.5368,
            0.1395,
            -1.6204,
            0.2401,
            -1.5204,
            0.4928,
            0.5272,
        ),
        (
            "Infiltration",
            "both",
            19,
            0.4945,
            0.0267,
            0.4861,
            0.1013,
            -0.5516,
            0.3424,
            -1.0312,
            0.5279,
            0.4667,
        ),
        ("Infiltration", "left", 62, 0.684, 0.058, 0.5293, 0.1006, -1.4842, 0.3882, -1.3134, 0.3851, 0.5517),
        ("Mass", "right", 44, 0.3275, 0.0725, 0.4648, 0.1123, -1.9544, 0.536, -1.8098, 0.6551, 0.9073),
        ("Mass", "left", 39, 0.7093, 0.0882, 0.4338, 0.1206, -2.0989, 0.5835, -1.9879, 0.5314, 0.7869),
        ("Nodule", "right", 38, 0.2815, 0.0885, 0.4723, 0.1507, -2.6847, 0.282, -2.7122, 0.3287, 0.8601),
        ("Nodule", "left", 41, 0.7521, 0.0736, 0.4916, 0.1591, -2.7152, 0.3332, -2.7473, 0.3357, 0.8593),
        ("Pneumonia", "right", 52, 0.3057, 0.051, 0.5619, 0.1034, -1.5831, 0.2851, -1.4217, 0.4912, 0.5647),
        ("Pneumonia", "both", 11, 0.5049, 0.0264, 0.5138, 0.0972, -0.4522, 0.1051, -0.7403, 0.2904, 0.69),
        ("Pneumonia", "left", 57, 0.6864, 0.0512, 0.558, 0.1067, -1.4615, 0.348, -1.331, 0.3726, 0.51),
        ("Pneumothorax", "right", 56, 0.2769, 0.072, 0.3411, 0.1827, -1.7991, 0.5898, -1.648, 0.8412, 0.531),
        (
            "Pneumothorax",
            "left",
            42,
            0.6988,
            0.0612,
            0.3025,
            0.1937,
            -1.6984,
            0.4287,
            -1.7032,
            0.5847,
            0.3045,
        ),
    )
)


def box_statistics(boxes_by_class: dict[str, np.ndarray], image_size: float) -> tuple[BoxStatistics, ...]:
    """Per-class, per-group box statistics (the form of ``BOX_STATISTICS``).

    Args:
        boxes_by_class: ``{class: float array [N, 4]}``, xyxy in pixels of square images of side
            ``image_size`` (as from ``custom.data.box_prior.read_bbox_list``).
        image_size: side of those images in pixels (1024 for NIH).

    Returns:
        One ``BoxStatistics`` per (class, group) with at least ``MIN_GROUP_BOXES`` boxes, classes in
        ``BOX_CLASS_NAMES`` order, groups in ``BOX_GROUPS`` order, floats rounded to 4 decimals; s.d. with
        ddof=1.
    """
    rows = []
    for name in BOX_CLASS_NAMES:
        if name not in boxes_by_class:
            continue
        boxes = np.asarray(boxes_by_class[name], dtype=np.float64) / image_size
        centre_u, centre_v = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        log_w, log_h = np.log(boxes[:, 2] - boxes[:, 0]), np.log(boxes[:, 3] - boxes[:, 1])
        group_of = np.digitize(centre_u, GROUP_EDGES)
        for index, group in enumerate(BOX_GROUPS):
            member = group_of == index
            if member.sum() < MIN_GROUP_BOXES:
                continue
            values = [centre_u[member], centre_v[member], log_w[member], log_h[member]]
            stats = [round(float(f(x)), 4) for x in values for f in (np.mean, lambda y: np.std(y, ddof=1))]
            correlation = round(float(np.corrcoef(log_w[member], log_h[member])[0, 1]), 4)
            rows.append(BoxStatistics(name, group, int(member.sum()), *stats, correlation))
    return tuple(rows)


def sample_box(name: str, rng: np.random.Generator) -> tuple[tuple[float, float, float, float], str]:
    """Draw a target box of a box class from ``BOX_STATISTICS``.

    A group is chosen in proportion to its real box count, then the centre from independent normals and the
    log size from a correlated bivariate normal. Sizes are kept in [0.02, 0.9] (Cardiomegaly at least
    ``MIN_CARDIOMEGALY_WIDTH`` wide) and the box is moved inside [0.01, 0.99].

    Returns:
        ``(box, group)``: xyxy normalised to the image side, and its group name.
    """
    rows = [row for row in BOX_STATISTICS if row.name == name]
    if not rows:
        raise ValueError(f"no box statistics for {name!r}; box classes are {BOX_CLASS_NAMES}")
    counts = np.array([row.count for row in rows], dtype=np.float64)
    row = rows[int(rng.choice(len(rows), p=counts / counts.sum()))]
    centre_u = rng.normal(row.centre_u_mean, row.centre_u_std)
    centre_v = rng.normal(row.centre_v_mean, row.centre_v_std)
    cov = row.log_size_correlation * row.log_width_std * row.log_height_std
    log_w, log_h = rng.multivariate_normal(
        [row.log_width_mean, row.log_height_mean],
        [[row.log_width_std**2, cov], [cov, row.log_height_std**2]],
        method="cholesky",
    )
    width, height = np.clip(np.exp([log_w, log_h]), 0.02, 0.9)
    if name == "Cardiomegaly":
        width = max(width, MIN_CARDIOMEGALY_WIDTH)
    centre_u = float(np.clip(centre_u, 0.01 + width / 2, 0.99 - width / 2))
    centre_v = float(np.clip(centre_v, 0.01 + height / 2, 0.99 - height / 2))
    box = (centre_u - width / 2, centre_v - height / 2, centre_u + width / 2, centre_v + height / 2)
    return tuple(float(value) for value in box), row.group


@dataclass(frozen=True)
class ImageSpec:
    """Everything needed to write one phantom image and its rows.

    Attributes:
        name: file name, ``<8-digit patient>_<3-digit follow-up>.png``.
        patient_id, follow_up, age, gender, view: the Data_Entry columns.
        split: ``"train_val"`` or ``"test"``.
        labels: findings, in ``CLASS_NAMES`` order (empty = No Finding).
        anatomy: the chest of this image.
        lesions: one ``Lesion`` per finding.
        boxes: ``(class, xyxy)`` per box-class finding: its true extent in the PNG's pixels.
        render_seed: seed of the acquisition (blur, exposure, noise).
    """

    name: str
    patient_id: int
    follow_up: int
    age: int
    gender: str
    view: str
    split: str
    labels: tuple[str, ...]
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...]
    render_seed: int


def assign_labels(count: int, rng: np.random.Generator) -> np.ndarray:
    """Multi-label findings for ``count`` images with exact class counts.

    Each class k is given to ceil(PREVALENCE[k] * count) images (at least one, when count > 0), all among the
    round((1 - NO_FINDING_FRACTION) * count) diseased images; each diseased image gets one finding first, so
    none is left empty.

    Returns:
        bool array [count, 14], columns in ``CLASS_NAMES`` order.
    """
    labels = np.zeros((count, len(CLASS_NAMES)), dtype=bool)
    if count == 0:
        return labels
    sick_count = int(np.clip(round((1 - NO_FINDING_FRACTION) * count), 1, count))
    targets = np.minimum([math.ceil(PREVALENCE[name] * count) for name in CLASS_NAMES], sick_count)
    sick = rng.permutation(count)[:sick_count]
    pool = rng.permutation(np.repeat(np.arange(len(CLASS_NAMES)), targets))
    labels[sick, pool[:sick_count]] = True
    for k, target in enumerate(targets):
        candidates = sick[~labels[sick, k]]
        extra = target - int(labels[:, k].sum())
        labels[rng.choice(candidates, size=extra, replace=False), k] = True
    return labels


def plan_phantom(num_images: int, image_size: int, seed: int) -> list[ImageSpec]:
    """Draw the whole phantom: patients, split, findings, anatomy, lesions and their measured boxes.

    Args:
        num_images: images to write (>= 2, so both splits have one).
        image_size: S, the PNG side in pixels (boxes are measured at this size).
        seed: the only source of randomness.

    Returns:
        ``ImageSpec`` per image, sorted by name.
    """
    rng = np.random.default_rng([seed, 0])
    follow_ups = []
    while sum(follow_ups) < num_images:
        follow_ups.append(int(min(rng.geometric(0.3), 15)))
    follow_ups[-1] -= sum(follow_ups) - num_images
    id_space = max(99_999, 3 * len(follow_ups))
    patient_ids = np.sort(rng.choice(np.arange(1, id_space + 1), size=len(follow_ups), replace=False))

    # Test patients until TEST_FRACTION of the images, keeping at least one patient for train_val.
    order = rng.permutation(len(follow_ups))
    test_patients, test_images = set(), 0
    for index in order[:-1]:
        if test_images >= TEST_FRACTION * num_images:
            break
        test_patients.add(int(index))
        test_images += follow_ups[index]

    records = []  # (patient index, follow-up)
    for index, count in enumerate(follow_ups):
        records += [(index, follow_up) for follow_up in range(count)]
    is_test = np.array([index in test_patients for index, _ in records])
    labels = np.zeros((num_images, len(CLASS_NAMES)), dtype=bool)
    for mask in (~is_test, is_test):
        labels[mask] = assign_labels(int(mask.sum()), rng)

    patients = [
        {
            "anatomy": sample_patient_anatomy(rng),
            "age": int(np.clip(rng.normal(47, 16), 1, 90)),
            "gender": "M" if rng.random() < 0.56 else "F",
        }
        for _ in follow_ups
    ]
    specs = []
    for image_index, (patient_index, follow_up) in enumerate(records):
        patient = patients[patient_index]
        names = tuple(name for name, present in zip(CLASS_NAMES, labels[image_index]) if present)
        anatomy, lesions, boxes = _plan_findings(
            names, jitter_anatomy(patient["anatomy"], rng), image_size, rng
        )
        specs.append(
            ImageSpec(
                name=f"{patient_ids[patient_index]:08d}_{follow_up:03d}.png",
                patient_id=int(patient_ids[patient_index]),
                follow_up=follow_up,
                age=min(95, patient["age"] + follow_up // 3),
                gender=patient["gender"],
                view="PA" if rng.random() < 0.6 else "AP",
                split="test" if is_test[image_index] else "train_val",
                labels=names,
                anatomy=anatomy,
                lesions=lesions,
                boxes=boxes,
                render_seed=int(rng.integers(2**62)),
            )
        )
    return sorted(specs, key=lambda spec: spec.name)


def _plan_findings(names: tuple[str, ...], anatomy: Anatomy, size: int, rng: np.random.Generator):
    """Anatomy changes, lesions and measured boxes of one image's findings (see ``plan_phantom``)."""
    if "Emphysema" in names:
        anatomy = emphysematous(anatomy, rng)
    drawn = {}
    if "Cardiomegaly" in names:
        drawn["Cardiomegaly"] = sample_box("Cardiomegaly", rng)
        anatomy = with_heart(anatomy, drawn["Cardiomegaly"][0])
    lesions, boxes = [], []
    for name in names:
        cls = LESIONS[name]
        if name not in BOX_CLASS_NAMES:
            lesions.append(cls(lesion_region(name, anatomy, rng), int(rng.integers(2**62)), anatomy))
            continue
        # A box (nearly) outside the chest, or covering < 2 pixel centres at this size, is drawn again.
        for _ in range(50):
            box, group = drawn.pop(name, None) or sample_box(name, rng)
            if name != "Cardiomegaly":  # the heart is where its box is; other findings stay in the chest
                box = _clip_to_thorax(box, anatomy)
                if box[2] - box[0] < 0.01 or box[3] - box[1] < 0.01:
                    continue
            lesion = cls(box, int(rng.integers(2**62)), anatomy, bilateral=group == "both")
            extent = lesion.extent(size)
            if extent is not None and extent[2] - extent[0] >= 2 and extent[3] - extent[1] >= 2:
                break
        else:
            raise RuntimeError(f"could not draw a {name} box of at least 2 pixels at image size {size}")
        lesions.append(lesion)
        boxes.append((name, extent))
    return anatomy, tuple(lesions), tuple(boxes)


def _clip_to_thorax(
    box: tuple[float, float, float, float], anatomy: Anatomy
) -> tuple[float, float, float, float]:
    """``box`` (xyxy, normalised) cut to the chest cavity of ``anatomy``, so no finding lies outside the body.

    The real statistics describe boxes in real chests; a phantom chest smaller or off-centre would otherwise
    receive some boxes partly outside its ribs. A box outside the chest comes back with zero width or height.
    """
    a = anatomy
    left, right = a.mid - a.lateral - 0.01, a.mid + a.lateral + 0.01
    top, bottom = a.apex - 0.03, max(a.base_left, a.base_right) + 0.03
    x0, y0, x1, y1 = box
    x0, x1 = max(x0, left), min(x1, right)
    y0, y1 = max(y0, top), min(y1, bottom)
    return (x0, y0, max(x0, x1), max(y0, y1))


def render_image(spec: ImageSpec, size: int) -> np.ndarray:
    """Render one phantom radiograph.

    Args:
        spec: the image (from ``plan_phantom`` with the same ``size``).
        size: S in pixels.

    Returns:
        uint8 [S, S], air dark and bone bright, as a PNG of NIH's would decode.
    """
    anatomy = spec.anatomy
    layers = render_anatomy(anatomy, size)
    canvas = Canvas(size, anatomy, layers.lungs)
    for lesion in spec.lesions:
        lesion.paint(canvas)
    markings = anatomy.marking_gain * layers.markings * canvas.marking_mask
    density = layers.tissue + markings + layers.bone + canvas.density

    # Acquisition: unsharpness, uneven exposure, the display curve, then quantum and electronic noise.
    rng = np.random.default_rng([spec.render_seed, 2])
    density = gaussian_filter(density, sigma=rng.uniform(0.3, 1.0) * size / 256, mode="nearest")
    u, v = pixel_grid(size)
    density = density + rng.uniform(0.01, 0.03) * ValueNoise(rng, (0.0, 0.0, 1.0, 1.0), 3, 3)(u, v)
    low, high, gamma = rng.uniform(0.0, 0.08), rng.uniform(0.85, 1.0), rng.uniform(0.8, 1.25)
    grey = low + (high - low) * np.clip(density / np.float32(0.85), 0.0, 1.0) ** np.float32(gamma)
    grain = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=0.7 * size / 256)
    grey = grey + rng.uniform(0.01, 0.025) * rng.standard_normal((size, size)).astype(np.float32)
    grey = grey + rng.uniform(0.01, 0.03) * grain / max(float(grain.std()), 1e-6)
    return np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)


def _write_image(spec: ImageSpec, size: int, images_dir: str) -> str:
    """Render ``spec`` and write it atomically to ``images_dir`` (a killed run leaves no truncated PNG)."""
    final = os.path.join(images_dir, spec.name)
    partial = os.path.join(images_dir, f".{spec.name}.partial")
    Image.fromarray(render_image(spec, size)).save(partial, format="PNG", compress_level=6)
    os.replace(partial, final)
    return spec.name


def _write_text(path: Path, lines: list[str]) -> None:
    """Write lines (LF endings, final newline) atomically."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    os.replace(partial, path)


def _number(value: float) -> str:
    """A box coordinate as NIH writes them: a plain decimal float."""
    return repr(float(value))


def write_tables(specs: list[ImageSpec], out_dir: Path, size: int) -> None:
    """Write Data_Entry, the split lists and BBox_List (test images only) for ``specs`` into ``out_dir``."""
    spacing = f"{FIELD_OF_VIEW_MM / size:.6g}"
    entries = [DATA_ENTRY_HEADER]
    for spec in specs:
        labels = "|".join(sorted(spec.labels)) if spec.labels else NO_FINDING  # NIH sorts them alphabetically
        entries.append(
            f"{spec.name},{labels},{spec.follow_up},{spec.patient_id},{spec.age},{spec.gender},{spec.view},"
            f"{size},{size},{spacing},{spacing}"
        )
    _write_text(out_dir / "Data_Entry_2017_v2020.csv", entries)
    _write_text(out_dir / "train_val_list.txt", [spec.name for spec in specs if spec.split == "train_val"])
    _write_text(out_dir / "test_list.txt", [spec.name for spec in specs if spec.split == "test"])
    rows = [
        (BOX_CLASS_NAMES.index(name), spec.name, name, box)
        for spec in specs
        if spec.split == "test"
        for name, box in spec.boxes
    ]
    boxes = [BBOX_HEADER]
    for _, image, name, (x0, y0, x1, y1) in sorted(rows, key=lambda row: row[:2]):
        label = BBOX_LABEL_SPELLING.get(name, name)
        boxes.append(f"{image},{label},{_number(x0)},{_number(y0)},{_number(x1 - x0)},{_number(y1 - y0)}")
    _write_text(out_dir / "BBox_List_2017.csv", boxes)


def summarize(specs: list[ImageSpec]) -> dict:
    """Counts of a planned phantom.

    Returns:
        ``{"num_images", "num_patients", "num_train_val", "num_test", "no_finding", "images_per_class",
        "test_images_per_class", "test_boxes_per_class"}``; per-class values are dicts in class order.
    """
    test = [spec for spec in specs if spec.split == "test"]
    return {
        "num_images": len(specs),
        "num_patients": len({spec.patient_id for spec in specs}),
        "num_train_val": len(specs) - len(test),
        "num_test": len(test),
        "no_finding": sum(not spec.labels for spec in specs),
        "images_per_class": {name: sum(name in spec.labels for spec in specs) for name in CLASS_NAMES},
        "test_images_per_class": {name: sum(name in spec.labels for spec in test) for name in CLASS_NAMES},
        "test_boxes_per_class": {
            name: sum(box_name == name for spec in test for box_name, _ in spec.boxes)
            for name in BOX_CLASS_NAMES
        },
    }


def make_phantom(
    out_dir: str | os.PathLike, num_images: int, image_size: int, seed: int, num_workers: int = 1
) -> dict:
    """Write a phantom ChestX-ray14 to ``out_dir`` (see the module docstring), or reuse a complete one.

    Idempotent and resumable: ``phantom.json`` records the settings; when it says a phantom with the same
    settings is complete (and its files are there) nothing is written; when a run with the same settings was
    interrupted, the images already written are kept (they are written atomically) and the rest is written.

    Args:
        out_dir: output folder (created).
        num_images: images (>= 2).
        image_size: PNG side S in pixels (>= 32).
        seed: random seed; the same settings give byte-identical files.
        num_workers: rendering processes (1 = in this process); the output does not depend on it.

    Returns:
        ``summarize``'s counts plus ``"seconds"`` (wall time of this call), ``"skipped"`` (True when a
        complete phantom was found) and ``"settings"``.

    Raises:
        ValueError: for bad arguments, or when ``out_dir`` holds a phantom made with other settings.
    """
    if int(num_images) != num_images or num_images < 2:
        raise ValueError(f"num_images must be an integer >= 2, got {num_images!r}")
    if int(image_size) != image_size or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    num_images, image_size, seed, num_workers = int(num_images), int(image_size), int(seed), int(num_workers)
    start = time.perf_counter()
    out = Path(out_dir)
    images_dir = out / "images"
    record_path = out / "phantom.json"
    settings = {"num_images": num_images, "image_size": image_size, "seed": seed, "version": PHANTOM_VERSION}

    if record_path.exists():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"{record_path}: unreadable phantom record ({error}); delete it or use another out_dir"
            ) from None
        if record.get("settings") != settings:
            raise ValueError(
                f"{record_path}: {out} holds a phantom made with {record.get('settings')}, not {settings}; "
                "use another out_dir or delete this one"
            )
        if record.get("complete") and _files_present(out, record.get("images", [])):
            logger.info("A complete phantom with settings %s is already in %s: nothing to do.", settings, out)
            return {
                **record["summary"],
                "seconds": time.perf_counter() - start,
                "skipped": True,
                "settings": settings,
            }

    images_dir.mkdir(parents=True, exist_ok=True)
    _write_record(record_path, {"settings": settings, "complete": False})
    specs = plan_phantom(num_images, image_size, seed)
    todo = [spec for spec in specs if not (images_dir / spec.name).exists()]
    if len(todo) < len(specs):
        logger.info(
            "Resuming in %s: %d of %d images already written.", out, len(specs) - len(todo), len(specs)
        )
    if num_workers == 1 or len(todo) < 2:
        for spec in todo:
            _write_image(spec, image_size, str(images_dir))
    else:
        # 'spawn' keeps workers independent of whatever threads the caller (e.g. torch) has started.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=context) as pool:
            chunk = max(1, min(32, len(todo) // (4 * num_workers)))
            for _ in pool.map(
                _write_image, todo, repeat(image_size), repeat(str(images_dir)), chunksize=chunk
            ):
                pass
    write_tables(specs, out, image_size)
    summary = summarize(specs)
    _write_record(
        record_path,
        {"settings": settings, "complete": True, "summary": summary, "images": [spec.name for spec in specs]},
    )
    seconds = time.perf_counter() - start
    logger.info("Wrote %d phantom images (%d px) to %s in %.1f s.", num_images, image_size, out, seconds)
    return {**summary, "seconds": seconds, "skipped": False, "settings": settings}


def _files_present(out: Path, images: list[str]) -> bool:
    """True when the tables and every listed image exist in ``out``."""
    return (
        bool(images)
        and all((out / name).exists() for name in FILES)
        and all((out / "images" / name).exists() for name in images)
    )


def _write_record(path: Path, record: dict) -> None:
    """Write ``phantom.json`` atomically."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)
