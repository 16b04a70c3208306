"""Export the bundle as a self-contained folder and zip, as the MONAI model zoo and MONAI Label load bundles.

Usage::

    python scripts/export_bundle.py --out_dir dist [--model runs/demo/models/model.pt]
        [--thresholds runs/demo/models/thresholds.json] [--overrides bundle/configs/demo_network.yaml]
        [--torchscript true] [--pt2 true] [--onnx true]

Writes ``<out_dir>/chestxray14_rpsal_detection/`` and ``<out_dir>/chestxray14_rpsal_detection.zip`` (the zip
holds that one folder, as the zoo's zips do):

- ``configs/``: every ``bundle/configs/*.{yaml,json,conf}``, the YAML ones read and written through MONAI's
  config API with ``bundle_root: .`` (paths resolve from the bundle folder: run ``python -m monai.bundle run
  --config_file configs/inference.yaml`` THERE);
- ``custom/``: this project's Python package, copied inside (the zoo's CI and MONAI Label put the bundle root
  on ``sys.path``, so ``custom.*`` targets resolve without this repository);
- ``docs/`` (model card, data licence), ``LICENSE``;
- ``models/``: ``model.pt`` and ``thresholds.json`` when given (weights are optional), ``model.ts``
  (TorchScript, traced, via ``monai.bundle ckpt_export``) with ``--torchscript true``, and ``model.pt2``
  (torch.export) / ``model.onnx`` (probabilities and maps, for deployment without the bundle:
  ``custom.deployment``) with ``--pt2 true`` / ``--onnx true``.

``--overrides`` (a YAML/JSON file or a dict of config id -> value, e.g. ``bundle/configs/demo_network.yaml``,
the demo network's sizes) is set in ``configs/inference.yaml`` by config id, so the exported inference config
is self-contained (the model zoo and MONAI Label read it alone) and matches the weights shipped. When it sets
``image_size``, the input and map shapes in ``metadata.json`` follow.

Exit status 0 on success; a missing file or an existing non-empty output folder (without ``--force``) is an
error naming the path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as scripts/export_bundle.py: the repository's custom package
    sys.path.insert(0, str(REPO_ROOT))

from custom.arguments import overrides_mapping  # noqa: E402

BUNDLE_NAME = "chestxray14_rpsal_detection"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".conf")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")


class ExportError(RuntimeError):
    """The export cannot proceed; the message names the file and the problem."""


def _read_overrides(overrides) -> dict:
    """Overrides as a dict (``custom.arguments.overrides_mapping``); its errors as ExportError."""
    try:
        return overrides_mapping(overrides)
    except (FileNotFoundError, TypeError) as error:
        raise ExportError(str(error)) from error


def exported_config(path: Path, overrides: Mapping | None = None) -> dict:
    """A YAML config of the repository as the exported bundle holds it, through MONAI's config API: read with
    ``ConfigParser``, ``bundle_root`` set to ``.`` (the bundle runs from its own folder) where the file sets
    one, and the overrides applied by config id (``network_def#backbone`` sets that entry)."""
    from monai.bundle import ConfigParser

    try:
        parser = ConfigParser(ConfigParser.load_config_file(path))
    except Exception as error:  # a YAML error or a non-mapping file
        raise ExportError(f"{path}: not a readable bundle config ({error})") from error
    if "bundle_root" in parser.config:
        parser["bundle_root"] = "."
    for key, value in (overrides or {}).items():
        current = parser.get(str(key))
        if isinstance(current, Mapping) and "_target_" in current and not (
            isinstance(value, Mapping) and "_target_" in value
        ):
            raise ExportError(f"{path}: '{key}' is a component; override its entries as '{key}#<entry>'")
        try:
            parser[str(key)] = value
        except (KeyError, TypeError, ValueError) as error:
            raise ExportError(f"{path}: cannot set '{key}' ({error})") from error
    return parser.config


def write_config(config: dict, target: Path, source: Path) -> None:
    """Write an exported YAML config (keys in the source's order), headed by where its comments are."""
    from monai.bundle import ConfigParser

    ConfigParser.export_config_file(config, str(target), fmt="yaml", sort_keys=False, width=110,
                                    default_flow_style=False)
    header = (f"# {source.name} of the {BUNDLE_NAME} bundle, exported by scripts/export_bundle.py; the commented\n"
              f"# original is bundle/configs/{source.name} in the repository (docs/sharing.md).\n")
    target.write_text(header + target.read_text(encoding="utf-8"), encoding="utf-8")


def update_metadata(metadata: dict, overrides: Mapping) -> dict:
    """Metadata with the input/map shapes of an overridden ``image_size`` (S x S input, S/4 x S/4 maps)."""
    metadata = json.loads(json.dumps(metadata))
    size = overrides.get("image_size")
    if size is None:
        return metadata
    size = int(size)
    if size % 32:
        raise ExportError(f"image_size must be a multiple of 32 (the network's stride), got {size}")
    formats = metadata["network_data_format"]
    next(iter(formats["inputs"].values()))["spatial_shape"] = [size, size]
    maps = formats.get("post_processed_outputs", {}).get("maps")
    if maps is not None:
        maps["spatial_shape"] = [size // 4, size // 4]
    return metadata


def _copy_file(source: Path, target: Path, what: str) -> None:
    if not source.is_file():
        raise ExportError(f"{source}: {what} not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def write_bundle_folder(bundle: Path, model=None, thresholds=None, overrides=None) -> dict:
    """Write the bundle folder (configs, custom, docs, LICENSE, models); returns the metadata written."""
    overrides = _read_overrides(overrides)
    configs = bundle / "configs"
    configs.mkdir(parents=True)
    source_configs = REPO_ROOT / "bundle" / "configs"
    metadata = None
    for source in sorted(source_configs.iterdir()):
        if source.suffix not in CONFIG_SUFFIXES or not source.is_file():
            continue
        if source.name == "metadata.json":
            metadata = update_metadata(json.loads(source.read_text(encoding="utf-8")), overrides)
            (configs / source.name).write_text(json.dumps(metadata, indent=4) + "\n", encoding="utf-8")
            continue
        if source.suffix in (".yaml", ".yml"):
            config = exported_config(source, overrides if source.name == "inference.yaml" else None)
            write_config(config, configs / source.name, source)
        else:
            shutil.copyfile(source, configs / source.name)
    if metadata is None:
        raise ExportError(f"{source_configs}: metadata.json not found")
    if not (configs / "inference.yaml").is_file():
        raise ExportError(f"{source_configs}: inference.yaml not found (the bundle's inference config)")
    shutil.copytree(REPO_ROOT / "custom", bundle / "custom", ignore=IGNORED)
    docs = REPO_ROOT / "bundle" / "docs"
    if docs.is_dir():
        shutil.copytree(docs, bundle / "docs", ignore=IGNORED)
    _copy_file(REPO_ROOT / "bundle" / "LICENSE", bundle / "LICENSE", "bundle licence")
    (bundle / "models").mkdir()
    if model is not None:
        _copy_file(Path(model), bundle / "models" / "model.pt", "model checkpoint")
    if thresholds is not None:
        _copy_file(Path(thresholds), bundle / "models" / "thresholds.json", "thresholds file")
    return metadata


def export_torchscript(bundle: Path, metadata: dict) -> Path:
    """Trace ``network_def`` of the exported inference config to ``models/model.ts`` (``monai.bundle
    ckpt_export``, run from the bundle folder with only the bundle on the Python path). Returns the path."""
    if not (bundle / "models" / "model.pt").is_file():
        raise ExportError(f"{bundle}/models/model.pt: needed for --torchscript (pass --model)")
    image = next(iter(metadata["network_data_format"]["inputs"].values()))
    shape = [1, int(image["num_channels"]), *(int(side) for side in image["spatial_shape"])]
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.yaml",
        "--use_trace", "True", "--input_shape", json.dumps(shape),
    ]
    env = {**os.environ, "PYTHONPATH": str(bundle)}
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ExportError(f"ckpt_export failed in {bundle}:\n{(result.stdout + result.stderr)[-4000:]}")
    return bundle / "models" / "model.ts"


def export_deployment(bundle: Path, pt2: bool, onnx: bool) -> list[Path]:
    """Write ``models/model.pt2`` (torch.export) and/or ``models/model.onnx`` from the exported bundle's own
    inference config, checkpoint and thresholds file: the normalised image batch -> the 14 probabilities and
    the Sal / Det / Mix maps, batch size dynamic (``custom.deployment.exported_model``)."""
    from custom.deployment.exported_model import RpSalMapsModel, export_onnx, export_pt2, load_network

    if not (bundle / "models" / "model.pt").is_file():
        raise ExportError(f"{bundle}/models/model.pt: needed for --pt2 / --onnx (pass --model)")
    config = bundle / "configs" / "inference.yaml"
    network, thresholds, size = load_network(str(config), bundle / "models" / "model.pt",
                                             {"bundle_root": str(bundle)})
    model = RpSalMapsModel(network, size, thresholds.weighting, thresholds.normalize, thresholds.sharpness,
                           network.logits)
    metadata = bundle / "configs" / "metadata.json"
    written = []
    if pt2:
        written.append(export_pt2(model, bundle / "models" / "model.pt2", metadata, config))
    if onnx:
        written.append(export_onnx(model, bundle / "models" / "model.onnx", metadata, config))
    return written


def zip_bundle(bundle: Path, zip_path: Path) -> Path:
    """Zip the bundle folder so the archive holds ``<bundle name>/...`` (sorted entries)."""
    temp = zip_path.with_name(f".{zip_path.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(temp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                archive.write(path, Path(bundle.name) / path.relative_to(bundle))
    os.replace(temp, zip_path)
    return zip_path


def export_bundle(out_dir: str = "dist", model: str | None = None, thresholds: str | None = None,
                  overrides=None, torchscript: bool = False, make_zip: bool = True,
                  force: bool = False, calibration: str | None = None, pt2: bool = False,
                  onnx: bool = False) -> str:
    """Write the self-contained bundle folder (and zip) under ``out_dir``.

    Args:
        out_dir: output folder; the bundle goes to ``out_dir/chestxray14_rpsal_detection``.
        model: a trained ``model.pt`` (RpSalNet state dict) to ship; None ships no weights.
        thresholds: the ``thresholds.json`` evaluate.yaml wrote for that model; None: inference defaults.
        overrides: config id -> value (dict, or a YAML/JSON file such as ``bundle/configs/demo_network.yaml``)
            set in ``configs/inference.yaml``.
        torchscript: also write ``models/model.ts`` (needs ``model``).
        pt2, onnx: also write ``models/model.pt2`` (torch.export) / ``models/model.onnx``: probabilities and
            maps, batch size dynamic (need ``model``; ONNX needs ``onnxscript``).
        make_zip: also write ``out_dir/chestxray14_rpsal_detection.zip``.
        force: replace an existing bundle folder.
        calibration: deprecated name of ``thresholds`` (bundle 0.1.0).

    Returns:
        The bundle folder's path (printed by the CLI).
    """
    if calibration is not None:
        print("export_bundle: --calibration is deprecated, use --thresholds", file=sys.stderr)
        thresholds = thresholds or calibration
    out_dir = Path(out_dir).resolve()
    bundle = out_dir / BUNDLE_NAME
    if bundle.exists():
        if not force:
            raise ExportError(f"{bundle}: already exists (pass --force true to replace it)")
        shutil.rmtree(bundle)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        metadata = write_bundle_folder(bundle, model, thresholds, overrides)
        if torchscript:
            export_torchscript(bundle, metadata)
        if pt2 or onnx:
            export_deployment(bundle, pt2, onnx)
    except BaseException:
        shutil.rmtree(bundle, ignore_errors=True)  # no half-written bundle left behind
        raise
    if make_zip:
        zip_bundle(bundle, out_dir / f"{BUNDLE_NAME}.zip")
    return str(bundle)


def main() -> None:
    import fire

    try:
        fire.Fire(export_bundle)  # fire prints the returned bundle path
    except ExportError as error:
        print(f"export_bundle: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
