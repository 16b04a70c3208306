"""The synthetic ChestX-ray14 phantom: NIH's exact layout, determinism, splits, true boxes, the box prior."""

import csv
import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from custom.data import phantom
from custom.data.box_prior import leave_one_out_ious, leave_one_out_prior, overall, read_bbox_list
from custom.data.phantom import BBOX_HEADER, DATA_ENTRY_HEADER, make_phantom, plan_phantom, summarize
from custom.data.phantom_anatomy import pixel_grid
from custom.labels import BOX_CLASS_NAMES, CLASS_NAMES, NO_FINDING

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
COUNT = 60
FILES = (
    "Data_Entry_2017_v2020.csv",
    "BBox_List_2017.csv",
    "train_val_list.txt",
    "test_list.txt",
    "phantom.json",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 60-image, 64-px phantom written in this process."""
    out = tmp_path_factory.mktemp("phantom") / "a"
    summary = make_phantom(out, COUNT, SIZE, seed=3, num_workers=1)
    assert not summary["skipped"]
    return out


@pytest.fixture(scope="module")
def planned() -> list:
    """The default acceptance phantom (2,000 images, 256 px, seed 0), planned but not rendered."""
    return plan_phantom(2000, 256, 0)


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_with_any_worker_count(tiny, tmp_path):
    other = tmp_path / "b"
    make_phantom(other, COUNT, SIZE, seed=3, num_workers=2)
    first, second = all_files(tiny), all_files(other)
    assert sorted(first) == sorted(second)
    assert len([name for name in first if name.startswith("images/")]) == COUNT
    assert [name for name in first if first[name] != second[name]] == []
    changed = tmp_path / "c"
    make_phantom(changed, COUNT, SIZE, seed=4)
    assert (changed / "Data_Entry_2017_v2020.csv").read_bytes() != (
        tiny / "Data_Entry_2017_v2020.csv"
    ).read_bytes()


def test_layout_and_headers_are_nih_exact(tiny):
    assert sorted(p.name for p in tiny.iterdir()) == sorted(FILES + ("images",))
    lines = (tiny / "Data_Entry_2017_v2020.csv").read_text(encoding="utf-8").split("\n")
    assert lines[0] == (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    assert lines[0] == DATA_ENTRY_HEADER and lines[-1] == ""  # LF endings, final newline, no CR
    assert "\r" not in (tiny / "BBox_List_2017.csv").read_text(encoding="utf-8")
    assert (tiny / "BBox_List_2017.csv").read_text(encoding="utf-8").split("\n")[0] == BBOX_HEADER
    assert BBOX_HEADER == "Image Index,Finding Label,Bbox [x,y,w,h],,,"

    rows = read_rows(tiny / "Data_Entry_2017_v2020.csv")[1:]
    assert len(rows) == COUNT and [row[0] for row in rows] == sorted(row[0] for row in rows)
    for name, labels, follow_up, patient, age, gender, view, width, height, sx, sy in rows:
        assert re.fullmatch(r"\d{8}_\d{3}\.png", name)
        assert int(name[:8]) == int(patient) and int(name[9:12]) == int(follow_up)
        assert labels == NO_FINDING or all(label in CLASS_NAMES for label in labels.split("|"))
        assert labels.split("|") == sorted(labels.split("|"))
        assert 1 <= int(age) <= 95 and gender in ("M", "F") and view in ("PA", "AP")
        assert (int(width), int(height)) == (SIZE, SIZE) and float(sx) == float(sy) > 0
        with Image.open(tiny / "images" / name) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "L", (SIZE, SIZE))
    assert sorted(p.name for p in (tiny / "images").iterdir()) == [row[0] for row in rows]


def test_split_is_patient_disjoint_and_covers_every_image(tiny, planned):
    rows = read_rows(tiny / "Data_Entry_2017_v2020.csv")[1:]
    train = (tiny / "train_val_list.txt").read_text(encoding="utf-8").splitlines()
    test = (tiny / "test_list.txt").read_text(encoding="utf-8").splitlines()
    assert sorted(train + test) == sorted(row[0] for row in rows) and not set(train) & set(test)
    assert not {name[:8] for name in train} & {name[:8] for name in test}
    # At full size: ~22% of images in test, several follow-ups per patient.
    summary = summarize(planned)
    assert 0.2 <= summary["num_test"] / summary["num_images"] <= 0.25
    assert 2.5 <= summary["num_images"] / summary["num_patients"] <= 5
    patients = {
        split: {spec.patient_id for spec in planned if spec.split == split} for split in ("train_val", "test")
    }
    assert not patients["train_val"] & patients["test"]


def test_every_class_in_both_splits_and_healthy_share(tiny, planned):
    rows = read_rows(tiny / "Data_Entry_2017_v2020.csv")[1:]
    labels = {row[0]: row[1].split("|") for row in rows}
    for split_file in ("train_val_list.txt", "test_list.txt"):
        names = (tiny / split_file).read_text(encoding="utf-8").splitlines()
        present = {label for name in names for label in labels[name]}
        assert set(CLASS_NAMES) <= present, (split_file, set(CLASS_NAMES) - present)
    summary = summarize(planned)
    assert 0.4 <= summary["no_finding"] / summary["num_images"] <= 0.5
    for name, count in summary["images_per_class"].items():
        assert 0.05 <= count / summary["num_images"] <= 0.2, name
    # Acceptance: at least 30 test boxes per box class at 2,000 images.
    assert min(summary["test_boxes_per_class"].values()) >= 30, summary["test_boxes_per_class"]


def test_boxes_only_for_test_images_inside_the_image_and_one_per_finding(tiny):
    rows = read_rows(tiny / "Data_Entry_2017_v2020.csv")[1:]
    labels = {row[0]: row[1].split("|") for row in rows}
    test = set((tiny / "test_list.txt").read_text(encoding="utf-8").splitlines())
    box_rows = read_rows(tiny / "BBox_List_2017.csv")[1:]
    assert box_rows
    spelled = {"Infiltration": "Infiltrate"}
    found = {}
    for row in box_rows:
        assert len(row) == 6, row
        name, label, x, y, w, h = row[0], row[1], *map(float, row[2:])
        assert name in test and label != "Infiltration"
        finding = {"Infiltrate": "Infiltration"}.get(label, label)
        assert finding in BOX_CLASS_NAMES and finding in labels[name]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
        found[name, finding] = found.get((name, finding), 0) + 1
    expected = {(name, c) for name in test for c in labels[name] if c in BOX_CLASS_NAMES}
    assert found == {key: 1 for key in expected}
    assert {label for label in (row[1] for row in box_rows)} <= {spelled.get(c, c) for c in BOX_CLASS_NAMES}


@pytest.mark.parametrize("name", BOX_CLASS_NAMES)
def test_written_box_is_the_lesions_true_extent(name):
    """Alone on the canvas, each box finding's opacity reaches all four box edges and stays inside the box."""
    size = 128
    specs = [spec for spec in plan_phantom(160, size, 5) if name in spec.labels]
    assert specs
    for spec in specs[:4]:
        lesion = next(lesion for lesion in spec.lesions if lesion.name == name)
        x0, y0, x1, y1 = (int(value) for value in dict(spec.boxes)[name])
        u, v = pixel_grid(size)
        inside = lesion.alpha(u, v) >= 0.5
        assert inside[y0:y1, x0:x1].sum() == inside.sum() > 0
        assert inside[y0, x0:x1].any() and inside[y1 - 1, x0:x1].any()
        assert inside[y0:y1, x0].any() and inside[y0:y1, x1 - 1].any()


def test_lesions_are_visible_in_their_box():
    """Rendered with and without one finding, the image differs mostly inside that finding's box."""
    size = 128
    for spec in [spec for spec in plan_phantom(80, size, 6) if spec.boxes][:6]:
        name, (x0, y0, x1, y1) = spec.boxes[0]
        others = tuple(lesion for lesion in spec.lesions if lesion.name != name)
        without = dataclasses.replace(spec, lesions=others)
        if name == "Cardiomegaly":
            continue  # the heart is anatomy: removing the finding does not remove the heart
        difference = np.abs(
            phantom.render_image(spec, size).astype(int) - phantom.render_image(without, size)
        )
        grown = difference[max(0, int(y0) - 3) : int(y1) + 3, max(0, int(x0) - 3) : int(x1) + 3]
        assert grown.sum() >= 0.9 * difference.sum(), name
        assert grown.mean() > 5, name  # grey levels: clearly visible, not one-pixel-subtle


def test_embedded_box_statistics_match_the_real_bbox_list():
    # Located, not imported: importing torchxrayvision costs seconds and is not needed for its data file.
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.skip("torchxrayvision (a test requirement) is not installed: it ships NIH's real BBox_List")
    path = Path(spec.origin).parent / "data" / "BBox_List_2017.csv.gz"
    boxes = read_bbox_list(path)
    assert sum(len(b) for b in boxes.values()) == 984
    recomputed = phantom.box_statistics(boxes, 1024)
    assert [row[:3] for row in recomputed] == [row[:3] for row in phantom.BOX_STATISTICS]
    np.testing.assert_allclose(
        [row[3:] for row in recomputed], [row[3:] for row in phantom.BOX_STATISTICS], atol=1e-4
    )
    # The real no-image prior, as the method notes give it: class mean 0.123, Cardiomegaly 0.638.
    scores = leave_one_out_prior(boxes)
    assert overall(scores)["class_mean_iou"] == pytest.approx(0.123, abs=0.001)
    assert scores["Cardiomegaly"].mean_iou == pytest.approx(0.638, abs=0.001)


def test_phantom_box_prior_is_about_as_strong_as_on_real_data(planned):
    boxes = {}
    for spec in planned:
        if spec.split == "test":
            for name, box in spec.boxes:
                boxes.setdefault(name, []).append(box)
    scores = leave_one_out_prior({name: np.array(b) for name, b in boxes.items()})
    assert 0.08 <= overall(scores)["class_mean_iou"] <= 0.17
    assert scores["Cardiomegaly"].mean_iou > 0.5
    assert scores["Nodule"].mean_iou < 0.05 and scores["Effusion"].mean_iou < 0.1


def test_leave_one_out_prior_on_a_hand_made_case(tmp_path):
    # Two equal boxes and a third one diagonal to them: the mean of the others is computed by hand.
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [10, 10, 20, 20]], dtype=float)
    # For box 0 the others' mean is [5, 5, 15, 15]: intersection 25, union 175. For box 2 it is box 0: IoU 0.
    np.testing.assert_allclose(leave_one_out_ious(boxes), [1 / 7, 1 / 7, 0.0])
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a.png,Nodule,0,0,10,10\nb.png,Nodule,0,0,10,10,,,\nc.png,Nodule,10,10,10,10\n"
        "d.png,Infiltrate,1.5,2.5,3,4\n",
        encoding="utf-8",
    )
    read = read_bbox_list(path)
    np.testing.assert_allclose(read["Nodule"], boxes)
    np.testing.assert_allclose(read["Infiltration"], [[1.5, 2.5, 4.5, 6.5]])
    scores = leave_one_out_prior(read, thresholds=(0.1, 0.5))
    assert list(scores) == ["Nodule"]  # one Infiltration box: no leave-one-out
    assert scores["Nodule"].mean_iou == pytest.approx(2 / 21)
    assert scores["Nodule"].hit_rates == {0.1: pytest.approx(2 / 3), 0.5: 0.0}
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Nodule,0,0,-1,10\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"BBox_List_2017.csv:2: invalid box"):
        read_bbox_list(path)
    path.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Lesion,0,0,1,10\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"BBox_List_2017.csv:2: unknown finding label 'Lesion'"):
        read_bbox_list(path)


