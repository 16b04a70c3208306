"""Write the synthetic ChestX-ray14 phantom (NIH's layout, known lesion boxes) to a folder.

Usage, from the repository root:
    python scripts/make_phantom.py --out_dir data/phantom --num_images 2000 --image_size 256 --seed 0 \
        [--num_workers 2] [--preview docs/phantom.png]

Idempotent: a complete phantom with the same settings in ``out_dir`` is reported and left alone; an
interrupted one is finished. ``--preview`` draws a few of the written TEST images with their boxes (read back
from the files, as a loader sees them). See ``custom/data/phantom.py`` and ``docs/phantom.md``.
"""

import csv
import json
import logging
import sys
from pathlib import Path

# Run as a file, Python puts scripts/ on sys.path, not the repository root that holds `custom`.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire

from custom.data.phantom import make_phantom
from custom.labels import LABEL_ALIASES, NO_FINDING


def main(
    out_dir: str,
    num_images: int = 2000,
    image_size: int = 256,
    seed: int = 0,
    num_workers: int = 1,
    preview: str | None = None,
) -> None:
    """Generate the phantom and print its summary (counts per class, test boxes per class, seconds) as JSON.

    Args:
        out_dir: output folder.
        num_images: number of images (>= 2).
        image_size: PNG side in pixels (>= 32).
        seed: random seed; the same settings give byte-identical files.
        num_workers: rendering processes; the output does not depend on it.
        preview: if given, a PNG path for a picture of 6 test images with their boxes and labels.
    """
    summary = make_phantom(out_dir, num_images, image_size, seed, num_workers=num_workers)
    if summary["skipped"]:
        print(f"{out_dir}: a complete phantom with these settings already exists; nothing was written.")
    print(json.dumps(summary, indent=1))
    if preview:
        draw_preview(Path(out_dir), Path(preview))


def draw_preview(out_dir: Path, path: Path, count: int = 6) -> None:
    """Draw ``count`` test images of the phantom in ``out_dir`` with their boxes, to the PNG ``path``.

    One healthy image, then images chosen greedily to show as many box classes as possible. Everything is
    read back from the written files (Data_Entry, test_list, BBox_List with x, y = top-left corner).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches
    from PIL import Image

    with open(out_dir / "Data_Entry_2017_v2020.csv", newline="", encoding="utf-8") as handle:
        labels = {row[0]: row[1] for row in list(csv.reader(handle))[1:]}
    test = (out_dir / "test_list.txt").read_text(encoding="utf-8").split()
    boxes: dict[str, list[tuple[str, list[float]]]] = {}
    with open(out_dir / "BBox_List_2017.csv", newline="", encoding="utf-8") as handle:
        for row in list(csv.reader(handle))[1:]:
            boxes.setdefault(row[0], []).append(
                (LABEL_ALIASES.get(row[1], row[1]), [float(v) for v in row[2:6]])
            )

    chosen = [next(name for name in test if labels[name] == NO_FINDING)]
    shown: set[str] = set()
    candidates = [name for name in test if name in boxes]
    while len(chosen) < count and candidates:
        best = max(candidates, key=lambda name: (len({c for c, _ in boxes[name]} - shown), -len(boxes[name])))
        chosen.append(best)
        shown |= {c for c, _ in boxes[best]}
        candidates.remove(best)

    columns = 3
    rows = -(-len(chosen) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 4.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    for axis, name in zip(axes.flat, chosen):
        with Image.open(out_dir / "images" / name) as image:
            axis.imshow(image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(f"{name}\n{labels[name].replace('|', ', ')}", fontsize=8)
        for finding, (x, y, w, h) in boxes.get(name, []):
            # imshow puts pixel centres on integers, so a pixel-edge coordinate x is drawn at x - 0.5.
            axis.add_patch(
                patches.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor="yellow", lw=1.2)
            )
            axis.text(x - 0.5, y - 2, finding, color="yellow", fontsize=7, va="bottom")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    print(f"Preview of {len(chosen)} test images written to {path}.")


if __name__ == "__main__":
    # The guard matters: rendering workers are spawned processes that re-import this file.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fire.Fire(main)
