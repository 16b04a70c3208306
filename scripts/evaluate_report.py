"""Rescore saved evaluation outputs and rewrite the report, without the network.

``bundle/configs/evaluate.yaml`` saves the network's logits and maps to
``<report_dir>/evaluation_outputs.pt``; this reruns the scoring (AUC, both box-threshold protocols, cDice,
the prior, Youden thresholds) and writes a report folder, e.g. to try another component rule or threshold
grid, and times it.

Usage: python scripts/evaluate_report.py OUTPUTS.pt --report_dir=DIR [--thresholds_file=PATH]
       [--mode=percentile] [--start=0.6] [--stop=1.0] [--steps=41] [--component=largest] [--connectivity=8]
       [--seed=0] [--num_overlays=8] [--overlay_map=mix] [--workers=None]
``--thresholds_file`` is written only when given (the model's thresholds.json stays as evaluate.yaml left
it). The Det painting settings are those the outputs were saved with.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custom.evaluation.outputs import EvaluationOutputs  # noqa: E402
from custom.evaluation.settings import EvaluationSettings  # noqa: E402
from custom.evaluation.workflow import evaluate_and_report  # noqa: E402
from custom.metrics import percentile_grid  # noqa: E402


def main(
    outputs: str,
    report_dir: str,
    thresholds_file: str | None = None,
    mode: str = "percentile",
    start: float = 0.6,
    stop: float = 1.0,
    steps: int = 41,
    component: str = "largest",
    connectivity: int = 8,
    seed: int = 0,
    num_overlays: int = 8,
    overlay_map: str = "mix",
    workers: int | None = None,
) -> None:
    """Load OUTPUTS, score, write the report (and the thresholds file if given); print the timings.

    With ``mode="absolute"`` the candidates are ``steps`` values evenly spaced in [start, stop] of the map
    values; with "percentile" they are quantiles (the authors' grid by default).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    begin = time.perf_counter()
    loaded = EvaluationOutputs.load(outputs)
    read = time.perf_counter() - begin
    candidates = (
        percentile_grid(start, stop, steps) if mode == "percentile" else np.linspace(start, stop, steps)
    )
    settings = EvaluationSettings(
        weighting=loaded.weighting, normalize=loaded.normalize, sharpness=loaded.sharpness,
        candidates=candidates, mode=mode, component=component, connectivity=connectivity, seed=seed,
        num_overlays=num_overlays, overlay_map=overlay_map, workers=workers,
    )
    done = evaluate_and_report(loaded, report_dir, thresholds_file, settings, provenance={"outputs": str(outputs)})
    maps = loaded.box_maps["mix"]
    print(
        f"{maps.shape[0]} box images x {maps.shape[1]} classes ({len(loaded.gt_boxes)} boxes, maps "
        f"{maps.shape[2]}x{maps.shape[3]}), {len(loaded.test_labels)} test images: read {read:.2f} s, "
        f"scoring {done['seconds']['scoring']:.2f} s, report {done['seconds']['report']:.2f} s"
    )


if __name__ == "__main__":
    fire.Fire(main)
