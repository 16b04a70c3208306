"""The exported bundle: self-contained zip, inference from an empty folder, TorchScript parity.

Uses the session's tiny trained model (64 px, demo-sized network); the export carries the overrides that make
``configs/inference.yaml`` match it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import REPO_ROOT, TINY_NETWORK

from custom.inference.findings import validate_findings

SAMPLE_PNG = REPO_ROOT / "tests" / "data" / "nih_sample" / "images" / "00001369_000.png"
SCHEMA = REPO_ROOT / "tests" / "data" / "schema" / "meta_schema_20240725.json"
BUNDLE = "chestxray14_rpsal_detection"
# The tiny network of the session model, at 64 px, every class called positive (decision threshold 0) so
# that every class gets a box to check.
TINY_OVERRIDES = {
    "image_size": 64,
    "num_workers": 0,
    **{f"network_sizes#{key}": value for key, value in TINY_NETWORK.items()},
    "threshold_defaults#default_decision_threshold": 0.0,
}


def _load_export_module():
    spec = importlib.util.spec_from_file_location("export_bundle", REPO_ROOT / "scripts" / "export_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_bundle = _load_export_module()


def _bare_env() -> dict:
    """An environment in which this repository is NOT importable (no PYTHONPATH), 2 threads."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_trained_model) -> dict:
    """The tiny model exported with TorchScript; returns {"folder", "zip"}."""
    out = tmp_path_factory.mktemp("dist")
    folder = export_bundle.export_bundle(str(out), model=str(tiny_trained_model["model"]),
                                         overrides=TINY_OVERRIDES, torchscript=True)
    return {"folder": Path(folder), "zip": out / f"{BUNDLE}.zip"}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory, exported) -> Path:
    """The zip unpacked into an empty folder outside the repository."""
    target = tmp_path_factory.mktemp("unpacked")
    assert not list(target.iterdir())
    with zipfile.ZipFile(exported["zip"]) as archive:
        archive.extractall(target)
    return target / BUNDLE


def test_zip_holds_a_self_contained_bundle(exported):
    with zipfile.ZipFile(exported["zip"]) as archive:
        names = archive.namelist()
    assert all(name.startswith(f"{BUNDLE}/") for name in names)
    for required in ("configs/inference.yaml", "configs/train.yaml", "configs/metadata.json", "LICENSE",
                     "docs/README.md", "docs/data_license.txt", "custom/__init__.py",
                     "custom/networks/rpsal.py", "custom/inference/postprocessing.py", "custom/dicom/sr.py",
                     "custom/localisation/box_rule.py", "docs/findings_schema.json",
                     "models/model.pt", "models/model.ts"):
        assert f"{BUNDLE}/{required}" in names, required
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    # The zoo's limit for committed files (weights go through large_files.yml): 1 MB.
    folder = exported["folder"]
    for path in folder.rglob("*"):
        if path.is_file() and path.parent.name != "models":
            assert path.stat().st_size < 1_000_000, path


def test_exported_configs_run_from_the_bundle_folder_and_match_the_weights(exported):
    folder = exported["folder"]
    from monai.bundle import ConfigParser

    inference = ConfigParser.load_config_file(folder / "configs" / "inference.yaml")
    train = ConfigParser.load_config_file(folder / "configs" / "train.yaml")
    assert inference["bundle_root"] == "." and train["bundle_root"] == "."
    assert inference["image_size"] == 64 and inference["network_sizes"]["backbone"] == "densenet_small"
    assert train["network_sizes"]["backbone"] == "densenet121"  # overrides go to the inference config only
    assert (folder / "configs" / "inference.yaml").read_text().startswith("# inference.yaml of the")
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == [64, 64]
    assert metadata["network_data_format"]["post_processed_outputs"]["maps"]["spatial_shape"] == [16, 16]


