"""Reading ChestX-ray14 as NIH ships it: real sample rows and PNGs, the full official label and box files,
bad tables, patient-level splits, datalists and class-balance weights."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist
from PIL import Image

from custom.data.chestxray14 import (
    ChestXray14FormatError,
    build_chestxray14_datalist,
    make_datalist,
    read_box_table,
    read_label_table,
    read_tables,
    split_by_patient,
    write_datalist,
)
from custom.data.class_balance import class_balance_weights, datalist_class_weights
from custom.labels import BOX_CLASS_INDICES, CLASS_INDEX, CLASS_NAMES

SAMPLE = Path(__file__).parent / "data" / "nih_sample"
LABEL_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def official_file(name: str) -> Path:
    """The full official NIH file shipped (gz) in torchxrayvision's data folder."""
    torchxrayvision = pytest.importorskip("torchxrayvision")
    return Path(torchxrayvision.__file__).parent / "data" / name


@pytest.fixture(scope="module")
def official_labels():
    return read_label_table(official_file("Data_Entry_2017_v2020.csv.gz"))


@pytest.fixture
def sample_dataset(tmp_path) -> Path:
    """A ChestX-ray14 folder from the 4 real sample PNGs and their NIH rows, with split lists written here."""
    root = tmp_path / "chestxray14"
    shutil.copytree(SAMPLE, root)
    (root / "train_val_list.txt").write_text("00000147_001.png\n00004994_000.png\n00002578_000.png\n")
    (root / "test_list.txt").write_text("00001369_000.png\n")
    return root


