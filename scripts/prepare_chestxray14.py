"""Prepare ChestX-ray14 for training: datalists, and a resized cache decoded once from the PNGs.

Usage::

    python scripts/prepare_chestxray14.py --dataset_dir D --out_dir O [--image_size 512] [--num_workers 2]
        [--val_fraction 0.1] [--seed 34] [--cache true] [--allow_missing false]

Writes, in ``O``:
- ``datalist_png.json``: items point at ``D/images/*.png`` (paths relative to ``O``).
- ``datalist_cache.json`` (with ``--cache true``): the same items pointing at ``cache_<S>/<name>.npy``, one
  (S, S) uint8 array per image (uint16 when the PNG is 16-bit grey), the image resized over its full extent by
  area averaging, the same operation as MONAI ``Resized(mode="area")`` on the PNG. ``original_size`` stays the
  PNG's [H, W], so boxes keep mapping to original pixels.
- ``errors.txt``: one line per image left out, ``<image name>\\t<reason>`` (empty when none).

Images are NIH's PNGs; a DICOM radiograph listed in the tables (single-frame CR/DX/Secondary Capture) is read
as the bundle's loader reads it. Each image's size comes from its header first (a file that is not an image, a
CT/SR/multi-frame DICOM or one under 32 px a side is left out there, without decoding), then the cache decodes
it (a truncated or transparent one is left out there); either way with the loader's reason.

Both datalists have the same items, split and class weights; ``LoadChestXrayd`` reads either.
Cache files are written atomically (temp file + os.replace); a rerun skips files already complete and
verified (shape, dtype) and redoes the rest, so an interrupted run resumes. Every file written is verified.
One bad image never stops the run: it is reported (stderr and errors.txt) and left out of both datalists.

Exit status: 0 all done; 1 some images left out (datalists written without them); 2 nothing written (bad
tables, or listed images missing from images/ without ``--allow_missing true``).
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Make `import custom` work when run as `python scripts/prepare_chestxray14.py` from anywhere.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import fire  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from custom.atomic_file import atomic_output, leftover_temporaries  # noqa: E402
from custom.data.chestxray14 import (  # noqa: E402
    IMAGE_DIR,
    ChestXray14FormatError,
    check_image_sizes,
    make_datalist,
    read_dataset_tables,
    read_image_sizes,
    relative_path,
    split_by_patient,
    split_description,
    write_datalist,
)
from custom.transforms.grey_image import ImageLoadError, read_grey_image, read_png_header  # noqa: E402

PNG_DATALIST = "datalist_png.json"
CACHE_DATALIST = "datalist_cache.json"
ERRORS_FILE = "errors.txt"


def cache_dir_name(image_size: int) -> str:
    """The cache folder inside out_dir for one image size, e.g. 'cache_512'."""
    return f"cache_{int(image_size)}"


def resize_area(image: np.ndarray, image_size: int) -> np.ndarray:
    """Resize a float32 (H, W) image to (S, S) by area averaging over its full extent.

    Exactly ``torch.nn.functional.interpolate(mode="area")``, which MONAI ``Resized(mode="area")`` calls, so
    the cache equals the PNG path up to the uint8/uint16 rounding.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=(image_size, image_size), mode="area")[0, 0].numpy()


