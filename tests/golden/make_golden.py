"""Write the golden outputs the redesign of inference must keep (issue 15, step 0): run ONCE with the code
before the redesign, commit what it writes; ``tests/test_golden_outputs.py`` compares today's code to it.

What it does (about 3 minutes on 2 cores):
1. trains the tiny test network (conftest's TINY_NETWORK, 64 px, 1 epoch per stage) on a 240-image phantom
   (seed 3) through the bundle's training command; its crop classifier is zeroed (``zero_crop_classifier``)
   and the rest kept as ``model_without_crop_classifier.pt`` (tests rebuild the full checkpoint);
2. runs ``evaluate.yaml`` on it -> ``calibration.json`` (box and decision thresholds), the report's
   ``summary.json`` and CSV tables, and ``evaluation_outputs.pt`` (the logits and maps they were scored from);
3. runs ``inference.yaml`` with that thresholds file on five inputs (two phantom test PNGs, two real NIH PNGs
   of tests/data, pydicom-data's real chest CR) -> one findings JSON each;
4. copies the lot to ``tests/data/golden/`` (the phantom inputs included; the NIH PNGs are tests/data's and the
   CR is pydicom-data's: ``golden_inputs`` gathers all five).

Usage: PYTHONPATH=. python tests/golden/make_golden.py [--out tests/data/golden]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import TINY_NETWORK, TRAIN_CONFIGS, run_bundle, subprocess_env, write_overrides  # noqa: E402

PHANTOM_TEST_IMAGES = 2
CROP_PREFIX = "crop_classifier."


def zero_crop_classifier(state: dict) -> dict:
    """The state dict with every crop-classifier tensor zero (BatchNorm variances one): its logits z = 0."""
    return {k: (torch.ones_like(v) if k.endswith("running_var") else torch.zeros_like(v))
            if k.startswith(CROP_PREFIX) else v for k, v in state.items()}
NIH_PNGS = ("00001369_000.png", "00000147_001.png")


def golden_inputs(golden: Path, folder: Path) -> Path:
    """The five golden inputs in one folder: the committed phantom PNGs, two NIH PNGs, the CR."""
    from pydicom.data import get_testdata_file

    shutil.copytree(golden / "inputs", folder)
    for name in NIH_PNGS:
        shutil.copy(REPO_ROOT / "tests" / "data" / "nih_sample" / "images" / name, folder / name)
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), folder / "RG1_UNCR.dcm")
    return folder


def main(out: str) -> None:
    from custom.data.phantom import make_phantom

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temp_name:
        temp = Path(temp_name)
        phantom = temp / "phantom"
        make_phantom(out_dir=str(phantom), num_images=240, image_size=64, seed=3, num_workers=1)
        work = temp / "run"
        work.mkdir()
        overrides = write_overrides(work, phantom)
        configs = [*TRAIN_CONFIGS, str(overrides)]
        trained = run_bundle(configs)
        assert trained.returncode == 0, trained.stderr[-3000:]
        # The crop classifier (ResNet-10: 5 M of the 5.2 M weights) only adds z to the combined logits;
        # zeroed, it need not be committed: tests rebuild it (golden_checkpoint) and z is exactly 0.
        state = torch.load(work / "models" / "model.pt", weights_only=True)
        torch.save(zero_crop_classifier(state), work / "models" / "model.pt")
        torch.save({k: v for k, v in state.items() if not k.startswith(CROP_PREFIX)},
                   out_dir / "model_without_crop_classifier.pt")
        evaluate_overrides = work / "evaluate_overrides.yaml"
        evaluate_overrides.write_text(yaml.safe_dump({"evaluate#num_overlays": 0}))
        evaluated = run_bundle([*configs, "bundle/configs/evaluate.yaml", str(evaluate_overrides)], "evaluating")
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        report = work / "logs" / "report"
        shutil.copy(work / "models" / "calibration.json", out_dir / "calibration.json")
        (out_dir / "report").mkdir(exist_ok=True)
        for path in sorted(report.iterdir()):
            if path.suffix in (".json", ".csv") or path.name == "evaluation_outputs.pt":
                shutil.copy(path, out_dir / "report" / path.name)

        inputs = out_dir / "inputs"
        inputs.mkdir(exist_ok=True)
        test_names = (phantom / "test_list.txt").read_text().split()[:PHANTOM_TEST_IMAGES]
        for name in test_names:
            shutil.copy(phantom / "images" / name, inputs / f"phantom_{name}")
        run_inputs = temp / "inputs"
        golden_inputs(out_dir, run_inputs)
        findings = temp / "findings"
        command = [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", "bundle/configs/inference.yaml",
            "--input", str(run_inputs), "--output_dir", str(findings), "--ckpt_path", str(work / "models" / "model.pt"),
            "--calibration_file", str(out_dir / "calibration.json"), "--image_size", "64", "--num_workers", "0",
            "--postprocessing#overlays", "False",
        ]
        for key, value in TINY_NETWORK.items():
            command += [f"--network_def#{key}", str(value)]
        inferred = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True)
        assert inferred.returncode == 0, inferred.stderr[-3000:]
        (out_dir / "findings").mkdir(exist_ok=True)
        for path in sorted(findings.glob("*.json")):
            if path.name == "summary.json":
                continue
            content = json.loads(path.read_text())
            content["image"] = Path(content["image"]).name  # machine-independent
            content["model"]["checkpoint"] = "model.pt"
            content["model"]["calibration_file"] = "calibration.json"
            (out_dir / "findings" / path.name).write_text(json.dumps(content, indent=1) + "\n")
    print(f"golden outputs written to {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "tests" / "data" / "golden"))
    main(parser.parse_args().out)
