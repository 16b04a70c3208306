"""Inference on files: input lists and safe output names, the thresholds file, the declared path (inferer ->
postprocessing -> findings document, checked against the shipped schema), the writers (NIfTI maps, overlays), and `python -m monai.bundle run --config_file bundle/configs/inference.yaml` on real NIH PNGs, a
real DICOM and corrupt files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, TINY_NETWORK, subprocess_env
from custom.inference.findings import validate_findings
from custom.inference.inferer import RpSalInferer
from custom.inference.inputs import assign_output_names, resolve_inputs, safe_stem
from custom.inference.postprocessing import Findingsd, MapBoxesd, RpSalMapsd
from custom.inference.writers import output_path, write_nifti_maps
from custom.localisation import BoxRule, rpsal_maps
from custom.thresholds_file import Thresholds, save_thresholds
from custom.labels import CLASS_NAMES
from custom.networks.rpsal import RpSalProbabilities

NIH_IMAGES = REPO_ROOT / "tests" / "data" / "nih_sample" / "images"
INFERENCE_CONFIG = "bundle/configs/inference.yaml"


def dicom_file() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("RG1_UNCR.dcm"))


def tiny_network(seed: int = 0) -> RpSalProbabilities:
    torch.manual_seed(seed)
    return RpSalProbabilities(**TINY_NETWORK).eval()


# ---- inputs and output names -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("../../x.png", "x"),
        ("/abs/folder/00000147_001.png", "00000147_001"),
        ("a b (0008,0018).dcm", "a_b_0008_0018_"),
        ("..", "image"),
        ("...png", "image"),
        (".hidden.png", "hidden"),
        ("C:\\evil\\..\\name.dcm", "name"),
        ("-rf.png", "rf"),
        ("x" * 300 + ".png", "x" * 100),
    ],
)
def test_safe_stem_keeps_names_inside_the_folder(name, expected):
    stem = safe_stem(name)
    assert stem == expected
    path = output_path("/out", stem, ".json")
    assert path.parent == Path("/out") and path.name == f"{stem}.json"


def test_output_path_refuses_separators_and_dot_names():
    for bad in ("../x", "a/b", "", "..", "a\\b"):
        with pytest.raises(ValueError, match="unsafe"):
            output_path("/out", bad, "" if bad in ("", "..") else ".json")


def test_shared_stems_get_distinct_names_independent_of_order():
    items = [
        {"image": "/a/scan.png"},
        {"image": "/b/scan.png"},
        {"image": "/c/SCAN.dcm"},
        {"image": "/d/x.png"},
    ]
    names = [item["output_name"] for item in assign_output_names(items)]
    assert names[0] == "scan" and names[3] == "x"
    assert len({name.lower() for name in names}) == 4
    assert all(name.startswith(("scan_", "SCAN_")) for name in names[1:3])
    # The same list gives the same names (reruns overwrite, not duplicate).
    assert names == [item["output_name"] for item in assign_output_names(items)]


def test_resolve_inputs_reads_a_file_a_folder_and_a_datalist(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(NIH_IMAGES / "00000147_001.png", folder / "b.png")
    shutil.copy(dicom_file(), folder / "scan")  # DICOM without an extension: found by its magic
    (folder / "README.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "a.PNG").write_bytes(b"")  # listed by name; it fails later when read
    listed = [Path(item["image"]).name for item in resolve_inputs(folder)]
    assert listed == ["a.PNG", "b.png", "scan"]
    assert resolve_inputs(folder / "b.png") == [{"image": str(folder / "b.png"), "output_name": "b"}]

    datalist = tmp_path / "lists" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"test": [{"image": "../in/b.png", "label": [0] * 14}, "../in/scan"]}))
    items = resolve_inputs(datalist)
    assert [Path(item["image"]) for item in items] == [folder / "b.png", folder / "scan"]
    assert items[0]["label"] == [0] * 14

    with pytest.raises(FileNotFoundError, match="missing"):
        resolve_inputs(tmp_path / "missing")
    with pytest.raises(ValueError, match="no input"):
        resolve_inputs(None)
    with pytest.raises(ValueError, match="has no 'validation'"):
        resolve_inputs(datalist, "validation")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        resolve_inputs(tmp_path / "bad.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        resolve_inputs(tmp_path / "empty")


# ---- the declared path -------------------------------------------------------------------------------------


def postprocess(network, images, sizes, thresholds, map_name="mix", logits="image") -> list[dict]:
    """The declared path on a batch: the bundle's inferer, decollation, the postprocessing transforms."""
    from monai.data import decollate_batch
    from monai.transforms import Compose

    outputs = RpSalInferer()(images, network)
    transforms = Compose([
        RpSalMapsd("pred", thresholds, logits),
        MapBoxesd("maps", thresholds, map_name),
        Findingsd("findings", thresholds, map_name, logits),
    ])
    return [transforms({"image": images[b], "original_size": sizes[b], "image_path": f"image{b}.png", "pred": pred})
            for b, pred in enumerate(decollate_batch(outputs))]