def write_tables(
    folder: Path, labels: str, boxes: str = "", train_val: str = "", test: str = ""
) -> list[Path]:
    """Write the four NIH tables (headers included) into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / n for n in ("labels.csv", "boxes.csv", "train_val_list.txt", "test_list.txt")]
    for path, text in zip(paths, (LABEL_HEADER + labels, BOX_HEADER + boxes, train_val, test), strict=True):
        path.write_text(text)
    return paths


def label_row(image: str, findings: str, patient: int) -> str:
    return f"{image},{findings},0,{patient},50,F,PA,2048,2500,0.171,0.171\n"


# ---------------------------------------------------------------- real sample rows


def test_sample_label_and_box_rows():
    labels = read_label_table(SAMPLE / "Data_Entry_2017_v2020.csv")
    assert sorted(labels) == ["00000147_001.png", "00001369_000.png", "00002578_000.png", "00004994_000.png"]
    record = labels["00004994_000.png"]
    assert record.patient_id == "4994" and len(record.label) == 14
    assert [CLASS_NAMES[i] for i, v in enumerate(record.label) if v] == ["Atelectasis", "Fibrosis"]
    boxes = read_box_table(SAMPLE / "BBox_List_2017.csv", known_images=labels)
    (cardio,) = boxes["00001369_000.png"]
    # NIH: x, y = TOP-LEFT corner, w, h; xyxy = [x, y, x + w, y + h] in the PNG's own pixels.
    assert cardio.box == pytest.approx(
        (
            336.998941798942,
            276.31746031746,
            336.998941798942 + 553.718518518519,
            276.31746031746 + 386.844444444444,
        )
    )
    assert cardio.class_index == CLASS_INDEX["Cardiomegaly"]
    assert "00004994_000.png" not in boxes


# ---------------------------------------------------------------- the full official files


def test_full_official_label_and_box_files(official_labels):
    assert len(official_labels) == 112_120
    assert len({r.patient_id for r in official_labels.values()}) == 30_805
    positives = np.array([r.label for r in official_labels.values()]).sum(axis=0)
    assert positives[CLASS_INDEX["Hernia"]] == 227 and positives[CLASS_INDEX["Infiltration"]] == 19_894
    assert sum(1 for r in official_labels.values() if not any(r.label)) == 60_361  # 'No Finding'
    boxes = read_box_table(official_file("BBox_List_2017.csv.gz"), known_images=official_labels)
    all_boxes = [b for image_boxes in boxes.values() for b in image_boxes]
    assert len(all_boxes) == 984 and len(boxes) == 880
    per_class = Counter(CLASS_NAMES[b.class_index] for b in all_boxes)
    assert set(CLASS_INDEX[name] for name in per_class) == set(BOX_CLASS_INDICES)
    assert per_class["Infiltration"] == 123  # written 'Infiltrate' in NIH's box file
    assert per_class["Atelectasis"] == 180 and per_class["Nodule"] == 79
    # Read as top-left + size, every NIH box lies inside its 1024-px PNG.
    assert all(0 <= b.box[0] < b.box[2] <= 1024 and 0 <= b.box[1] < b.box[3] <= 1024 for b in all_boxes)


def test_full_official_tables_give_patient_disjoint_datalist(tmp_path, official_labels):
    """Without images: a patient-disjoint split written here (NIH's lists are not shipped), all 880 box images
    in test, gives a datalist with every image once, no patient in two splits, and all 984 boxes in test."""
    label_file = official_file("Data_Entry_2017_v2020.csv.gz")
    box_file = official_file("BBox_List_2017.csv.gz")
    box_images = {line.split(",")[0] for line in gzip.open(box_file, "rt").read().splitlines()[1:]}
    test_patients = {official_labels[n].patient_id for n in box_images}
    test_patients |= {r.patient_id for r in official_labels.values() if int(r.patient_id) % 5 == 0}
    names = sorted(official_labels)
    test = [n for n in names if official_labels[n].patient_id in test_patients]
    train_val = [n for n in names if official_labels[n].patient_id not in test_patients]
    (tmp_path / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (tmp_path / "test_list.txt").write_text("\n".join(test) + "\n")
    tables = read_tables(label_file, box_file, tmp_path / "train_val_list.txt", tmp_path / "test_list.txt")
    training, validation = split_by_patient(tables.train_val, lambda n: tables.labels[n].patient_id)
    datalist = make_datalist(tables, {"training": training, "validation": validation, "test": tables.test})
    splits = {key: datalist[key] for key in ("training", "validation", "test")}
    assert sum(len(items) for items in splits.values()) == 112_120
    patients = {key: {item["patient_id"] for item in items} for key, items in splits.items()}
    assert not (patients["training"] & patients["validation"]) and not (
        patients["training"] & patients["test"]
    )
    assert not (patients["validation"] & patients["test"])
    n_patients = len(patients["training"]) + len(patients["validation"])
    assert len(patients["validation"]) == round(0.1 * n_patients)
    with_boxes = [item for item in splits["test"] if "boxes" in item]
    assert len(with_boxes) == 880 and sum(len(item["boxes"]) for item in with_boxes) == 984
    assert all(len(i["boxes"]) == len(i["box_labels"]) for i in with_boxes)
    assert not any("boxes" in item for item in splits["training"] + splits["validation"])
    assert "original_size" not in splits["test"][0]  # no images read
    train_labels = np.array([item["label"] for item in splits["training"]])
    np.testing.assert_allclose(datalist["class_weights"]["negative"], train_labels.mean(axis=0))
    np.testing.assert_allclose(datalist["class_weights"]["positive"], 1 - train_labels.mean(axis=0))


# ---------------------------------------------------------------- datalist from a folder with real PNGs


def test_datalist_from_sample_folder(sample_dataset, tmp_path):
    out_dir = tmp_path / "out"
    datalist = build_chestxray14_datalist(sample_dataset, base_dir=out_dir, val_fraction=0.3, seed=34)
    assert datalist["class_names"] == list(CLASS_NAMES)
    assert datalist["split"] == {
        "by": "patient",
        "val_fraction": 0.3,
        "seed": 34,
        "source": "train_val_list.txt",
    }
    assert len(datalist["training"]) == 2 and len(datalist["validation"]) == 1 and len(datalist["test"]) == 1
    (test_item,) = datalist["test"]
    assert test_item["patient_id"] == "1369" and test_item["original_size"] == [1024, 1024]
    assert test_item["box_labels"] == [CLASS_INDEX["Cardiomegaly"]]
    assert test_item["boxes"][0] == pytest.approx(
        [336.998941798942, 276.31746031746, 890.717460317461, 663.1619047619]
    )
    path = write_datalist(datalist, out_dir / "datalist.json")
    for key in ("training", "validation", "test"):
        for item in load_decathlon_datalist(path, False, key, base_dir=out_dir):
            assert Path(item["image"]).is_file(), item["image"]
            assert len(item["label"]) == 14 and set(item["label"]) <= {0.0, 1.0}
            assert Image.open(item["image"]).size == tuple(item["original_size"][::-1])


def test_missing_and_unreadable_images_are_named(sample_dataset):
    (sample_dataset / "images" / "00002578_000.png").unlink()
    (sample_dataset / "images" / "00004994_000.png").write_text("not an image")
    with pytest.raises(ChestXray14FormatError) as caught:
        build_chestxray14_datalist(sample_dataset)
    message = str(caught.value)
    assert "1 listed image(s) missing: 00002578_000.png" in message
    assert "00004994_000.png (not a PNG, DICOM or .npy image (content is text" in message
    shutil.rmtree(sample_dataset / "images")
    with pytest.raises(ChestXray14FormatError, match="image folder not found"):
        build_chestxray14_datalist(sample_dataset)


def test_box_outside_its_png_is_refused(sample_dataset):
    """NIH's 1024-px boxes against a PNG downsized to 512 px: the box is in another image's pixels."""
    path = sample_dataset / "images" / "00001369_000.png"
    Image.open(path).resize((512, 512)).save(path)
    with pytest.raises(
        ChestXray14FormatError, match=r"BBox_List_2017.csv, line 3: image 00001369_000.png: box"
    ):
        build_chestxray14_datalist(sample_dataset)


def test_missing_table_is_named(sample_dataset):
    (sample_dataset / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(ChestXray14FormatError, match="no label file found.*Data_Entry_2017.csv"):
        build_chestxray14_datalist(sample_dataset)


# ---------------------------------------------------------------- bad tables


@pytest.mark.parametrize(
    "labels, expected",
    [
        ("a.png,Atelectasis,0,1\n", "missing column 'Patient ID'"),
        (
            label_row("a.png", "Atelectasis|Pneumonitis", 1),
            "line 2: image a.png: unknown label 'Pneumonitis'",
        ),
        (
            label_row("a.png", "Mass", 1) + label_row("a.png", "Mass", 1),
            "line 3: duplicate row for image a.png",
        ),
        (
            label_row("a.png", "No Finding|Mass", 1),
            "line 2: image a.png: 'No Finding' together with other labels",
        ),
        (label_row("a.png", "", 1), "line 2: image a.png: empty finding label"),
        (label_row("a.png", "Mass", 1) + "b.png,Mass\n", "line 3: row has 2 fields"),
        (label_row("../a.png", "Mass", 1), "line 2: '../a.png' is not an image file name"),
    ],
)
def test_bad_label_table(tmp_path, labels, expected):
    header = "Image Index,Finding Labels,Follow-up #\n" if "Patient ID" in expected else LABEL_HEADER
    (tmp_path / "labels.csv").write_text(header + labels)
    with pytest.raises(ChestXray14FormatError) as caught:
        read_label_table(tmp_path / "labels.csv")
    assert str(tmp_path / "labels.csv") in str(caught.value) and expected in str(caught.value)


@pytest.mark.parametrize(
    "boxes, expected",
    [
        ("a.png,Mass,1,2,abc,4\n", "line 2: image a.png: non-numeric box"),
        ("a.png,Mass,1,2,0,4\n", "w, h > 0"),
        ("a.png,Masses,1,2,3,4\n", "line 2: image a.png: unknown box label 'Masses'"),
        (
            "a.png,Mass,1,2,3,4\na.png,Mass,1,2,3,4\n",
            "line 3: duplicate box row for image a.png (same as line 2)",
        ),
        ("z.png,Mass,1,2,3,4\n", "line 2: image z.png has a box but is not in the label file"),
        ("a.png,Mass,1,2,3\n", "line 2: expected 6 fields"),
    ],
)
def test_bad_box_table(tmp_path, boxes, expected):
    paths = write_tables(tmp_path, label_row("a.png", "Mass", 1), boxes, "a.png\n", "")
    with pytest.raises(ChestXray14FormatError) as caught:
        read_tables(*paths)
    assert str(paths[1]) in str(caught.value) and expected in str(caught.value)


def test_bad_box_header(tmp_path):
    (tmp_path / "boxes.csv").write_text("Image,Label,x,y,w,h\n")
    with pytest.raises(ChestXray14FormatError, match="line 1: unexpected header"):
        read_box_table(tmp_path / "boxes.csv")


def test_infiltrate_and_well_formed_box_header(tmp_path):
    (tmp_path / "boxes.csv").write_text("Image Index,Finding Label,x,y,w,h\na.png,Infiltrate,10,20,30,40\n")
    (box,) = read_box_table(tmp_path / "boxes.csv")["a.png"]
    assert box.class_index == CLASS_INDEX["Infiltration"] and box.box == (10.0, 20.0, 40.0, 60.0)


@pytest.mark.parametrize(
    "train_val, test, bad_file, expected",
    [
        ("a.png\nz.png\n", "b.png\n", 2, "line 2: image z.png is not in the label file"),
        ("a.png\na.png\n", "b.png\n", 2, "line 2: image a.png listed twice (first on line 1)"),
        ("a.png\n", "a.png\nb.png\n", 3, "1 image(s) also in train_val_list.txt: a.png"),
        ("a.png\nc.png\n", "b.png\n", 3, "1 patient(s) have images in both train_val_list.txt and this list"),
    ],
)
def test_bad_split_lists(tmp_path, train_val, test, bad_file, expected):
    labels = label_row("a.png", "Mass", 1) + label_row("b.png", "Mass", 2) + label_row("c.png", "Nodule", 2)
    paths = write_tables(tmp_path, labels, "", train_val, test)
    with pytest.raises(ChestXray14FormatError) as caught:
        read_tables(*paths)
    assert str(paths[bad_file]) in str(caught.value) and expected in str(caught.value)


# ---------------------------------------------------------------- patient split


def test_split_by_patient_is_seeded_and_patient_disjoint():
    images = [f"{p:05d}_{k:03d}.png" for p in range(200) for k in range(p % 4 + 1)]
    patient = lambda name: name[:5]  # noqa: E731
    training, validation = split_by_patient(images, patient, val_fraction=0.2, seed=34)
    assert sorted(training + validation) == sorted(images)
    assert not {patient(n) for n in training} & {patient(n) for n in validation}
    assert len({patient(n) for n in validation}) == 40
    assert split_by_patient(images, patient, 0.2, 34) == (training, validation)
    assert split_by_patient(images, patient, 0.2, 35)[1] != validation
    assert split_by_patient(images, patient, 0.0, 34) == (images, [])
    few = split_by_patient(images[:3], patient, 0.01, 34)[1]  # 2 patients: still one validation patient
    assert len({patient(n) for n in few}) == 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_patient(images, patient, 1.0)


# ---------------------------------------------------------------- class-balance weights (paper Eq. 1)


def test_class_balance_weights():
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    positive, negative = class_balance_weights(labels)
    assert positive.shape == (3,) and positive.dtype == torch.float32
    assert torch.allclose(positive, torch.tensor([0.25, 0.75, 1.0])) and torch.allclose(
        negative, 1 - positive
    )
    weights = datalist_class_weights([{"label": row} for row in labels.tolist()])
    assert weights == {"positive": [0.25, 0.75, 1.0], "negative": [0.75, 0.25, 0.0]}
    with pytest.raises(ValueError, match="0/1"):
        class_balance_weights([[0.5, 1.0]])
    with pytest.raises(ValueError, match="N, K > 0"):
        class_balance_weights(np.zeros((0, 14)))
