"""The bundle's metadata, licence and model card as the MONAI model zoo checks them, offline.

The schema is the zoo's ``meta_schema_20240725.json``, vendored in ``tests/data/schema/``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml
from conftest import REPO_ROOT, subprocess_env

from custom.labels import CLASS_NAMES

CONFIGS = REPO_ROOT / "bundle" / "configs"
METADATA = CONFIGS / "metadata.json"
SCHEMA = REPO_ROOT / "tests" / "data" / "schema" / "meta_schema_20240725.json"


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads(METADATA.read_text(encoding="utf-8"))


def test_metadata_passes_the_zoo_schema(metadata):
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema).check_schema(schema)
    jsonschema.validate(metadata, schema)
    # The zoo reads the schema name from the metadata; it must be the vendored one (it requires
    # required_packages_version).
    assert metadata["schema"].endswith("/" + SCHEMA.name)


def test_schema_rejects_metadata_without_required_packages(metadata):
    """The check has teeth: the field the 20240725 schema added is enforced."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = {k: v for k, v in metadata.items() if k != "required_packages_version"}
    with pytest.raises(jsonschema.ValidationError, match="required_packages_version"):
        jsonschema.validate(broken, schema)


def test_metadata_is_pretty_printed_with_4_space_indent():
    text = METADATA.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=4) + "\n"


def test_version_is_in_changelog_and_versions_match_the_environment(metadata):
    import monai
    import numpy
    import torch

    assert metadata["version"] in metadata["changelog"]
    assert metadata["monai_version"] == monai.__version__
    assert metadata["pytorch_version"] == torch.__version__.split("+")[0]
    # numpy is not pinned in requirements.txt: the major version must match what the bundle was made with.
    assert metadata["numpy_version"].split(".")[0] == numpy.__version__.split(".")[0]
    assert "pytorch-ignite" in metadata["required_packages_version"]
    assert any("2005.10550" in ref for ref in metadata["references"])  # the paper
    assert any("ChestX-ray8" in ref for ref in metadata["references"])  # the data set


def test_network_data_format_describes_the_inference_network(metadata):
    image = metadata["network_data_format"]["inputs"]["image"]
    assert (image["num_channels"], image["spatial_shape"], image["dtype"]) == (3, [512, 512], "float32")
    # ImageNet normalisation of a [0, 1] grey image: (0 - 0.485) / 0.229 .. (1 - 0.406) / 0.225.
    assert image["value_range"] == pytest.approx([-0.485 / 0.229, 0.594 / 0.225], abs=1e-4)
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert (pred["num_channels"], pred["dtype"], pred["value_range"]) == (14, "float32", [0, 1])
    assert [pred["channel_def"][str(i)] for i in range(14)] == list(CLASS_NAMES)
    post = metadata["network_data_format"]["post_processed_outputs"]
    assert post["maps"]["spatial_shape"] == [128, 128] and post["maps"]["num_channels"] == 14
    assert post["boxes"]["num_channels"] == 4


def test_inference_config_has_the_ids_the_zoo_and_monai_label_read():
    config = yaml.safe_load((CONFIGS / "inference.yaml").read_text(encoding="utf-8"))
    for key in ("bundle_root", "device", "network_def", "inferer", "output_dir", "preprocessing"):
        assert key in config, key
    assert config["network_def"]["_target_"] == "custom.networks.rpsal.RpSalProbabilities"
    assert config["image_size"] == 512


def test_licence_and_docs_exist():
    licence = (REPO_ROOT / "bundle" / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0" in licence
    data_licence = (REPO_ROOT / "bundle" / "docs" / "data_license.txt").read_text(encoding="utf-8")
    assert "nihcc.app.box.com" in data_licence and "NIH Clinical Center" in data_licence
    card = (REPO_ROOT / "bundle" / "docs" / "README.md").read_text(encoding="utf-8")
    for section in ("Intended use", "Data", "Training", "Evaluation", "Results", "Limitations"):
        assert f"## {section}" in card, section


def test_monai_verify_metadata_command_passes_offline():
    """The zoo's own command, with the vendored schema (an existing file is not downloaded)."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(METADATA),
         "--filepath", str(SCHEMA)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_verify_net_in_out_on_the_inference_network_def():
    """The zoo's network check: the paper-size network_def of inference.yaml on a 512x512 input."""
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
         "--meta_file", "bundle/configs/metadata.json", "--config_file", "bundle/configs/inference.yaml",
         "--device", "cpu"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, check=False, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr
