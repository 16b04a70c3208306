"""Reliability (issue 8): every kind of bad image in ONE folder through bundle inference and through data
preparation; a 12000x12000 film through both under a peak-memory bound; checkpoint writes that stay atomic
when the write fails or the process is killed mid-write; checkpoint files that load with
``weights_only=True`` and pickled objects that are refused; an interrupted preparation that resumes; bad
tables that stop the training command before it trains; an infinite loss. docs/reliability.md maps each fault
of the issue to its test."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import REPO_ROOT, TINY_NETWORK, TRAIN_CONFIGS, bundle_command, subprocess_env, write_overrides
from PIL import Image
from pydicom.data import get_testdata_file
from test_inference import inference_command

from custom.thresholds_file import Thresholds, save_thresholds
from custom.labels import CLASS_NAMES

NIH_IMAGES = REPO_ROOT / "tests" / "data" / "nih_sample" / "images"
PREPARE = REPO_ROOT / "scripts" / "prepare_chestxray14.py"
LABEL_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n"
)
BOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
GiB = 2**30

# Every kind of input of the list, by file name: None for a readable image (processed), else a piece
# of the reason the loader gives (the whole reason is in errors.txt and on stderr).
BAD_IMAGE_KINDS = {
    "zero_bytes.png": "file is empty (0 bytes)",
    "truncated.png": "truncated or corrupt PNG",
    "text_named.png": "not a PNG, DICOM or .npy image (content is text",
    "rgba_opaque.png": None,  # NIH ships RGBA PNGs: opaque ones are grey images
    "rgba_transparent.png": "RGBA image has transparent pixels",
    "grey_16bit.png": None,
    "one_pixel.png": "image is 1x1 pixels (HxW), smaller than the minimum of 32 px per side",
    "no_pixel_data.dcm": "DICOM has no pixel data",
    "ct.dcm": "DICOM SOP class CT Image Storage",
    "multi_frame_cr.dcm": "DICOM has 2 frames; a single-frame radiograph is expected",
    "multi_frame_enhanced_mr.dcm": "DICOM SOP class Enhanced MR Image Storage",
    "monochrome1_cr.dcm": None,
    "structured_report.dcm": "DICOM SOP class Comprehensive SR Storage",
}
READABLE = sorted(name for name, reason in BAD_IMAGE_KINDS.items() if reason is None)
UNREADABLE = sorted(name for name, reason in BAD_IMAGE_KINDS.items() if reason is not None)
SIDE = 96  # side of the readable test images: small and fast, above the 32-px minimum


def write_image_kinds(folder: Path) -> None:
    """Write one file of each kind of BAD_IMAGE_KINDS into ``folder``, made from a real NIH PNG and a real
    chest CR (pydicom-data's RG1_UNCR.dcm) or copied from pydicom's test files."""
    folder.mkdir(parents=True, exist_ok=True)
    grey = np.ascontiguousarray(np.asarray(Image.open(NIH_IMAGES / "00000147_001.png"))[464:560, 464:560])
    Image.fromarray(grey).save(folder / "template.png")
    png = (folder / "template.png").read_bytes()
    (folder / "template.png").unlink()
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "text_named.png").write_text("<html><body>502 Bad Gateway</body></html>\n")
    opaque = np.full_like(grey, 255)
    Image.fromarray(np.stack([grey] * 3 + [opaque], -1), "RGBA").save(folder / "rgba_opaque.png")
    Image.fromarray(np.stack([grey] * 3 + [opaque // 2], -1), "RGBA").save(folder / "rgba_transparent.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey_16bit.png")
    assert Image.open(folder / "grey_16bit.png").mode == "I;16"
    Image.fromarray(grey[:1, :1]).save(folder / "one_pixel.png")

    cr = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # PA chest CR, 15-bit MONOCHROME1
    assert cr.PhotometricInterpretation == "MONOCHROME1"
    crop = copy.deepcopy(cr)
    crop.PixelData = np.ascontiguousarray(cr.pixel_array[930 : 930 + SIDE, 880 : 880 + SIDE]).tobytes()
    crop.Rows = crop.Columns = SIDE
    crop.save_as(folder / "monochrome1_cr.dcm")
    no_pixels = copy.deepcopy(crop)
    del no_pixels.PixelData
    no_pixels.save_as(folder / "no_pixel_data.dcm")
    frames = copy.deepcopy(crop)
    frames.NumberOfFrames = 2
    frames.PixelData = crop.PixelData * 2
    frames.save_as(folder / "multi_frame_cr.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(get_testdata_file("emri_small.dcm"), folder / "multi_frame_enhanced_mr.dcm")
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "structured_report.dcm")
    assert sorted(p.name for p in folder.iterdir()) == sorted(BAD_IMAGE_KINDS)


def stderr_lines_naming(stderr: str, name: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.search(rf"(^|[/\s]){re.escape(name)}\b", line)]


# ---- 1. bad images: bundle inference and data preparation --------------------------------------------------


def test_every_bad_image_kind_in_one_folder_through_bundle_inference(tiny_trained_model, tmp_path):
    folder = tmp_path / "in"
    write_image_kinds(folder)
    calibration = save_thresholds(  # every class positive: each readable image gets its boxes checked
        Thresholds(decision_thresholds={"image": dict.fromkeys(CLASS_NAMES, 0.0)}), tmp_path / "cal.json"
    )
    out = tmp_path / "out"
    result = subprocess.run(
        inference_command(folder, out, tiny_trained_model["model"], calibration), check=False, cwd=REPO_ROOT,
        env=subprocess_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout[-3000:] + result.stderr[-5000:]
    assert result.returncode == 1, log  # the run finished, and says that something failed
    assert f"{len(UNREADABLE)} of {len(BAD_IMAGE_KINDS)} input(s) could not be processed" in result.stderr, (
        log
    )

    lines = (out / "errors.txt").read_text().splitlines()
    errors = dict(line.split("\t") for line in lines)
    assert len(lines) == len(errors) == len(UNREADABLE)  # one line per unreadable file, no more
    assert sorted(Path(path).name for path in errors) == UNREADABLE
    for name in UNREADABLE:
        reason = errors[str(folder / name)]
        assert BAD_IMAGE_KINDS[name] in reason, (name, reason)
        naming = stderr_lines_naming(result.stderr, name)
        assert naming == [f"inference: skipped {folder / name}: {reason}"], (name, naming)

    for name in READABLE:
        content = json.loads((out / f"{Path(name).stem}.json").read_text())
        assert content["original_size"] == [SIDE, SIDE] and content["positive"] == list(CLASS_NAMES)
        for finding in content["findings"]:
            x0, y0, x1, y1 = finding["box"]
            assert 0 <= x0 < x1 <= SIDE and 0 <= y0 < y1 <= SIDE
        assert (out / content["files"]["overlay"]).is_file()
        assert not stderr_lines_naming(result.stderr, name)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["written"], summary["failed"]) == (
        len(BAD_IMAGE_KINDS), len(READABLE), len(UNREADABLE))  # fmt: skip


def write_dataset(root: Path, train_val: list[str], test: list[str]) -> None:
    """NIH's four tables for the images already in ``root/images``: one patient per image, no boxes."""
    rows = "".join(
        f"{name},No Finding,0,{patient},50,F,PA,{SIDE},{SIDE},0.1,0.1\n"
        for patient, name in enumerate(train_val + test, start=1)
    )
    (root / "Data_Entry_2017_v2020.csv").write_text(LABEL_HEADER + rows)
    (root / "BBox_List_2017.csv").write_text(BOX_HEADER)
    (root / "train_val_list.txt").write_text("".join(f"{name}\n" for name in train_val))
    (root / "test_list.txt").write_text("".join(f"{name}\n" for name in test))


def prepare_command(dataset: Path, out: Path) -> list[str]:
    """scripts/prepare_chestxray14.py as a user runs it: 32-px cache, one process, no validation split."""
    options = {"image_size": 32, "num_workers": 1, "val_fraction": 0, "progress": "false"}
    flags = [text for key, value in options.items() for text in (f"--{key}", str(value))]
    return [sys.executable, str(PREPARE), "--dataset_dir", str(dataset), "--out_dir", str(out), *flags]


def run_prepare(dataset: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        prepare_command(dataset, out), check=False, capture_output=True, text=True, cwd="/", timeout=300
    )


def test_every_bad_image_kind_in_one_folder_through_data_preparation(tmp_path):
    dataset = tmp_path / "chestxray14"
    write_image_kinds(dataset / "images")
    names = sorted(BAD_IMAGE_KINDS)
    test = ["grey_16bit.png", "ct.dcm", "truncated.png"]  # good and bad ones in both lists
    write_dataset(dataset, [n for n in names if n not in test], test)
    out = tmp_path / "out"
    result = run_prepare(dataset, out)
    assert result.returncode == 1, result.stdout + result.stderr  # finished; some images left out

    lines = (out / "errors.txt").read_text().splitlines()
    errors = dict(line.split("\t") for line in lines)
    assert len(lines) == len(UNREADABLE) and sorted(errors) == UNREADABLE
    for name in UNREADABLE:
        assert BAD_IMAGE_KINDS[name] in errors[name], (name, errors[name])
        naming = stderr_lines_naming(result.stderr, name)
        assert naming == [f"prepare_chestxray14: {name}: {errors[name]}"], (name, naming)
    assert f"{len(UNREADABLE)} image(s) left out" in result.stderr

    datalist = json.loads((out / "datalist_cache.json").read_text())
    listed = {Path(item["image"]).stem: item for key in ("training", "test") for item in datalist[key]}
    assert sorted(listed) == sorted(Path(name).stem for name in READABLE) and datalist["validation"] == []
    cache = out / "cache_32"
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{Path(n).stem}.npy" for n in READABLE)
    for name in READABLE:
        assert listed[Path(name).stem]["original_size"] == [SIDE, SIDE]
        array = np.load(cache / f"{Path(name).stem}.npy")
        # 16-bit PNG and the 15-bit DICOM keep 16-bit precision; the RGBA PNG is 8-bit.
        assert array.shape == (32, 32) and array.dtype == (
            np.uint8 if name == "rgba_opaque.png" else np.uint16
        )
    # The MONOCHROME1 CR is inverted to bone bright like the PNGs: the cache equals the loader's reading.
    from custom.transforms import read_grey_image

    expected = torch.nn.functional.interpolate(
        torch.from_numpy(read_grey_image(dataset / "images" / "monochrome1_cr.dcm").array)[None, None],
        size=(32, 32), mode="area",
    )[0, 0].numpy()  # fmt: skip
    np.testing.assert_allclose(np.load(cache / "monochrome1_cr.npy") / 65535, expected, atol=1e-4)


def peak_memory_of(command: list[str], log: Path, **popen) -> tuple[int, int]:
    """Run ``command``; returns (exit status, peak resident memory in bytes of that child: ru_maxrss from
    wait4, which counts this process alone, not the test's earlier subprocesses)."""
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=handle, **popen)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss * 1024  # Linux: KiB