def quantise(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """float32 [0, 1] -> uint8 (bit_depth 8) or uint16 (16), rounding to nearest: error <= half a step."""
    top, dtype = (255, np.uint8) if bit_depth <= 8 else (65535, np.uint16)
    return np.clip(np.rint(image * np.float32(top)), 0, top).astype(dtype)


def expected_cache_dtype(source: Path) -> np.dtype | None:
    """The dtype the cache of ``source`` must have: uint16 for a 16-bit grey PNG, uint8 for other PNGs, None
    (either) for non-PNG sources, whose precision is only known after decoding."""
    try:
        header = read_png_header(source)
    except ImageLoadError:
        return None
    return np.dtype(np.uint16) if header.decodes_to_16bit else np.dtype(np.uint8)


def verify_cache_file(path: Path, image_size: int, dtype: np.dtype | None) -> str | None:
    """None when ``path`` is a complete (S, S) uint8/uint16 .npy (of ``dtype`` if given), else the reason."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        return f"unreadable ({error})"
    if array.shape != (image_size, image_size):
        return f"shape {array.shape}, expected {(image_size, image_size)}"
    if array.dtype not in (np.uint8, np.uint16) or (dtype is not None and array.dtype != dtype):
        return f"dtype {array.dtype}, expected {dtype or 'uint8/uint16'}"
    return None


def write_npy_atomically(array: np.ndarray, path: Path) -> None:
    """np.save to a temp file beside ``path``, then os.replace: readers never see a half-written file."""
    with atomic_output(path) as temp, open(temp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def cache_image(source: Path, target: Path, image_size: int) -> str:
    """Decode ``source`` once, resize to (S, S), write ``target`` .npy; 'skipped' when already valid.

    Returns 'skipped' or 'written'. Raises ImageLoadError (bad source) or RuntimeError (written file fails
    verification) or OSError (cannot write).
    """
    dtype = expected_cache_dtype(source)
    if target.exists() and verify_cache_file(target, image_size, dtype) is None:
        return "skipped"
    grey = read_grey_image(source)
    array = quantise(resize_area(grey.array, image_size), grey.bit_depth)
    write_npy_atomically(array, target)
    problem = verify_cache_file(target, image_size, array.dtype)
    if problem is not None:
        raise RuntimeError(f"cache file {target} failed verification after writing: {problem}")
    return "written"


def _cache_task(task: tuple[str, str, str, int]) -> tuple[str, str, str | None]:
    """Worker entry: (name, source, target, size) -> (name, 'skipped' | 'written' | 'failed', reason)."""
    name, source, target, image_size = task
    try:
        return name, cache_image(Path(source), Path(target), image_size), None
    except (ImageLoadError, RuntimeError, OSError, ValueError) as error:
        return name, "failed", str(error.reason if isinstance(error, ImageLoadError) else error)


def _init_worker() -> None:
    """One torch thread per worker process: the processes are the parallelism."""
    torch.set_num_threads(1)


@dataclass
class PrepareResult:
    """What :func:`prepare` did: files written, cache counts, and images left out (name -> reason)."""

    datalists: dict[str, Path] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    cache_counts: dict[str, int] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        """0 when nothing was left out, 1 otherwise."""
        return 1 if self.errors else 0


def build_cache(
    names: Iterable[str],
    image_dir: Path,
    cache_dir: Path,
    image_size: int,
    num_workers: int,
    progress: bool = True,
) -> tuple[dict[str, str], dict[str, int]]:
    """Cache every image of ``names``; returns (failures: name -> reason, counts per status)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale, _ in leftover_temporaries(cache_dir, "*.npy"):  # left by a killed run; never a complete file
        stale.unlink()
    tasks = [(n, str(image_dir / n), str(cache_dir / cache_file_name(n)), image_size) for n in names]
    failures, counts = {}, {"written": 0, "skipped": 0, "failed": 0}
    bar = tqdm(total=len(tasks), desc=f"caching {image_size}px", unit="img", disable=not progress)
    if num_workers > 1:
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker) as pool:
            results = pool.map(_cache_task, tasks, chunksize=max(1, min(64, len(tasks) // (8 * num_workers))))
            failures = _collect(results, counts, bar)
    else:
        failures = _collect(map(_cache_task, tasks), counts, bar)
    bar.close()
    return failures, counts


def _collect(results, counts: dict[str, int], bar) -> dict[str, str]:
    """Tally worker results, reporting each failure on stderr as it comes."""
    failures = {}
    for name, status, reason in results:
        counts[status] += 1
        bar.update()
        if status == "failed":
            failures[name] = reason
            tqdm.write(f"prepare_chestxray14: {name}: {reason}", file=sys.stderr)
    return failures


def cache_file_name(image_name: str) -> str:
    """The cache file of an image: its name with the extension replaced by .npy."""
    return f"{Path(image_name).stem}.npy"


def prepare(
    dataset_dir: str,
    out_dir: str,
    image_size: int = 512,
    num_workers: int = 2,
    val_fraction: float = 0.1,
    seed: int = 34,
    cache: bool = True,
    allow_missing: bool = False,
    progress: bool = True,
) -> PrepareResult:
    """Write the datalists (and the cache) for ``dataset_dir`` into ``out_dir``; see the module docstring.

    Raises ChestXray14FormatError for bad tables, and for listed images missing from images/ unless
    ``allow_missing`` (then they are left out like bad images). Bad images never raise.
    """
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    if int(image_size) < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    tables = read_dataset_tables(dataset_dir)
    image_dir = dataset_dir / IMAGE_DIR
    if not image_dir.is_dir():
        raise ChestXray14FormatError(f"{image_dir}: image folder not found")
    names = tables.train_val + tables.test
    stems = {}
    for name in names:
        stem = Path(name).stem
        if stem in stems:
            raise ChestXray14FormatError(
                f"{tables.files['labels']}: {name} and {stems[stem]} share a cache name"
            )
        stems[stem] = name
    sizes, missing, unreadable = read_image_sizes(image_dir, names, max(1, num_workers) * 4)
    if missing and not allow_missing:
        check_image_sizes(image_dir, missing, {})
    errors = {name: "missing from images/" for name in missing} | dict(unreadable)
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        print(
            f"prepare_chestxray14: {len(missing)} image(s) missing from {image_dir}, left out: {shown}",
            file=sys.stderr,
        )
    for name in sorted(unreadable):
        print(f"prepare_chestxray14: {name}: {unreadable[name]}", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = PrepareResult()
    if cache:
        cache_dir = out_dir / cache_dir_name(image_size)
        readable = [name for name in names if name in sizes]
        failures, result.cache_counts = build_cache(
            readable, image_dir, cache_dir, int(image_size), num_workers, progress
        )
        errors |= failures
    result.errors = errors
    training, validation = split_by_patient(
        tables.train_val, lambda name: tables.labels[name].patient_id, val_fraction, seed
    )
    splits = {
        key: [name for name in split if name not in errors]
        for key, split in (("training", training), ("validation", validation), ("test", tables.test))
    }
    extra = {"split": split_description(val_fraction, seed)}
    png_list = make_datalist(tables, splits, lambda n: relative_path(image_dir / n, out_dir), sizes, extra)
    result.datalists["png"] = write_datalist(png_list, out_dir / PNG_DATALIST)
    if cache:
        cache_extra = extra | {"cache_image_size": int(image_size)}
        cache_path = lambda n: f"{cache_dir_name(image_size)}/{cache_file_name(n)}"  # noqa: E731
        cache_list = make_datalist(tables, splits, cache_path, sizes, cache_extra)
        result.datalists["cache"] = write_datalist(cache_list, out_dir / CACHE_DATALIST)
    _write_errors(out_dir / ERRORS_FILE, errors)
    return result


def _write_errors(path: Path, errors: dict[str, str]) -> None:
    """errors.txt: one '<image name>\\t<reason>' line per image left out (an empty file when none)."""
    text = "".join(f"{name}\t{' '.join(reason.split())}\n" for name, reason in sorted(errors.items()))
    with atomic_output(path) as temp:
        temp.write_text(text, encoding="utf-8")


def _as_bool(value, name: str) -> bool:
    """Fire passes '--cache true' as the string 'true'; accept the usual spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise ValueError(f"--{name} must be true or false, got {value!r}")


def main(
    dataset_dir: str,
    out_dir: str,
    image_size: int = 512,
    num_workers: int = 2,
    val_fraction: float = 0.1,
    seed: int = 34,
    cache="true",
    allow_missing="false",
    progress="true",
) -> None:
    """CLI entry (python-fire): runs :func:`prepare`, prints a summary, exits 0 / 1 / 2 (module docstring)."""
    try:
        result = prepare(
            dataset_dir,
            out_dir,
            int(image_size),
            int(num_workers),
            float(val_fraction),
            int(seed),
            _as_bool(cache, "cache"),
            _as_bool(allow_missing, "allow_missing"),
            _as_bool(progress, "progress"),
        )
    except (ChestXray14FormatError, ValueError) as error:
        print(f"prepare_chestxray14: error: {error}", file=sys.stderr)
        sys.exit(2)
    for kind, path in result.datalists.items():
        print(f"wrote {path} ({kind})")
    if result.cache_counts:
        print("cache: " + ", ".join(f"{count} {status}" for status, count in result.cache_counts.items()))
    if result.errors:
        print(
            f"prepare_chestxray14: {len(result.errors)} image(s) left out, "
            f"listed in {Path(out_dir) / ERRORS_FILE}",
            file=sys.stderr,
        )
    sys.exit(result.exit_status)


if __name__ == "__main__":
    fire.Fire(main)