def test_export_refuses_to_overwrite_and_block_overrides(exported, tmp_path):
    with pytest.raises(export_bundle.ExportError, match="already exists"):
        export_bundle.export_bundle(str(exported["folder"].parent), make_zip=False)
    with pytest.raises(export_bundle.ExportError, match="network_def#<entry>"):
        export_bundle.export_bundle(str(tmp_path), overrides={"network_def": {}}, make_zip=False)
    assert not (tmp_path / BUNDLE).exists()  # no half-written bundle
    with pytest.raises(export_bundle.ExportError, match="model checkpoint not found"):
        export_bundle.export_bundle(str(tmp_path), model=str(tmp_path / "missing.pt"), make_zip=False)


def test_unzipped_bundle_runs_inference_on_a_real_png_without_the_repository(unpacked, tmp_path):
    image = tmp_path / SAMPLE_PNG.name  # outside the repository too
    shutil.copy(SAMPLE_PNG, image)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml",
               "--input", str(image), "--output_dir", str(out)]
    result = subprocess.run(command, cwd=unpacked, env=_bare_env(), capture_output=True, text=True,
                            check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # No traceback or log line points into the repository's code (its venv may live under the repo root).
    assert str(REPO_ROOT / "custom") not in result.stdout + result.stderr
    # The code that runs there is the bundle's copy, not the repository's.
    where = subprocess.run([sys.executable, "-c", "import custom; print(custom.__file__)"], cwd=unpacked,
                           env=_bare_env(), capture_output=True, text=True, check=False, timeout=120)
    assert Path(where.stdout.strip()).resolve() == (unpacked / "custom" / "__init__.py").resolve(), where
    content = json.loads((out / f"{SAMPLE_PNG.stem}.json").read_text())
    validate_findings(content, unpacked)  # the schema shipped in the bundle
    probabilities = content["probabilities"]
    assert len(probabilities) == 14 and all(0.0 <= p <= 1.0 for p in probabilities.values())
    assert content["original_size"] == [1024, 1024]
    assert len(content["findings"]) + len(content["positive_without_box"]) == 14  # threshold 0: all positive
    for finding in content["findings"]:
        x0, y0, x1, y1 = finding["box"]
        assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= 1024, finding


def test_unzipped_bundle_passes_verify_net_in_out(unpacked):
    command = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml",
               "--device", "cpu"]
    result = subprocess.run(command, cwd=unpacked, env=_bare_env(), capture_output=True, text=True,
                            check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def _eager_network(state_path: Path):
    from custom.networks.rpsal import RpSalProbabilities

    network = RpSalProbabilities(**TINY_NETWORK)
    network.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    return network.eval()


def _real_input() -> torch.Tensor:
    """The sample PNG as the bundle's preprocessing makes it: (1, 3, 64, 64), ImageNet-normalised."""
    from custom.transforms import read_grey_image

    grey = torch.from_numpy(read_grey_image(SAMPLE_PNG).array)[None, None]
    grey = torch.nn.functional.interpolate(grey, size=(64, 64), mode="area")
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (grey[0].repeat(3, 1, 1) - mean) / std


def test_torchscript_probabilities_equal_the_eager_model(exported):
    """model.ts (ckpt_export, traced) vs the eager network: probabilities within 1e-4 (max abs)."""
    eager = _eager_network(exported["folder"] / "models" / "model.pt")
    scripted = torch.jit.load(str(exported["folder"] / "models" / "model.ts"), map_location="cpu")
    generator = torch.Generator().manual_seed(0)
    inputs = torch.cat([torch.randn(3, 3, 64, 64, generator=generator), _real_input()[None]])
    with torch.no_grad():
        expected, actual = eager(inputs), scripted(inputs)
    assert actual.shape == (4, 14)
    assert float((expected - actual).abs().max()) <= 1e-4
    # Different images give different probabilities: the trace is not a constant.
    assert float((expected[0] - expected[3]).abs().max()) > 1e-4


def test_torchscript_of_the_detection_path_uses_the_deterministic_top1_selection(exported, tmp_path):
    """``logits: combined`` runs the whole network (proposals, top-1 selection, crop classifier) in model.ts.

    ``check_trace`` is off: the proposal grid is computed on the first call and cached after, so the tracer's
    second run records a different (shorter) graph; the parity below is the real check.
    """
    folder = exported["folder"]
    target = tmp_path / "combined.ts"
    command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(target),
               "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json",
               "--config_file", "configs/inference.yaml", "--use_trace", "True",
               "--input_shape", "[1, 3, 64, 64]", "--network_def#logits", "combined", "--converter_kwargs", "{'check_trace': False}"]
    env = {**_bare_env(), "PYTHONPATH": str(folder)}
    result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    eager = _eager_network(folder / "models" / "model.pt")
    eager.logits = "combined"
    scripted = torch.jit.load(str(target), map_location="cpu")
    generator = torch.Generator().manual_seed(1)
    inputs = torch.cat([torch.randn(2, 3, 64, 64, generator=generator), _real_input()[None]])
    with torch.no_grad():
        expected, actual = eager(inputs), scripted(inputs)
        image_only = torch.sigmoid(eager.outputs(inputs, with_detection=False).image_logits)
    assert float((expected - actual).abs().max()) <= 1e-4
    # The crop classifier contributes: combined probabilities differ from the image-logit ones.
    assert float((expected - image_only).abs().max()) > 1e-4


