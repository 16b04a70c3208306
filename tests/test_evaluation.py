"""The evaluation: scoring against straightforward references, the report's tables under both protocols
with the prior rows, the thresholds file, and `python -m monai.bundle run evaluating` on the tiny model."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, run_bundle, subprocess_env
from custom.thresholds_file import load_thresholds, save_thresholds
from custom.evaluation.outputs import EvaluationOutputs
from custom.evaluation.plots import roc_points
from custom.evaluation.report import Table, write_report
from custom.evaluation.scoring import build_thresholds, evaluate_outputs, prior_ious
from custom.evaluation.settings import EvaluationSettings
from custom.labels import BOX_CLASS_INDICES, BOX_CLASS_NAMES, CLASS_NAMES
from custom.metrics import auc_per_class, patient_folds

REPORT_TABLES = ("table1_auc", "table2_localisation", "table3_t_iou", "table3_t_iou_curve")


def synthetic_outputs(folder: Path, seed: int = 0, num_images: int = 24, grid: int = 32) -> EvaluationOutputs:
    """Outputs of a model whose Mix map is the ground-truth box itself (plus faint noise) and whose Sal map is
    noise; images of two sizes (H != W for half of them), non-square boxes, two images per patient."""
    rng = np.random.default_rng(seed)
    sizes = np.array([[128.0, 128.0] if b % 2 else [96.0, 128.0] for b in range(num_images)])
    gt_image, gt_class, gt_boxes = [], [], []
    for b in range(num_images):
        height, width = sizes[b]
        for c in rng.choice(8, size=1 + b % 2, replace=False):
            x0, y0 = rng.uniform(0, 0.5) * width, rng.uniform(0, 0.5) * height
            w, h = rng.uniform(0.15, 0.45) * width, rng.uniform(0.1, 0.3) * height
            gt_image.append(b)
            gt_class.append(int(c))
            gt_boxes.append([x0, y0, x0 + w, y0 + h])
    gt_boxes = np.array(gt_boxes)
    noise = rng.random((num_images, 8, grid, grid)).astype(np.float32)
    mix = 0.05 * noise
    centres = (np.arange(grid) + 0.5) / grid
    for b, c, box in zip(gt_image, gt_class, gt_boxes):
        height, width = sizes[b]
        rows = (centres * height >= box[1]) & (centres * height < box[3])
        cols = (centres * width >= box[0]) & (centres * width < box[2])
        mix[b, c] += rows[:, None] & cols[None, :]
    paths = []
    for b in range(num_images):
        path = folder / f"box{b:02d}.png"
        Image.fromarray((rng.random(sizes[b].astype(int)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    labels = (rng.random((60, 14)) < 0.3).astype(np.float32)
    labels[:2] = [[0] * 14, [1] * 14]  # both label values in every class
    logits = (labels * 2 - 1 + rng.normal(0, 1.0, labels.shape)).astype(np.float32)
    return EvaluationOutputs(
        test_image_logits=logits,
        test_combined_logits=logits + 0.1,
        test_labels=labels,
        validation_image_logits=logits[:30],
        validation_combined_logits=logits[:30],
        validation_labels=labels[:30],
        box_class_names=BOX_CLASS_NAMES,
        box_class_indices=np.array(BOX_CLASS_INDICES),
        box_maps={"sal": noise, "det": noise[:, ::-1].copy(), "mix": mix},
        box_images=paths,
        box_test_index=np.arange(num_images),
        patient_ids=[f"p{b // 2}" for b in range(num_images)],
        original_sizes=sizes,
        gt_image=np.array(gt_image),
        gt_class=np.array(gt_class),
        gt_boxes=gt_boxes,
        input_size=4 * grid,
    )


def naive_prior(outputs: EvaluationOutputs, folds=None) -> np.ndarray:
    """One box at a time: the mean relative box of the other boxes of its class (or of the other fold)."""
    sizes = outputs.original_sizes[outputs.gt_image]
    relative = outputs.gt_boxes / np.stack([sizes[:, 1], sizes[:, 0]] * 2, axis=1)
    out = []
    for m in range(len(relative)):
        same = outputs.gt_class == outputs.gt_class[m]
        others = (
            same & (np.arange(len(relative)) != m)
            if folds is None
            else same & (folds[outputs.gt_image] != folds[outputs.gt_image[m]])
        )
        if not others.any():
            out.append(np.nan)
            continue
        mean = relative[others].mean(axis=0)
        a, g = relative[m], mean
        inter = max(0, min(a[2], g[2]) - max(a[0], g[0])) * max(0, min(a[3], g[3]) - max(a[1], g[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        out.append(inter / union)
    return np.array(out)


def test_prior_matches_a_per_box_loop(tmp_path):
    outputs = synthetic_outputs(tmp_path)
    np.testing.assert_allclose(prior_ious(outputs), naive_prior(outputs), equal_nan=True)
    folds = patient_folds(np.asarray(outputs.patient_ids), 0)
    np.testing.assert_allclose(prior_ious(outputs, folds), naive_prior(outputs, folds), equal_nan=True)


def test_roc_points_enclose_the_auc():
    rng = np.random.default_rng(1)
    labels = (rng.random(300) < 0.3).astype(float)
    scores = np.round(labels + rng.normal(0, 1, 300), 1)  # rounded: ties
    fpr, tpr = roc_points(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    area = np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(auc_per_class(scores, labels)[1], abs=1e-12)


def test_table_writes_markdown_csv_and_json(tmp_path):
    table = Table("t", "Title", ["a", "b"], [["x", 0.12345], ["y", float("nan")], ["z", None]], ["a note"])
    md, csv_path, json_path = table.write(tmp_path)
    assert (
        "| x | 0.123 |" in md.read_text() and "| y | - |" in md.read_text() and "- a note" in md.read_text()
    )
    assert list(csv.reader(csv_path.open())) == [["a", "b"], ["x", "0.12345"], ["y", ""], ["z", ""]]
    assert json.loads(json_path.read_text())["rows"][1] == {"a": "y", "b": None}


def test_perfect_maps_localise_and_the_report_has_both_protocols_and_the_prior(tmp_path):
    outputs = synthetic_outputs(tmp_path)
    saved = EvaluationOutputs.load(outputs.save(tmp_path / "outputs.pt"))
    assert saved.box_class_names == BOX_CLASS_NAMES and np.array_equal(
        saved.box_maps["mix"], outputs.box_maps["mix"]
    )
    # Absolute thresholds: one value (~0.5) cuts every box out of its map exactly, whatever its size.
    settings = EvaluationSettings(candidates=np.linspace(0.1, 0.9, 9), mode="absolute", component="largest")
    result = evaluate_outputs(saved, settings)
    for protocol in ("all_images", "two_fold"):
        mix = result.localisation(protocol, "mix")["iou"]
        # The Mix map IS the box: IoU near 1 on every class (a row/column swap would break the wide boxes;
        # what is left is the map's pixel grid: 32 x 32 over 96-128 px).
        assert min(mix[name] for name in BOX_CLASS_NAMES) > 0.85, (protocol, mix)
        assert mix["mean"] > result.localisation(protocol, "sal")["iou"]["mean"]
        assert mix["mean"] > result.localisation(protocol, "prior")["iou"]["mean"]
    assert result.localisation("all_images", "mix")["cdice"]["mean"] > 0.8

    paths = write_report(saved, result, tmp_path / "report", num_overlays=4)
    report = tmp_path / "report"
    for name in REPORT_TABLES:
        for ext in ("md", "csv", "json"):
            assert (report / f"{name}.{ext}").stat().st_size > 0
    for figure in ("roc_curves.png", "t_iou_curves.png", "fig3_overlays.png"):
        assert Image.open(report / figure).size[0] > 200
    assert len(list((report / "overlays").glob("*.png"))) == 4
    table2 = json.loads((report / "table2_localisation.json").read_text())["rows"]
    iou_rows = {(row["Protocol"], row["Method"]) for row in table2 if row["Metric"] == "IoU"}
    for protocol in ("paper (all box images)", "held-out (2-fold)"):
        for method in ("Sal", "Det", "Mix", "prior (leave-one-out mean box)"):
            assert (protocol, method) in iou_rows
    assert ("held-out (2-fold)", "prior (other fold's mean box)") in iou_rows
    assert ("paper (NIH)", "Mix") in iou_rows  # reference rows: the classes are NIH's 8
    mix_held_out = next(
        row for row in table2 if row["Protocol"] == "held-out (2-fold)" and row["Method"] == "Mix"
    )
    assert mix_held_out["Card"] == pytest.approx(
        result.localisation("two_fold", "mix")["iou"]["Cardiomegaly"]
    )
    table3 = json.loads((report / "table3_t_iou.json").read_text())["rows"]
    assert {row["T(IoU)"] for row in table3} == {"0.3", "0.5", "0.6"}
    curve = json.loads((report / "table3_t_iou_curve.json").read_text())["rows"]
    assert {row["T(IoU)"] for row in curve} == {f"{k / 10:g}" for k in range(1, 8)}
    table1 = json.loads((report / "table1_auc.json").read_text())["rows"]
    assert [row["Label"] for row in table1] == [*CLASS_NAMES, "Mean"]
    summary = json.loads(paths["summary"].read_text())
    assert all(v["mix_beats_prior"] for v in summary["held_out_mix_vs_prior"].values())
    text = paths["report"].read_text()
    assert "held-out (2-fold)" in text and "beats the no-image prior" in text and "8 of 8" in text

    thresholds = build_thresholds(saved, result, provenance={"checkpoint": "x"})
    loaded = load_thresholds(save_thresholds(thresholds, tmp_path / "thresholds.json"))
    per_map = loaded.details["box_thresholds"]["per_map"]["mix"]["two_fold"]["thresholds_by_fold"]
    for name in BOX_CLASS_NAMES:
        assert loaded.box_thresholds["mix"][name] == pytest.approx((per_map[0][name] + per_map[1][name]) / 2)
    assert loaded.box_threshold_sources("mix")[CLASS_NAMES.index("Mass")] == "two_fold"
    assert loaded.box_threshold_sources("mix")[CLASS_NAMES.index("Hernia")] == "default"
    assert set(loaded.decision_thresholds["image"]) == set(CLASS_NAMES)
    assert all(0 < t < 1 for t in loaded.decision_thresholds["image"].values())


def test_evaluate_yaml_ids():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "bundle/configs" / name) for name in ("train.yaml", "evaluate.yaml")])
    assert parser["run"] == "@evaluating"
    parser["ckpt_dir"] = "models"
    assert parser.get_parsed_content("thresholds_file") == "models/thresholds.json"
    assert parser["evaluate"]["inferer"]["_target_"] == "custom.inference.inferer.RpSalInferer"
    assert parser["evaluate"]["checkpoint"] == "$@ckpt_dir + '/model.pt'"


def test_bundle_evaluate_on_the_tiny_model(tiny_trained_model, tmp_path):
    overrides = tmp_path / "evaluate_overrides.yaml"
    overrides.write_text(
        yaml.safe_dump(
            {
                "report_dir": str(tmp_path / "report"),
                "thresholds_file": str(tmp_path / "thresholds.json"),
                "evaluate#num_overlays": 3,
            }
        )
    )
    configs = [*tiny_trained_model["configs"], "bundle/configs/evaluate.yaml", str(overrides)]
    result = run_bundle(configs, "evaluating")
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    assert "Held-out protocol: the Mix map's mean IoU" in log
    report = tmp_path / "report"
    for name in REPORT_TABLES:
        assert all((report / f"{name}.{ext}").is_file() for ext in ("md", "csv", "json")), name
    assert all(
        (report / f).is_file()
        for f in (
            "roc_curves.png",
            "t_iou_curves.png",
            "fig3_overlays.png",
            "report.md",
            "summary.json",
            "evaluation_outputs.pt",
        )
    )
    table2 = json.loads((report / "table2_localisation.json").read_text())["rows"]
    protocols = {row["Protocol"] for row in table2}
    assert {"paper (all box images)", "held-out (2-fold)", "threshold-free"} <= protocols
    priors = [row for row in table2 if row["Method"].startswith("prior")]
    assert len(priors) == 3 and all(0 <= row["Mean"] <= 1 for row in priors)
    for row in table2:
        if row["Metric"] in ("IoU", "cDice") and row["Protocol"] != "paper (NIH)":
            assert all(
                v is None or 0 <= v <= 1 for k, v in row.items() if k not in ("Metric", "Protocol", "Method")
            )

    thresholds = load_thresholds(tmp_path / "thresholds.json")
    assert thresholds.details["provenance"]["checkpoint"] == str(tiny_trained_model["model"])
    assert set(thresholds.box_thresholds) == {"sal", "det", "mix"}
    assert thresholds.details["box_thresholds"]["inference_protocol"] == "two_fold"

    # The saved maps reproduce the report (same scores without the network), through the command-line tool.
    rescored = tmp_path / "rescored"
    command = [
        sys.executable,
        "scripts/evaluate_report.py",
        str(report / "evaluation_outputs.pt"),
        f"--report_dir={rescored}",
        "--num_overlays=0",
    ]
    again = subprocess.run(
        command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "box images" in again.stdout and "scoring" in again.stdout
    assert json.loads((rescored / "table2_localisation.json").read_text())["rows"] == table2
