"""scripts/prepare_chestxray14.py on real NIH PNGs: datalists, the resized cache, bad images, resuming, the
CLI's exit status, and the cache's speed over decoding PNGs."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import Compose, Resized
from PIL import Image

from custom.transforms import LoadChestXrayd

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "nih_sample"
SCRIPT = REPO / "scripts" / "prepare_chestxray14.py"
SIZE = 64  # small cache images keep the test fast; the code path is the one used at 512


def load_script():
    """Import scripts/prepare_chestxray14.py as a module (registered, so worker processes can unpickle it)."""
    spec = importlib.util.spec_from_file_location("prepare_chestxray14", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


prepare_script = load_script()


@pytest.fixture
def dataset(tmp_path) -> Path:
    """The 4 real sample PNGs plus two bad files listed in the tables: a truncated copy of a real PNG and
    a 16-bit copy of one (which must be cached as uint16)."""
    root = tmp_path / "chestxray14"
    shutil.copytree(SAMPLE, root)
    png = (SAMPLE / "images" / "00004994_000.png").read_bytes()
    (root / "images" / "00009999_000.png").write_bytes(png[: len(png) // 2])
    grey = np.asarray(Image.open(SAMPLE / "images" / "00000147_001.png"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "images" / "00008888_000.png")
    with open(root / "Data_Entry_2017_v2020.csv", "a") as table:
        table.write("00009999_000.png,Mass,0,9999,40,M,PA,2500,2048,0.171,0.171\n")
        table.write("00008888_000.png,No Finding,0,8888,40,M,PA,2500,2048,0.171,0.171\n")
    (root / "train_val_list.txt").write_text(
        "00000147_001.png\n00004994_000.png\n00002578_000.png\n00009999_000.png\n00008888_000.png\n"
    )
    (root / "test_list.txt").write_text("00001369_000.png\n")
    return root


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the script as a user would (from another working directory)."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd="/", timeout=300
    )


def test_prepare_writes_both_datalists_cache_and_errors(dataset, tmp_path):
    out = tmp_path / "out"
    result = prepare_script.prepare(
        dataset, out, image_size=SIZE, num_workers=2, val_fraction=0.3, progress=False
    )
    assert result.exit_status == 1
    assert list(result.errors) == ["00009999_000.png"] and "truncated" in result.errors["00009999_000.png"]
    assert (out / "errors.txt").read_text().startswith("00009999_000.png\ttruncated or corrupt PNG")
    assert result.cache_counts == {"written": 5, "skipped": 0, "failed": 1}
    png_list = json.loads((out / "datalist_png.json").read_text())
    cache_list = json.loads((out / "datalist_cache.json").read_text())
    assert cache_list["cache_image_size"] == SIZE
    for key in ("training", "validation", "test"):
        png_items, cache_items = png_list[key], cache_list[key]
        assert [i["patient_id"] for i in png_items] == [i["patient_id"] for i in cache_items]
        assert all(i["original_size"] == [1024, 1024] for i in png_items + cache_items)  # the PNG's size
        assert not any("00009999" in i["image"] for i in png_items + cache_items)
    assert sum(len(png_list[k]) for k in ("training", "validation", "test")) == 5
    assert png_list["class_weights"] == cache_list["class_weights"]
    assert cache_list["test"][0]["boxes"] == png_list["test"][0]["boxes"]
    cache_files = sorted((out / f"cache_{SIZE}").glob("*.npy"))
    assert len(cache_files) == 5
    for path in cache_files:
        array = np.load(path)
        assert array.shape == (SIZE, SIZE)
        assert array.dtype == (np.uint16 if path.name == "00008888_000.npy" else np.uint8)

    # The cache path equals the PNG path (load + Resized(area)) up to the uint8 rounding.
    chain = Compose([LoadChestXrayd("image"), Resized("image", (SIZE, SIZE), mode="area")])
    png_items = load_decathlon_datalist(out / "datalist_png.json", False, "training", base_dir=out)
    cache_items = load_decathlon_datalist(out / "datalist_cache.json", False, "training", base_dir=out)
    for png_item, cache_item in zip(png_items, cache_items, strict=True):
        from_png, from_cache = chain(png_item), chain(cache_item)
        assert from_cache["original_size"] == [1024, 1024]
        tolerance = 0.5 / (65535 if "00008888" in cache_item["image"] else 255) + 1e-6
        assert float((from_png["image"] - from_cache["image"]).abs().max()) <= tolerance


def test_prepare_resumes_and_redoes_bad_cache_entries(dataset, tmp_path):
    out = tmp_path / "out"
    prepare_script.prepare(dataset, out, image_size=SIZE, num_workers=0, progress=False)
    cache = out / f"cache_{SIZE}"
    untouched = cache / "00001369_000.npy"
    stamp = untouched.stat().st_mtime_ns
    (cache / "00000147_001.npy").unlink()  # interrupted before this one
    corrupt = cache / "00002578_000.npy"
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # half-written by something other than this script
    np.save(cache / "00004994_000.npy", np.zeros((SIZE + 1, SIZE), np.uint8))  # wrong shape
    np.save(cache / "00008888_000.npy", np.zeros((SIZE, SIZE), np.uint8))  # wrong dtype for a 16-bit PNG
    (cache / ".00000147_001.npy.12345.tmp").write_bytes(b"partial")  # a killed run's temp file
    result = prepare_script.prepare(dataset, out, image_size=SIZE, num_workers=0, progress=False)
    assert result.cache_counts == {"written": 4, "skipped": 1, "failed": 1}
    assert untouched.stat().st_mtime_ns == stamp
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(".*"))
    for name, dtype in (("00000147_001", np.uint8), ("00002578_000", np.uint8), ("00008888_000", np.uint16)):
        array = np.load(cache / f"{name}.npy")
        assert array.shape == (SIZE, SIZE) and array.dtype == dtype
    assert np.load(cache / "00004994_000.npy").shape == (SIZE, SIZE)


def test_cli_exit_status_missing_images_and_no_cache(dataset, tmp_path, capsys):
    (dataset / "images" / "00002578_000.png").unlink()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        prepare_script.main(str(dataset), str(out), image_size=SIZE, progress="false")
    assert exited.value.code == 2
    assert "1 listed image(s) missing: 00002578_000.png" in capsys.readouterr().err
    assert not (out / "datalist_png.json").exists()
    partial = run_cli(
        "--dataset_dir", str(dataset), "--out_dir", str(out), "--image_size", str(SIZE),
        "--cache", "false", "--allow_missing", "true", "--num_workers", "1", "--progress", "false",
    )  # fmt: skip
    assert partial.returncode == 1, partial.stderr
    assert "wrote" in partial.stdout and not (out / "datalist_cache.json").exists()
    assert not (out / f"cache_{SIZE}").exists()
    assert "00002578_000.png\tmissing from images/" in (out / "errors.txt").read_text()
    items = json.loads((out / "datalist_png.json").read_text())
    names = [Path(i["image"]).name for k in ("training", "validation", "test") for i in items[k]]
    assert "00002578_000.png" not in names and "00004994_000.png" in names
    assert all((out / i["image"]).is_file() for k in ("training", "validation", "test") for i in items[k])


def test_cache_reads_at_least_4x_faster_than_png(tmp_path):
    """Per image, in this process: LoadChestXrayd + Resized(512) from the 1024-px PNGs vs the 512-px cache.
    (scripts/benchmark_data.py measures the same with a 2-worker DataLoader.)"""
    names = sorted(p.name for p in (SAMPLE / "images").glob("*.png"))
    failures, _ = prepare_script.build_cache(names, SAMPLE / "images", tmp_path, 512, 0, progress=False)
    assert not failures
    chain = Compose([LoadChestXrayd("image"), Resized("image", (512, 512), mode="area")])
    png_items = [{"image": str(SAMPLE / "images" / n)} for n in names]
    cache_items = [{"image": str(tmp_path / prepare_script.cache_file_name(n)), "original_size": [1024, 1024]}
                   for n in names]  # fmt: skip

    def seconds(items) -> float:
        best = float("inf")
        for _ in range(3):  # best of 3 passes: robust to other work on a shared machine
            start = time.perf_counter()
            for item in items:
                chain(item)
            best = min(best, time.perf_counter() - start)
        return best

    png_time, cache_time = seconds(png_items), seconds(cache_items)
    assert png_time >= 4 * cache_time, f"PNG {png_time:.3f} s, cache {cache_time:.3f} s"
    assert os.path.getsize(tmp_path / prepare_script.cache_file_name(names[0])) == 512 * 512 + 128


def test_prepare_reads_the_synthetic_phantom(tmp_path):
    """custom.data.phantom writes NIH's layout; the same reader and cache builder take it unchanged."""
    from custom.data.phantom import make_phantom

    make_phantom(tmp_path / "phantom", num_images=12, image_size=64, seed=0)
    result = prepare_script.prepare(
        tmp_path / "phantom", tmp_path / "out", image_size=32, num_workers=0, progress=False
    )
    assert result.exit_status == 0 and result.cache_counts["written"] == 12
    datalist = json.loads((tmp_path / "out" / "datalist_cache.json").read_text())
    assert sum(len(datalist[k]) for k in ("training", "validation", "test")) == 12
    assert any("boxes" in item for item in datalist["test"])
    assert all(item["original_size"] == [64, 64] for item in datalist["training"])
