"""Golden outputs (issue 15, step 0): today's inference and evaluation must give what the code before the
inference redesign gave, on a committed tiny checkpoint and committed inputs (``tests/golden/make_golden.py``
wrote ``tests/data/golden/``; the files there say how).

Compared: per input, the 14 probabilities, the positive classes, each finding's class and box, and the
positive classes without a box (probabilities and boxes within 1e-6 of the JSON's rounded values); and every
number of the evaluation report's summary and tables, rescored from the committed network outputs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO_ROOT, TINY_NETWORK, subprocess_env

sys.path.insert(0, str(REPO_ROOT / "tests" / "golden"))
from make_golden import CROP_PREFIX, golden_inputs, zero_crop_classifier  # noqa: E402

GOLDEN = REPO_ROOT / "tests" / "data" / "golden"
TOLERANCE = 1e-6
REPORT_FILES = ("summary.json", "table1_auc.json", "table2_localisation.json", "table3_t_iou.json",
                "table3_t_iou_curve.json")


def golden_checkpoint(path: Path) -> Path:
    """The golden model as a complete checkpoint: the committed weights plus the zeroed crop classifier."""
    from custom.networks.rpsal import RpSalProbabilities

    network = RpSalProbabilities(num_classes=14, **TINY_NETWORK)
    state = torch.load(GOLDEN / "model_without_crop_classifier.pt", weights_only=True)
    full = network.state_dict()
    missing = set(full) - set(state)
    assert missing and all(k.startswith(CROP_PREFIX) for k in missing), sorted(missing)[:5]
    state.update({k: v for k, v in zero_crop_classifier(full).items() if k in missing})
    torch.save(state, path)
    return path


def assert_close(actual, expected, where: str) -> None:
    """Same structure; numbers within TOLERANCE (None/NaN alike); strings equal."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), (where, sorted(actual), sorted(expected))
        for key in expected:
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{index}]")
    elif isinstance(expected, bool) or expected is None or isinstance(expected, str):
        assert actual == expected, (where, actual, expected)
    elif isinstance(expected, (int, float)):
        if math.isnan(expected):
            assert actual is None or math.isnan(actual), (where, actual)
        else:
            assert isinstance(actual, (int, float)) and abs(actual - expected) <= TOLERANCE, (where, actual, expected)
    else:
        raise AssertionError(f"{where}: unexpected {type(expected).__name__}")


def findings_core(result: dict) -> dict:
    """What the golden findings fix: probabilities, positives, boxes (by class), classes without a box."""
    return {
        "probabilities": result["probabilities"],
        "positive": result["positive"],
        "boxes": {f["class"]: f["box"] for f in result["findings"]},
        "scores": {f["class"]: f["score"] for f in result["findings"]},
        "positive_without_box": result["positive_without_box"],
    }


def test_inference_reproduces_the_golden_findings(tmp_path):
    inputs = golden_inputs(GOLDEN, tmp_path / "inputs")
    model = golden_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.yaml",
        "--input", str(inputs), "--output_dir", str(out), "--ckpt_path", str(model),
        "--thresholds_file", str(GOLDEN / "calibration.json"), "--image_size", "64", "--num_workers", "0",
        "--overlays", "False",
    ]
    for key, value in TINY_NETWORK.items():
        command += [f"--network_def#{key}", str(value)]
    run = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    golden_files = sorted((GOLDEN / "findings").glob("*.json"))
    assert len(golden_files) == 5
    for golden_file in golden_files:
        expected = json.loads(golden_file.read_text())
        actual = json.loads((out / golden_file.name).read_text())
        assert_close(findings_core(actual), findings_core(expected), golden_file.stem)


def test_evaluation_reproduces_the_golden_report(tmp_path):
    report = tmp_path / "report"
    run = subprocess.run(
        [sys.executable, "scripts/evaluate_report.py", str(GOLDEN / "report" / "evaluation_outputs.pt"),
         f"--report_dir={report}", "--num_overlays=0"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for name in REPORT_FILES:
        assert_close(json.loads((report / name).read_text()), json.loads((GOLDEN / "report" / name).read_text()),
                     name)
