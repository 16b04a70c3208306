"""Shared fixtures: the repository root on sys.path, and a tiny synthetic phantom in the NIH layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