def test_rerun_is_idempotent_resumes_and_refuses_other_settings(tiny, tmp_path):
    out = tmp_path / "resume"
    make_phantom(out, 12, 32, seed=1)
    before = all_files(out)
    assert make_phantom(out, 12, 32, seed=1)["skipped"] is True
    assert all_files(out) == before
    # An interrupted run: the record says incomplete and some images are missing.
    record = json.loads((out / "phantom.json").read_text(encoding="utf-8"))
    (out / "phantom.json").write_text(json.dumps({"settings": record["settings"], "complete": False}))
    for name in sorted(os.listdir(out / "images"))[:3]:
        (out / "images" / name).unlink()
    assert make_phantom(out, 12, 32, seed=1)["skipped"] is False
    assert all_files(out) == before
    with pytest.raises(ValueError, match="phantom.json: .* holds a phantom made with"):
        make_phantom(out, 12, 32, seed=2)
    with pytest.raises(ValueError, match="num_images"):
        make_phantom(tmp_path / "bad", 1, 32, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        make_phantom(tmp_path / "bad", 10, 16, seed=0)


def test_command_line_script(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, "scripts/make_phantom.py", "--out_dir", str(out), "--num_images", "6"]
    command += ["--image_size", "32", "--seed", "0"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(first.stdout)["num_images"] == 6
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    assert "already exists; nothing was written" in second.stdout
