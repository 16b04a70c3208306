"""The package layers point down (docs/architecture.md), checked by reading every import of every module,
function-level imports included.

    labels, localisation                       (bottom: no MONAI; localisation uses only custom.labels)
    metrics, networks, transforms, data         (never inference, evaluation or dicom)
    inference -> evaluation -> ...; dicom        (the upper layers)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

CUSTOM = REPO_ROOT / "custom"
UPPER = ("custom.inference", "custom.evaluation", "custom.dicom")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved against its package)."""
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def modules_of(package: str) -> list[Path]:
    return sorted((CUSTOM / package).rglob("*.py"))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", modules_of("localisation"), ids=lambda p: p.name)
def test_localisation_uses_no_monai_and_only_custom_labels(path):
    for name in imported_modules(path):
        assert not _under(name, "monai"), (path.name, name)
        if _under(name, "custom"):
            assert _under(name, "custom.localisation") or _under(name, "custom.labels"), (path.name, name)


@pytest.mark.parametrize(
    "path",
    [p for package in ("metrics", "networks", "transforms", "localisation", "data") for p in modules_of(package)],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_lower_layers_never_import_inference_evaluation_or_dicom(path):
    for name in imported_modules(path):
        assert not any(_under(name, upper) for upper in UPPER), (str(path.relative_to(REPO_ROOT)), name)


def test_the_rule_reads_relative_and_function_level_imports(tmp_path):
    module = CUSTOM / "metrics" / "auc.py"
    assert "custom.metrics.auc" not in imported_modules(module)
    sample = REPO_ROOT / "custom" / "handlers" / "auc_metric.py"  # "from ..metrics.auc import auc_per_class"
    assert "custom.metrics.auc.auc_per_class" in imported_modules(sample)
    assert "custom.weights_file.load_checkpoint" in imported_modules(CUSTOM / "inference" / "service.py")


BOX_RULE_STEPS = ("threshold_values", "map_quantiles", "binarise", "select_component", "mask_boxes", "grid_boxes",
                  "grid_boxes_per_threshold", "grid_boxes_to_image")


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(CUSTOM.rglob("*.py")) + sorted((REPO_ROOT / "scripts").glob("*.py"))
     + sorted((REPO_ROOT / "monailabel").rglob("*.py")) if "localisation" not in p.parts],
    ids=lambda p: str(p.relative_to(REPO_ROOT)),
)
def test_every_caller_goes_through_the_one_box_rule(path):
    """Outside custom.localisation nobody assembles map -> threshold -> component -> box itself: they call
    ``BoxRule.boxes`` or ``BoxRule.boxes_per_threshold``."""
    used = {name.rsplit(".", 1)[-1] for name in imported_modules(path) if _under(name, "custom.localisation")}
    assert not used & set(BOX_RULE_STEPS), (str(path.relative_to(REPO_ROOT)), used & set(BOX_RULE_STEPS))
