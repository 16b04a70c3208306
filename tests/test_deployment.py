"""Deployment without the bundle (issue 17): ``models/model.pt2`` (torch.export) and ``models/model.onnx``
(onnxruntime) equal the eager network on the probabilities and the Sal / Det / Mix maps with any batch size,
the numpy/PIL preprocessing equals the bundle's, and a fresh interpreter that imports neither MONAI nor the
rest of ``custom`` gets the bundle's findings from a PNG file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from test_export import TINY_OVERRIDES, _load_export_module

SAMPLE_PNG = REPO_ROOT / "tests" / "data" / "nih_sample" / "images" / "00001369_000.png"
BUNDLE = "chestxray14_rpsal_detection"
# Every class positive only where its probability reaches 0.5: real decisions to compare.
OVERRIDES = {k: v for k, v in TINY_OVERRIDES.items() if not k.startswith("threshold_defaults")}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_trained_model) -> Path:
    """The tiny model exported with model.pt2 and model.onnx."""
    export_bundle = _load_export_module()
    out = tmp_path_factory.mktemp("deploy")
    folder = export_bundle.export_bundle(str(out), model=str(tiny_trained_model["model"]), overrides=OVERRIDES,
                                         pt2=True, onnx=True, make_zip=False)
    return Path(folder)


def _eager(folder: Path):
    from custom.deployment.exported_model import RpSalMapsModel, load_network

    network, thresholds, size = load_network(str(folder / "configs" / "inference.yaml"),
                                             folder / "models" / "model.pt", {"bundle_root": str(folder)})
    return RpSalMapsModel(network, size, thresholds.weighting, thresholds.normalize, thresholds.sharpness)


@pytest.mark.parametrize("batch", [1, 3])
def test_pt2_and_onnx_equal_the_eager_network_for_any_batch_size(deployed, batch):
    import onnxruntime

    eager = _eager(deployed)
    images = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = [value.numpy() for value in eager(images)]
    program = torch.export.load(str(deployed / "models" / "model.pt2"))
    with torch.no_grad():
        from_pt2 = [value.numpy() for value in program.module()(images)]
    session = onnxruntime.InferenceSession(str(deployed / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {"images": images.numpy()})
    for name, want, pt2, onnx in zip(("probabilities", "sal", "det", "mix"), expected, from_pt2, from_onnx):
        assert want.shape == pt2.shape == onnx.shape, name
        assert np.abs(pt2 - want).max() <= 1e-4, name
        assert np.abs(onnx - want).max() <= 1e-4, name
    assert expected[0].shape == (batch, 14) and expected[3].shape == (batch, 14, 16, 16)


def test_the_exports_carry_the_metadata_and_the_inference_config(deployed):
    import onnx

    extra = {"metadata.json": "", "inference.json": ""}
    torch.export.load(str(deployed / "models" / "model.pt2"), extra_files=extra)
    version = json.loads((deployed / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["metadata.json"])["version"] == version
    assert json.loads(extra["inference.json"])["image_size"] == 64
    props = {p.key: p.value for p in onnx.load(str(deployed / "models" / "model.onnx")).metadata_props}
    assert json.loads(props["metadata.json"])["version"] == version and "inference.json" in props


def test_png_preprocessing_equals_the_bundles(deployed):
    from monai.bundle import ConfigParser

    from custom.deployment.png import network_input

    parser = ConfigParser()
    parser.read_config(str(deployed / "configs" / "inference.yaml"))
    for path in sorted((REPO_ROOT / "tests" / "data" / "nih_sample" / "images").glob("*.png")):
        expected = parser.get_parsed_content("preprocessing")({"image": str(path)})
        image, size = network_input(path, 64)
        assert list(size) == expected["original_size"]
        # float32 rounding of the area average (torch sums in float32, numpy here in float64): 1.1e-5 seen
        assert np.abs(image[0] - np.asarray(expected["image"])).max() <= 3e-5, path.name


def test_a_fresh_interpreter_gets_the_bundles_findings_from_the_exports(deployed, tmp_path):
    from custom.inference.service import FindingsService

    bundle = FindingsService.from_config(str(deployed / "configs" / "inference.yaml"),
                                         {"bundle_root": str(deployed)})(str(SAMPLE_PNG))
    map_pixel = 1024 / bundle["map_grid"][0]
    for model in ("model.pt2", "model.onnx"):
        script = (
            "import json, sys\n"
            f"sys.path.insert(0, {str(deployed)!r})\n"
            "from custom.deployment.runtime import ExportedRpSal\n"
            f"runner = ExportedRpSal({str(deployed / 'models' / model)!r})\n"
            f"result = runner({str(SAMPLE_PNG)!r})\n"
            "result['modules'] = sorted(m for m in sys.modules if m.split('.')[0] in ('custom', 'monai'))\n"
            "print(json.dumps(result))\n"
        )
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        run = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        result = json.loads(run.stdout.strip().splitlines()[-1])
        allowed = {"custom", "custom.labels", "custom.deployment", "custom.deployment.runtime",
                   "custom.deployment.png"}
        assert all(m in allowed or m.startswith("custom.localisation") for m in result["modules"]), result["modules"]
        assert result["positive"] == bundle["positive"], model
        boxes = {f["class"]: f["box"] for f in result["findings"]}
        assert sorted(boxes) == sorted(f["class"] for f in bundle["findings"]), model
        for finding in bundle["findings"]:
            assert np.abs(np.array(boxes[finding["class"]]) - finding["box"]).max() <= map_pixel, (model, finding)
        for name, p in bundle["probabilities"].items():
            assert abs(result["probabilities"][name] - p) <= 1e-4, (model, name)