def test_postprocessing_matches_the_network_and_the_box_rule():
    network = tiny_network()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    sizes = [[1024, 1024], [1955, 1841]]
    everything = Thresholds(
        decision_thresholds={"image": {name: 0.0 for name in CLASS_NAMES}},
        box_thresholds={"mix": {"Nodule": 0.97}},
    )
    items = postprocess(network, images, sizes, everything)
    with torch.no_grad():
        expected_probabilities = network(images)
        output = network.outputs(images, with_detection=True)
    expected_maps = rpsal_maps(output.saliency_logits, output.proposal_logits, output.refined_boxes, 64)
    expected = BoxRule().boxes(expected_maps["mix"], everything.box_threshold_vector("mix"), sizes)
    assert len(items) == 2
    for b, item in enumerate(items):
        result = item["findings"]
        validate_findings(result, REPO_ROOT / "bundle")
        assert result["image"] == f"image{b}.png" and result["original_size"] == sizes[b]
        torch.testing.assert_close(item["maps"]["mix"], expected_maps["mix"][b])
        probabilities = np.array([result["probabilities"][name] for name in CLASS_NAMES])
        np.testing.assert_allclose(probabilities, expected_probabilities[b].numpy(), atol=1e-6)
        assert result["positive"] == list(CLASS_NAMES)  # threshold 0: every class is positive
        boxed = {f["class"]: f for f in result["findings"]}
        assert set(boxed) | set(result["positive_without_box"]) == set(CLASS_NAMES)
        height, width = sizes[b]
        for k, name in enumerate(CLASS_NAMES):
            if name not in boxed:
                assert not expected.valid[b, k]
                continue
            finding = boxed[name]
            x0, y0, x1, y1 = finding["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
            np.testing.assert_allclose(finding["box"], expected.boxes[b, k].numpy(), atol=2e-3)
            assert finding["box_format"] == "xyxy" and finding["map"] == "mix" and finding["score"] > 0
        assert boxed.get("Nodule", {"box_threshold": 0.97})["box_threshold"] == 0.97
    nothing = Thresholds(decision_thresholds={"image": {name: 1.0 for name in CLASS_NAMES}})
    assert all(item["findings"]["positive"] == [] and item["findings"]["findings"] == []
               for item in postprocess(network, images, sizes, nothing))
    combined = postprocess(network, images, sizes, everything, map_name="det", logits="combined")[0]["findings"]
    assert combined["model"]["logits"] == "combined" and combined["model"]["map"] == "det"
    with pytest.raises(ValueError, match="map"):
        MapBoxesd("maps", everything, map_name="cam")


def test_nifti_maps_put_voxels_on_original_pixel_centres(tmp_path):
    import nibabel as nib

    maps = np.random.default_rng(0).random((3, 4, 5)).astype(np.float32)  # K=3, h=4, w=5
    path = write_nifti_maps(tmp_path / "m.nii.gz", maps, (400, 1000))
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    assert data.shape == (5, 4, 3)
    assert data[2, 1, 0] == maps[0, 1, 2]  # (x = column, y = row, class)
    # Voxel (i, j) is map pixel (row j, column i), whose centre is ((i + 0.5) W/w, (j + 0.5) H/h).
    np.testing.assert_allclose(image.affine @ [2, 1, 0, 1], [2.5 * 200, 1.5 * 100, 0, 1])


# ---- the bundle command ------------------------------------------------------------------------------------


def inference_command(inputs, output_dir: Path, model: Path, thresholds: Path, *extra: str) -> list[str]:
    overrides = [
        "--input",
        str(inputs),
        "--output_dir",
        str(output_dir),
        "--ckpt_path",
        str(model),
        "--thresholds_file",
        str(thresholds),
        "--image_size",
        "64",
        "--num_workers",
        "0",
    ]
    for key, value in TINY_NETWORK.items():
        overrides += [f"--network_def#{key}", str(value)]
    return [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        INFERENCE_CONFIG,
        *overrides,
        *extra,
    ]


def test_bundle_inference_on_real_png_and_dicom_skips_corrupt_files(tiny_trained_model, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for png in sorted(NIH_IMAGES.glob("*.png")):
        shutil.copy(png, folder / png.name)
    shutil.copy(dicom_file(), folder / "RG1_UNCR.dcm")
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "truncated.png").write_bytes((NIH_IMAGES / "00000147_001.png").read_bytes()[:3000])
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "notes.txt").write_text("ignored: not an image by name")
    # Every class positive (decision threshold 0): each image gets 14 boxes to check.
    thresholds = save_thresholds(
        Thresholds(decision_thresholds={"image": dict.fromkeys(CLASS_NAMES, 0.0)}),
        tmp_path / "thresholds.json",
    )
    out = tmp_path / "out"
    result = subprocess.run(
        inference_command(folder, out, tiny_trained_model["model"], thresholds, "--nifti_maps", "['mix']"),
        cwd=REPO_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode != 0, log  # some inputs failed
    assert "3 of 8 input(s) could not be processed" in result.stderr, log

    errors = dict(line.split("\t") for line in (out / "errors.txt").read_text().splitlines())
    assert sorted(Path(p).name for p in errors) == ["text.png", "truncated.png", "zero_bytes.png"]
    assert "empty" in errors[str(folder / "zero_bytes.png")]
    assert "not a PNG" in errors[str(folder / "text.png")]
    assert "truncated" in errors[str(folder / "truncated.png")]  # the loader's reason, not MONAI's wrapper
    assert all(f"skipped {path}" in result.stderr for path in errors)

    sizes = {png.stem: (1024, 1024) for png in NIH_IMAGES.glob("*.png")} | {"RG1_UNCR": (1955, 1841)}
    assert sorted(p.stem for p in out.glob("*.json") if p.stem != "summary") == sorted(sizes)
    for stem, (height, width) in sizes.items():
        content = json.loads((out / f"{stem}.json").read_text())
        validate_findings(content, REPO_ROOT / "bundle")
        assert Path(content["image"]).name.startswith(stem) and content["original_size"] == [height, width]
        assert content["model"]["logits"] == "image" and content["model"]["checkpoint_sha256"]
        probabilities = content["probabilities"]
        assert list(probabilities) == list(CLASS_NAMES)
        assert all(0 <= p <= 1 for p in probabilities.values())
        assert content["positive"] == list(CLASS_NAMES)
        assert len(content["findings"]) + len(content["positive_without_box"]) == 14
        assert len(content["findings"]) >= 10
        for finding in content["findings"]:
            x0, y0, x1, y1 = finding["box"]
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, (stem, finding)
            assert finding["box_format"] == "xyxy" and finding["map"] == "mix"
            assert finding["probability"] == probabilities[finding["class"]]
        overlay = Image.open(out / content["files"]["overlay"])
        assert overlay.mode == "RGB" and overlay.size[1] >= 256
        import nibabel as nib

        assert nib.load(out / content["files"]["mix_nifti"]).shape == (
            16,
            16,
            14,
        )  # 64 px input: 16 x 16 maps
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["inputs"], summary["written"], summary["failed"]) == (8, 5, 3)