def test_12000px_film_through_inference_and_preparation_with_peak_memory_under_4_gib(
    tiny_trained_model, tmp_path
):
    """A 12000x12000 PNG: bundle inference (load + resize + model + maps + boxes + overlay) and the
    preparation's cache (load + area resize + write) each run in a subprocess whose peak RSS stays < 4 GiB."""
    side = 12000
    dataset = tmp_path / "chestxray14"
    (dataset / "images").mkdir(parents=True)
    row = ((np.arange(side) // 7) % 251).astype(np.uint8)
    film = dataset / "images" / "film.png"
    Image.fromarray(np.broadcast_to(row, (side, side)).copy()).save(film, compress_level=1)
    calibration = save_thresholds(
        Thresholds(decision_thresholds={"image": dict.fromkeys(CLASS_NAMES, 0.0)}), tmp_path / "cal.json"
    )
    out = tmp_path / "out"
    command = inference_command(dataset / "images", out, tiny_trained_model["model"], calibration)
    status, peak = peak_memory_of(command, tmp_path / "inference.log", cwd=REPO_ROOT, env=subprocess_env())
    print(f"12000x12000 bundle inference: peak RSS {peak / GiB:.2f} GiB")
    assert status == 0, (tmp_path / "inference.log").read_text()[-4000:]
    assert peak < 4 * GiB, f"inference: peak resident memory {peak / GiB:.2f} GiB"
    content = json.loads((out / "film.json").read_text())
    assert content["original_size"] == [side, side] and len(content["findings"]) >= 1
    for finding in content["findings"]:
        x0, y0, x1, y1 = finding["box"]
        assert 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side
    assert (out / "errors.txt").read_text() == ""

    write_dataset(dataset, ["film.png"], [])
    command = prepare_command(dataset, tmp_path / "prep")
    status, peak = peak_memory_of(command, tmp_path / "prepare.log", cwd="/")
    print(f"12000x12000 preparation: peak RSS {peak / GiB:.2f} GiB")
    assert status == 0, (tmp_path / "prepare.log").read_text()[-4000:]
    assert peak < 4 * GiB, f"preparation: peak resident memory {peak / GiB:.2f} GiB"
    datalist = json.loads((tmp_path / "prep" / "datalist_cache.json").read_text())
    assert datalist["training"][0]["original_size"] == [side, side]
    assert np.load(tmp_path / "prep" / "cache_32" / "film.npy").shape == (32, 32)


# ---- 2. bad tables stop the training command before it trains ----------------------------------------------


@pytest.mark.parametrize("fault", ["unknown label", "image listed but absent"])
def test_bad_table_stops_the_training_command_before_any_training(tmp_path, tiny_phantom, fault):
    dataset = tmp_path / "dataset"
    shutil.copytree(tiny_phantom, dataset, ignore=shutil.ignore_patterns("images"))
    (dataset / "images").mkdir()
    images = sorted((tiny_phantom / "images").iterdir())
    for image in images:
        (dataset / "images" / image.name).symlink_to(image)
    table = dataset / "Data_Entry_2017_v2020.csv"
    lines = table.read_text().splitlines(keepends=True)
    victim = lines[5].split(",")[0]
    if fault == "unknown label":
        lines[5] = lines[5].replace(lines[5].split(",")[1], "Pneumonitis", 1)
        table.write_text("".join(lines))
        expected = f"{table}, line 6: image {victim}: unknown label 'Pneumonitis'"
    else:
        (dataset / "images" / victim).unlink()
        expected = f"1 listed image(s) missing: {victim}"
    folder = tmp_path / "run"
    folder.mkdir()
    overrides = write_overrides(folder, dataset)
    result = subprocess.run(
        bundle_command([*TRAIN_CONFIGS, str(overrides)]), cwd=REPO_ROOT, env=subprocess_env(),
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    assert "ChestXray14FormatError" in output and expected in output, output[-3000:]
    assert not (folder / "models").exists() or not list((folder / "models").iterdir())  # nothing trained
    assert not (folder / "logs" / "metrics.jsonl").exists()


# ---- 3. interrupted runs: atomic checkpoints, interrupted preparation --------------------------------------


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from custom.handlers.checkpoint import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"epoch": torch.tensor(1), "weights": torch.ones(1000)}, str(path))
    before = path.read_bytes()

    def half_written(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip archive")  # what a full disk or a crash leaves
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"epoch": torch.tensor(2)}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

    def replace_fails(source, target):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(PermissionError):
        atomic_save({"epoch": torch.tensor(3)}, str(path))
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert int(torch.load(path, weights_only=True)["epoch"]) == 1


def test_atomic_output_keeps_the_previous_file_when_a_write_fails(tmp_path):
    """The one mechanism behind the JSON, datalist, calibration, NIfTI, overlay, evaluation-output and cache
    writes: the final name holds the old complete file or the new one, and a failed write leaves no temp."""
    from custom.atomic_file import atomic_output
    from custom.atomic_file import write_json

    path = tmp_path / "nested" / "calibration.json"
    write_json(path, {"version": 1})
    before = path.read_bytes()
    with pytest.raises(OSError, match="No space left"):
        with atomic_output(path) as temp:
            temp.write_text('{"version": 2, "trunc')
            raise OSError(28, "No space left on device")
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["calibration.json"]
    with atomic_output(path, suffix=".json") as temp:
        assert temp.parent == path.parent and temp.name.endswith(".tmp.json") and temp.name.startswith(".")
        temp.write_text('{"version": 3}\n')
    assert path.read_text() == '{"version": 3}\n' and sorted(p.name for p in path.parent.iterdir()) == [path.name]


KILLED_MID_WRITE = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
from custom.handlers.checkpoint import atomic_save

def killed(obj, handle, *args, **kwargs):
    handle.write(b"PK\\x03\\x04 the first bytes of the new checkpoint")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # the process dies in the middle of writing

torch.save = killed
atomic_save({{"epoch": torch.tensor(2)}}, {path!r})
"""


def test_process_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    from custom.handlers.checkpoint import atomic_save

    path = tmp_path / "last.pt"
    atomic_save({"epoch": torch.tensor(1)}, str(path))
    before = path.read_bytes()
    code = KILLED_MID_WRITE.format(repo=str(REPO_ROOT), path=str(path))
    result = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), check=False, capture_output=True, timeout=120
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert path.read_bytes() == before  # the final name still holds the whole previous checkpoint
    assert int(torch.load(path, weights_only=True)["epoch"]) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert len(leftovers) == 1 and re.fullmatch(r"\.last\.pt\.\d+\.tmp", leftovers[0])  # partial, never .pt
    # the next run's checkpoint handler removes what the killed process left, and nothing else
    from custom.handlers.checkpoint import remove_stale_temporary_files

    assert remove_stale_temporary_files(str(tmp_path)) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_stale_checkpoint_temporaries_go_only_when_their_writer_is_dead(tmp_path):
    from custom.handlers.checkpoint import remove_stale_temporary_files

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)  # a process that has exited
    live = os.getppid()  # the shell or pytest's parent: alive while the test runs
    names = {
        f".last.pt.{dead}.tmp": False,  # killed mid-write: removed
        f"best_stage2.pt.tmp-{dead}": False,  # the name older versions used: removed
        f".model.pt.{live}.tmp": True,  # a writer still running: kept
        f".model.pt.{os.getpid()}.tmp": True,  # this process's own write: kept
        f".report.json.{dead}.tmp": True,  # not a checkpoint: not ours to remove
        "last.pt": True,
        "notes.tmp": True,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporary_files(str(tmp_path))
    assert sorted(removed) == sorted(name for name, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, kept in names.items() if kept)


def test_prepare_killed_midway_resumes_and_the_cache_is_valid(tmp_path):
    dataset = tmp_path / "chestxray14"
    (dataset / "images").mkdir(parents=True)
    sources = sorted(NIH_IMAGES.glob("*.png"))
    names = [f"{index:08d}_000.png" for index in range(1, 33)]
    for index, name in enumerate(names):  # 32 real 1024-px films: decoding them takes a few seconds
        shutil.copy(sources[index % len(sources)], dataset / "images" / name)
    write_dataset(dataset, names[:28], names[28:])
    out = tmp_path / "out"
    cache = out / "cache_32"
    command = prepare_command(dataset, out)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    deadline = time.time() + 120
    while process.poll() is None and time.time() < deadline:
        if cache.is_dir() and len(list(cache.glob("*.npy"))) >= 3:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "preparation finished before it could be interrupted"
    done = sorted(cache.glob("*.npy"))
    assert 3 <= len(done) < len(names)
    assert not (out / "datalist_cache.json").exists()  # datalists are written last, only when complete

    result = run_prepare(dataset, out)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every file the killed run completed is kept as it is (atomic writes: none is partial); the rest is done.
    assert f"cache: {len(names) - len(done)} written, {len(done)} skipped, 0 failed" in result.stdout
    assert not [p.name for p in cache.iterdir() if not p.name.endswith(".npy")]  # no temporary file left
    datalist = json.loads((out / "datalist_cache.json").read_text())
    assert len(datalist["training"]) + len(datalist["test"]) == len(names)

    fresh = run_prepare(dataset, tmp_path / "fresh")  # the same, uninterrupted
    assert fresh.returncode == 0, fresh.stderr
    assert all(
        (out / item["image"]).parent == cache for key in ("training", "test") for item in datalist[key]
    )
    for name in names:
        stem = Path(name).stem
        resumed, clean = (
            np.load(cache / f"{stem}.npy"),
            np.load(tmp_path / "fresh" / "cache_32" / f"{stem}.npy"),
        )
        assert resumed.dtype == clean.dtype == np.uint8 and np.array_equal(resumed, clean), name


# ---- 4. numerical faults -----------------------------------------------------------------------------------


def test_infinite_loss_stops_training_naming_stage_epoch_and_iteration():
    from ignite.engine import Engine, Events

    from custom.handlers.training_log import NonFiniteLossError, NonFiniteLossGuard

    losses = iter([1.0, 0.9, 0.8, 0.7, 0.6, float("inf"), 0.5, 0.4])
    saved = []
    engine = Engine(lambda engine, batch: {"loss": torch.tensor(next(losses))})
    guard = NonFiniteLossGuard(check_every=1)
    guard.attach(engine)
    engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, "stage", 2))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: (guard.check(e), saved.append(e.state.epoch)))
    with pytest.raises(NonFiniteLossError, match=r"stage 2, epoch 2, at or before iteration 6"):
        engine.run(range(4), max_epochs=2)
    assert saved == [1]  # the epoch with the infinite loss is never saved


# ---- 5. untrusted files: checkpoints load with weights_only; pickled objects are refused -------------------


def test_every_checkpoint_training_writes_loads_with_weights_only(tiny_trained_model):
    from custom.weights_file import load_checkpoint
    from custom.networks.rpsal import RpSalNet

    files = sorted(p.name for p in tiny_trained_model["ckpt_dir"].glob("*.pt"))
    assert files == ["best_stage1.pt", "best_stage2.pt", "best_stage3.pt", "last.pt", "model.pt"], files
    assert not [
        p.name for p in tiny_trained_model["ckpt_dir"].iterdir() if "tmp" in p.name
    ]  # none half-written
    for name in files:
        path = tiny_trained_model["ckpt_dir"] / name
        content = torch.load(path, map_location="cpu", weights_only=True)  # raises on any non-tensor object
        if name == "last.pt":  # everything needed to continue, as tensors
            assert set(content) >= {"network", "optimizer", "trainer", "rng", "extra"}
            RpSalNet(**TINY_NETWORK).load_state_dict(content["network"])
        else:  # weights only, through the loader inference uses
            load_checkpoint(RpSalNet(**TINY_NETWORK), path)


class CreatesAFile:
    """Unpickling this calls ``open(marker, "w")``: code from the file would run if it were loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_holding_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    from custom.handlers.checkpoint import TrainingCheckpoint
    from custom.evaluation.outputs import EvaluationOutputs
    from custom.weights_file import load_checkpoint
    from custom.networks.backbones import PretrainedWeightsError, read_state_dict
    from custom.networks.rpsal import RpSalNet
    from custom.weights_file import CheckpointFileError

    marker = tmp_path / "code_ran"
    network = RpSalNet(**TINY_NETWORK)
    evil = {**network.state_dict(), "extra": CreatesAFile(marker)}
    (tmp_path / "models").mkdir()
    for name in ("model.pt", "models/last.pt", "outputs.pt", "densenet.pth"):
        torch.save(evil, tmp_path / name)
    refused = "refused: the file holds objects other than tensors and plain containers"

    with pytest.raises(CheckpointFileError, match=refused) as caught:
        load_checkpoint(network, tmp_path / "model.pt")
    message = str(caught.value)
    assert str(tmp_path / "model.pt") in message and "open" in message and "weights_only=False" not in message
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    with pytest.raises(CheckpointFileError, match=f"{refused}.*--resume False"):
        TrainingCheckpoint(str(tmp_path / "models"), network, optimizer).load(None)
    with pytest.raises(CheckpointFileError, match=refused):
        EvaluationOutputs.load(tmp_path / "outputs.pt")
    weights_refused = f"densenet.pth: not a readable PyTorch weight file \\({refused}"
    with pytest.raises(PretrainedWeightsError, match=weights_refused) as caught_weights:
        read_state_dict(tmp_path / "densenet.pth")
    assert "weights_only=False" not in str(caught_weights.value)
    assert not marker.exists()  # nothing of the file was run
    (tmp_path / "model.pt").write_bytes((tmp_path / "models" / "last.pt").read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointFileError, match="model.pt: cannot be read as a PyTorch file"):
        load_checkpoint(network, tmp_path / "model.pt")


def test_dicom_outputs_stay_in_the_folder_whatever_the_file_name_and_tags(tiny_trained_model, tmp_path):
    """Output names come from the input's file name made safe, never from tag values: a radiograph whose name
    and tags hold paths writes its SR, overlay and JSON inside the output folder and nowhere else."""
    from monai.bundle import ConfigWorkflow

    inputs = tmp_path / "in"
    write_image_kinds(inputs)
    hostile = pydicom.dcmread(inputs / "monochrome1_cr.dcm")
    for keyword in ("PatientID", "PatientName", "StudyDescription", "SeriesDescription", "AccessionNumber"):
        setattr(hostile, keyword, "../../../../tmp/escaped")
    hostile.StudyID = "/etc/passwd"
    source = inputs / "..a b;(0008,0018) ..dcm"
    hostile.save_as(source)
    out = tmp_path / "out"
    overrides = {
        "bundle_root": str(REPO_ROOT / "bundle"),
        "ckpt_path": str(tiny_trained_model["model"]),
        "image_size": 64,
        "num_workers": 0,
        "input": str(source),
        "output_dir": str(out),
        **{f"network_sizes#{key}": value for key, value in TINY_NETWORK.items()},
    }
    configs = [str(REPO_ROOT / "bundle/configs" / name) for name in ("inference.yaml", "inference_dicom.yaml")]
    workflow = ConfigWorkflow(config_file=configs, workflow_type="infer", **overrides)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert {p.parent for p in written} == {out}
    assert sorted(p.name for p in written) == sorted(
        ["a_b_0008_0018__findings.json", "a_b_0008_0018__gsps.dcm", "a_b_0008_0018__sr.dcm", "errors.txt",
         "summary.json"]
    ), sorted(p.name for p in written)
    assert pydicom.dcmread(out / "a_b_0008_0018__sr.dcm").PatientID == "../../../../tmp/escaped"  # kept as data, not as a path


def test_readme_and_model_card_say_that_configs_run_code():
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    security = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    assert "run arbitrary Python" in security and "sources you trust" in security
    assert "weights_only=True" in security and "docs/reliability.md" in security
    card = (REPO_ROOT / "bundle" / "docs" / "README.md").read_text(encoding="utf-8")  # ships in the bundle
    security = card.split("## Security", 1)[1].split("\n## ", 1)[0]
    assert "they run code" in security and "sources you trust" in security and "weights_only=True" in security
    assert (REPO_ROOT / "docs" / "reliability.md").is_file()