def test_torchscript_model_runs_with_torch_alone(exported, tmp_path):
    """In an isolated interpreter (-I: no PYTHONPATH, no cwd on sys.path) nothing of this project or MONAI."""
    script = (
        "import sys, torch\n"
        f"model = torch.jit.load({str(exported['folder'] / 'models' / 'model.ts')!r}, map_location='cpu')\n"
        "with torch.no_grad():\n"
        "    out = model(torch.zeros(2, 3, 64, 64))\n"
        "assert tuple(out.shape) == (2, 14), out.shape\n"
        "assert bool(((out >= 0) & (out <= 1)).all())\n"
        "loaded = sorted({name.split('.')[0] for name in sys.modules} & {'custom', 'monai', 'scripts'})\n"
        "assert not loaded, loaded\n"
        "print('ok', out.shape)\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=_bare_env(),
                            capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ok torch.Size([2, 14])" in result.stdout


def test_torchscript_metadata_is_embedded(exported):
    """ckpt_export stores metadata and the inference config in model.ts (MONAI Deploy reads them)."""
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(exported["folder"] / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(
        (exported["folder"] / "configs" / "metadata.json").read_text())["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"].endswith("RpSalProbabilities")


def test_the_model_zoo_full_verification_passes_unchanged(exported, tmp_path):
    """The zoo's ci/verify_bundle.py (vendored unchanged in tests/data/modelzoo_ci) in --mode full: directory,
    version and changelog, metadata schema, properties, network input/output shape, and the TorchScript export
    by ckpt_export WITHOUT tracing (network_def must torch.jit.script)."""
    models = tmp_path / "models"
    shutil.copytree(exported["folder"], models / BUNDLE)
    command = [sys.executable, str(REPO_ROOT / "tests" / "modelzoo_offline.py"), str(models), BUNDLE, "full"]
    result = subprocess.run(command, cwd=tmp_path, env=_bare_env(), capture_output=True, text=True, check=False,
                            timeout=600)
    log = result.stdout[-4000:] + result.stderr[-4000:]
    assert result.returncode == 0, log
    for step in ("directory is verified correctly", "version and changelog are verified correctly",
                 "metadata format is verified correctly", "data shape is verified correctly",
                 "export weights into TorchScript module successfully",
                 "Provided TorchScript module is verified correctly", "finished without error"):
        assert step in result.stdout, step
    # The scripted export equals the eager network on the probabilities.
    scripted = torch.jit.load(str(models / BUNDLE / "models" / "verify_model.ts"), map_location="cpu")
    eager = _eager_network(models / BUNDLE / "models" / "model.pt")
    inputs = torch.cat([torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)), _real_input()[None]])
    with torch.no_grad():
        assert float((scripted(inputs) - eager(inputs)).abs().max()) <= 1e-5