def test_datalist_inference_keeps_outputs_inside_the_folder(tiny_trained_model, tmp_path):
    """In process (no subprocess): a datalist whose entries climb out of their folder and share a stem."""
    from monai.bundle import ConfigParser

    folder = tmp_path / "deep" / "in"
    folder.mkdir(parents=True)
    shutil.copy(NIH_IMAGES / "00001369_000.png", folder / "00001369_000.png")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(NIH_IMAGES / "00002578_000.png", other / "00001369_000.png")  # same stem, other file
    datalist = tmp_path / "deep" / "list.json"
    datalist.write_text(
        json.dumps(["in/00001369_000.png", "../other/00001369_000.png", "../../../../etc/passwd"])
    )
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / INFERENCE_CONFIG))
    parser.update(
        {
            "input": str(datalist),
            "output_dir": str(tmp_path / "out"),
            "image_size": 64,
            "ckpt_path": str(tiny_trained_model["model"]),
            "thresholds_file": str(tmp_path / "none.json"),
            "num_workers": 0,
            "overlays": False,
            **{f"network_sizes#{k}": v for k, v in TINY_NETWORK.items()},
        }
    )
    parser.get_parsed_content("initialize")  # loads the weights
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["written"], summary["failed"]) == (2, 1)
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written[:2] == ["00001369_000.json", "00001369_000_" + written[1][len("00001369_000_") :]]
    assert len(written[1]) == len("00001369_000_12345678.json")
    assert set(written[2:]) == {"errors.txt", "summary.json"}
    assert not any(p.name.endswith(".json") for p in tmp_path.iterdir())  # nothing escaped upwards
    first = json.loads((tmp_path / "out" / "00001369_000.json").read_text())
    assert first["model"]["thresholds_file"] is None and first["decision_thresholds"]["Mass"] == 0.5
    assert first["files"] == {}  # no overlay asked for
    with pytest.raises(RuntimeError, match="1 of 3 input"):
        evaluator.finalize()
    parser["overlays"] = "false"  # a command-line string would be truthy
    parser.parse()
    with pytest.raises(Exception) as raised:
        parser.get_parsed_content("initialize")
    chain = [raised.value, raised.value.__cause__, raised.value.__context__]
    assert any("overlays must be true or false" in str(error) for error in chain if error), chain


