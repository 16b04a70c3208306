"""Shared fixtures: the repository root on sys.path, a tiny synthetic phantom in the NIH layout, and a tiny
model trained on it once per session through the bundle's own training command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    """A 240-image, 64-px phantom ChestX-ray14 folder (images/, label and box CSVs, split lists)."""
    from custom.data.phantom import make_phantom

    folder = tmp_path_factory.mktemp("phantom") / "tiny"
    make_phantom(out_dir=str(folder), num_images=240, image_size=64, seed=3, num_workers=1)
    return folder


def subprocess_env() -> dict:
    """Environment for subprocesses: the repository importable, few threads (2-core machines run CI)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


TRAIN_CONFIGS = ["bundle/configs/train.yaml", "bundle/configs/demo.yaml"]
# Network sizes of demo.yaml at the 64-px test size (crop 16 px).
TINY_NETWORK = dict(backbone="densenet_small", crop_backbone="resnet10", fpn_channels=32, class_channels=16,
                    head_channels=8, crop_size=16)


def write_overrides(folder: Path, phantom: Path, epochs=(1, 1, 1), **extra) -> Path:
    """A config merged last on train.yaml + demo.yaml: the tiny phantom, 64-px images, outputs in ``folder``."""
    overrides = {
        "dataset_dir": str(phantom),
        "ckpt_dir": str(folder / "models"),
        "output_dir": str(folder / "logs"),
        "image_size": 64,
        "batch_size": 8,
        "network_def#crop_size": 16,
        **{f"stages#{i}#epochs": e for i, e in enumerate(epochs)},
        **extra,
    }
    path = folder / "overrides.yaml"
    path.write_text(yaml.safe_dump(overrides))
    return path


def bundle_command(configs: list[str], run_id: str = "training", launcher: list[str] | None = None) -> list[str]:
    """``python -m monai.bundle run <run_id> --config_file "['a.yaml','b.yaml']"``."""
    config_list = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    launcher = launcher or [sys.executable]
    return [*launcher, "-m", "monai.bundle", "run", run_id, "--config_file", config_list]


def run_bundle(configs, run_id: str = "training", launcher=None, timeout=900) -> subprocess.CompletedProcess:
    """Run a bundle command from the repository root; returns the completed process (output captured)."""
    return subprocess.run(
        bundle_command(configs, run_id, launcher), cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_trained_model(tmp_path_factory, tiny_phantom) -> dict:
    """Train the tiny demo network on the tiny phantom once (1 epoch per stage, 64 px).

    Returns ``{"folder", "overrides", "ckpt_dir", "model", "configs"}``: ``configs`` is the list of config
    files (train.yaml, demo.yaml, the overrides) a test can extend with evaluate.yaml etc.
    """
    folder = tmp_path_factory.mktemp("trained")
    overrides = write_overrides(folder, tiny_phantom)
    configs = [*TRAIN_CONFIGS, str(overrides)]
    result = run_bundle(configs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        "folder": folder,
        "overrides": overrides,
        "ckpt_dir": folder / "models",
        "model": folder / "models" / "model.pt",
        "configs": configs,
        "training_output": result.stdout + result.stderr,
    }
