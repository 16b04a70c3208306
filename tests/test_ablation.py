"""scripts/ablation.py: every variant states the detection settings in full, and the table's bars and means."""

from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("ablation", REPO_ROOT / "scripts" / "ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(variant, seed, sal, det, mix, mix_t5, sal_t5=0.1, beats=7, auc=0.9):
    return {"variant": variant, "seed": seed, "sal_iou": sal, "det_iou": det, "mix_iou": mix, "prior_iou": 0.125,
            "sal_t_iou_0.5": sal_t5, "det_t_iou_0.5": 0.1, "mix_t_iou_0.5": mix_t5, "mix_beats_prior": beats,
            "mix_per_class": {"Cardiomegaly": 0.5}, "test_mean_auc": auc, "test_mean_auc_combined": auc,
            "train_seconds": 100.0}


def test_every_trained_variant_states_the_detection_settings(ablation):
    for name, variant in ablation.VARIANTS.items():
        if variant.get("configs") or name == "default":
            continue  # paper.yaml states its own; default is train.yaml as shipped
        assert set(ablation.PAPER_DETECTION) <= set(variant["overrides"]), name
    assert ablation.VARIANTS["paper_estimator"]["overrides"] == ablation.PAPER_DETECTION
    assert ablation.VARIANTS["mil"]["overrides"]["det_weighting"] == "softmax"


def test_bars_and_the_mean_rows(ablation, tmp_path, capsys):
    good = scores("x", 0, sal=0.20, det=0.21, mix=0.25, mix_t5=0.21, beats=8)
    assert all(ablation.bars(good).values())
    bad = scores("x", 1, sal=0.30, det=0.10, mix=0.09, mix_t5=0.05, beats=6, auc=0.87)
    assert not any(ablation.bars(bad).values())
    for result in (good, bad):
        folder = tmp_path / "x" / f"seed{result['seed']}"
        folder.mkdir(parents=True)
        (folder / "ablation.json").write_text(json.dumps(result))
    ablation.table(out_dir=str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[2].endswith("| 7/7 |") and lines[3].endswith("| 0/7 |")
    assert "| **x** | mean of 2 | 0.250 | 0.155 | 0.170 |" in lines[4] and "3.5/7 per seed" in lines[4]
    ablation.table(out_dir=str(tmp_path), seeds="1")
    assert len(capsys.readouterr().out.splitlines()) == 3
