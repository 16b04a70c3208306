"""Measure input-pipeline throughput: decoding the PNGs vs reading the resized .npy cache.

Usage::

    python scripts/benchmark_data.py [--image_dir tests/data/nih_sample/images] [--image_size 512]
        [--num_workers 2] [--batch_size 8] [--repeat 32] [--work_dir DIR]

Caches the PNGs of ``image_dir`` (as ``scripts/prepare_chestxray14.py`` does), then runs a DataLoader with
``num_workers`` worker processes over the images repeated ``repeat`` times, through the training-time load
chain ``LoadChestXrayd -> Resized(S, mode="area")``, once from the PNGs and once from the cache, and prints
images/s for each (the first batch, which includes starting the workers, is not timed) and their ratio.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for folder in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import fire  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.transforms import Compose, Resized  # noqa: E402
from prepare_chestxray14 import build_cache, cache_file_name  # noqa: E402

from custom.transforms import LoadChestXrayd, read_png_header  # noqa: E402


def images_per_second(items: list[dict], image_size: int, num_workers: int, batch_size: int) -> float:
    """Throughput (images/s) of load + resize over ``items`` with a DataLoader; the first batch is untimed."""
    transform = Compose([LoadChestXrayd("image"), Resized("image", (image_size, image_size), mode="area")])
    loader = DataLoader(
        Dataset(items, transform), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    batches = iter(loader)
    first = next(batches)
    start, count = time.perf_counter(), 0
    for batch in batches:
        count += batch["image"].shape[0]
    elapsed = time.perf_counter() - start
    if count == 0:
        raise ValueError(
            f"only one batch of {first['image'].shape[0]} images: raise --repeat to time anything"
        )
    return count / elapsed


def benchmark(
    image_dir: str = str(REPO_ROOT / "tests" / "data" / "nih_sample" / "images"),
    image_size: int = 512,
    num_workers: int = 2,
    batch_size: int = 8,
    repeat: int = 32,
    work_dir: str | None = None,
) -> dict:
    """Run the comparison; returns {'png_images_per_s', 'cache_images_per_s', 'speedup', 'images'}."""
    pngs = sorted(Path(image_dir).glob("*.png"))
    if not pngs:
        raise FileNotFoundError(f"{image_dir}: no .png files")
    with tempfile.TemporaryDirectory(dir=work_dir) as temp:
        cache_dir = Path(temp) / f"cache_{image_size}"
        failures, _ = build_cache(
            [p.name for p in pngs], Path(image_dir), cache_dir, image_size, num_workers, False
        )
        if failures:
            raise RuntimeError(f"could not cache: {failures}")
        sizes = {p.name: [read_png_header(p).height, read_png_header(p).width] for p in pngs}
        png_items = [{"image": str(p)} for p in pngs] * repeat
        cache_items = [
            {"image": str(cache_dir / cache_file_name(p.name)), "original_size": sizes[p.name]} for p in pngs
        ] * repeat
        png_rate = images_per_second(png_items, image_size, num_workers, batch_size)
        cache_rate = images_per_second(cache_items, image_size, num_workers, batch_size)
    result = {
        "images": len(png_items),
        "png_images_per_s": round(png_rate, 1),
        "cache_images_per_s": round(cache_rate, 1),
        "speedup": round(cache_rate / png_rate, 2),
    }
    print(
        f"{len(pngs)} PNGs x {repeat}, {num_workers} workers, batch {batch_size}, {image_size} px: "
        f"PNG {png_rate:.1f} img/s, cache {cache_rate:.1f} img/s, cache/PNG = {cache_rate / png_rate:.1f}x"
    )
    return result


if __name__ == "__main__":
    fire.Fire(benchmark)