def test_the_readme_command_runs_the_demo_model_with_its_network_fragment_only(tmp_path):
    """``inference.yaml`` + ``demo_network.yaml`` + --input/--output_dir/--ckpt_path, nothing else: the demo
    training's network (sizes from the same fragment, through demo.yaml), its thresholds file read from beside
    the checkpoint."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "bundle/configs/train.yaml"), str(REPO_ROOT / "bundle/configs/demo.yaml")])
    torch.manual_seed(0)
    models = tmp_path / "runs" / "demo" / "models"
    models.mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")
    save_thresholds(Thresholds(decision_thresholds={"image": dict.fromkeys(CLASS_NAMES, 0.0)}),
                    models / "thresholds.json")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               "['bundle/configs/inference.yaml','bundle/configs/demo_network.yaml']",
               "--input", str(NIH_IMAGES / "00000147_001.png"), "--output_dir", str(out),
               "--ckpt_path", str(models / "model.pt")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    content = json.loads((out / "00000147_001.json").read_text())
    validate_findings(content, REPO_ROOT / "bundle")
    assert content["model"]["input_size"] == [128, 128] and content["map_grid"] == [32, 32]
    assert content["model"]["thresholds_file"] == str(models / "thresholds.json")
    assert content["positive"] == list(CLASS_NAMES) and (out / content["files"]["overlay"]).is_file()
