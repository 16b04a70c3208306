"""The batch inference run of ``bundle/configs/inference.yaml``: images in, one JSON (+ pictures) out each.

A file that cannot be read does not stop the run: ``SkippingDataset`` turns its loading error into a record,
the runner writes it to ``<output_dir>/errors.txt`` and stderr and goes on; after every output is written,
``InferenceRunner.finalize`` raises an error listing the failures, so the process exits non-zero.

Outputs of an input named ``<name>`` (``custom.inference.inputs``): ``<output_dir>/<name>.json``, and on
request ``<output_dir>/overlays/<name>.png`` and ``<output_dir>/maps/<name>_<map>.nii.gz``;
``<output_dir>/summary.json`` counts them.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from custom.atomic_file import atomic_output
from custom.inference.arguments import require_booleans
from custom.inference.calibration_file import MAP_NAMES, Calibration
from custom.inference.overlays import findings_overlay, load_display_image
from custom.inference.pipeline import file_digest, findings_json, network_outputs, predict_from_outputs
from custom.inference.writers import ErrorLog, output_path, write_json, write_nifti_maps
from custom.transforms.grey_image import ImageLoadError

logger = logging.getLogger(__name__)


def failure_reason(error: BaseException) -> str:
    """The message that best explains a failure: MONAI wraps a transform's error in its own RuntimeError, and
    a decoder's low-level error (struct, zlib) is wrapped in ImageLoadError naming the file. The first
    ImageLoadError of the chain is taken, else the innermost exception."""
    chain = [error]
    while chain[-1].__cause__ is not None or (
        chain[-1].__context__ is not None and not chain[-1].__suppress_context__
    ):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
        if len(chain) > 50:  # a cycle would be a bug elsewhere; never loop on it
            break
    chosen = next((e for e in chain if isinstance(e, ImageLoadError)), chain[-1])
    return f"{type(chosen).__name__}: {chosen}"


class SkippingDataset(torch.utils.data.Dataset):
    """A dataset that applies ``transform`` to each item and turns a failure into an error record.

    Args:
        data: items ``{"image": path, "output_name": str, ...}`` (``custom.inference.inputs.resolve_inputs``).
        transform: the preprocessing (MONAI Compose).

    ``__getitem__`` returns the transformed dict (with ``image_path``, the input file), or
    ``{"image": path, "output_name": ..., "error": reason}`` when the transform raised (a bad file, ...).
    """

    def __init__(self, data: Sequence[dict], transform: Callable):
        self.data = list(data)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        try:
            output = self.transform(dict(item))
        except Exception as error:  # any failure of one input is that input's, reported, never fatal
            return {
                "image": item.get("image"),
                "output_name": item.get("output_name"),
                "error": failure_reason(error),
            }
        # The loaded tensor may drop its metadata (track_meta=False): the source path travels beside it.
        output.setdefault("image_path", item.get("image"))
        return output


def collate_items(batch: list[dict]) -> list[dict]:
    """Keep a batch as a list of dicts (error records and images of any original size travel together)."""
    return list(batch)


class InferenceRunner:
    """Run the network on every item of a dataloader and write each image's results.

    Args:
        network: RpSalNet or RpSalProbabilities, weights loaded, on ``device``.
        dataloader: yields lists of dicts (``SkippingDataset`` + ``collate_items``); each good dict holds
            ``image`` (3, S, S) tensor, ``original_size`` [H, W], ``output_name``, and the source path under
            the MetaTensor's meta or ``image_path``.
        output_dir: folder of the outputs (created).
        calibration: ``custom.inference.calibration_file.Calibration``.
        device: torch device of the network.
        inferer: optional MONAI inferer (called as ``inferer(images, network.outputs, with_detection=True)``).
        map_name: the map the boxes come from ("mix", the paper's best).
        logits: "image" or "combined"; None: the network's ``logits`` attribute.
        overlays: write the overlay picture of each image; overlay_size: its longest side per panel (px);
            max_panels: at most this many findings drawn (the most probable first).
        nifti_maps: maps to save as NIfTI (any of "sal", "det", "mix").
        model_info: extra entries of the JSON's "model" (e.g. the bundle version).
        checkpoint: the weights file, recorded (with its SHA-256 prefix) in the JSON's "model".
        amp: bfloat16 autocast for the network on CUDA (maps and boxes are computed in float32).
        class_names: the network's classes.
        image_key, pred_key: data-dict keys of the model input and of the probabilities the runner adds.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataloader,
        output_dir: str | os.PathLike,
        calibration: Calibration,
        device=None,
        inferer: Callable | None = None,
        map_name: str = "mix",
        logits: str | None = None,
        overlays: bool = True,
        overlay_size: int = 512,
        max_panels: int = 4,
        nifti_maps: Sequence[str] = (),
        model_info: dict | None = None,
        checkpoint: str | None = None,
        amp: bool = False,
        class_names: Sequence[str] | None = None,
        image_key: str = "image",
        pred_key: str = "pred",
    ):
        require_booleans(overlays=overlays, amp=amp)
        if isinstance(nifti_maps, str):
            raise ValueError(f"nifti_maps must be a list of map names, got the string {nifti_maps!r}")
        unknown = set(nifti_maps) - set(MAP_NAMES)
        if map_name not in MAP_NAMES or unknown:
            raise ValueError(
                f"maps must be among {MAP_NAMES}, got map_name={map_name!r}, nifti_maps={nifti_maps}"
            )
        self.network = network
        self.dataloader = dataloader
        self.output_dir = Path(output_dir)
        self.calibration = calibration
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.inferer = inferer
        self.map_name = map_name
        self.logits = logits or getattr(network, "logits", "image")
        self.overlays = overlays
        self.overlay_size = int(overlay_size)
        self.max_panels = int(max_panels)
        self.nifti_maps = tuple(nifti_maps)
        self.checkpoint = checkpoint
        self.extra_model_info = dict(model_info or {})
        self.amp = bool(amp) and self.device.type == "cuda"
        self.class_names = tuple(class_names or calibration.class_names)
        self.image_key, self.pred_key = image_key, pred_key
        self.errors: ErrorLog | None = None
        self.written: list[str] = []
        self.total = 0

    def model_info(self, input_size: Sequence[int]) -> dict:
        """The JSON's "model" entry: which weights, logits, map and thresholds produced the result."""
        calibrated = self.calibration.source is not None
        info = {
            "name": "RpSal (Hermoza et al., MICCAI 2020)",
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
            "checkpoint_sha256": file_digest(self.checkpoint)
            if self.checkpoint and os.path.isfile(self.checkpoint)
            else None,
            "logits": self.logits,
            "input_size": [int(v) for v in input_size],
            "map": self.map_name,
            "box_rule": {
                "mode": self.calibration.mode,
                "component": self.calibration.component,
                "connectivity": self.calibration.connectivity,
            },
            "calibration_file": self.calibration.source,
            "box_thresholds": "held-out two-fold protocol: per class the mean of the two folds' thresholds; "
            f"default {self.calibration.default_box_threshold} for classes without boxes"
            if calibrated
            else f"default {self.calibration.default_box_threshold} (no file)",
            "decision_thresholds": "Youden's J on the validation split"
            if calibrated
            else f"default {self.calibration.default_decision_threshold} (no file)",
        }
        info.update(self.extra_model_info)
        return info

    def run(self) -> dict:
        """Process every input; returns the summary also written to ``<output_dir>/summary.json``."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.errors = ErrorLog(self.output_dir)
        self.written, self.total = [], 0
        self.network.eval()
        start = time.perf_counter()
        model_info = None
        for batch in self.dataloader:
            self.total += len(batch)
            good = []
            for item in batch:
                if "error" in item:
                    self.errors.add(str(item["image"]), item["error"])
                else:
                    good.append(item)
            if not good:
                continue
            images = torch.stack([torch.as_tensor(item[self.image_key]) for item in good]).to(self.device)
            model_info = model_info or self.model_info(images.shape[-2:])
            sizes = [[int(v) for v in item["original_size"]] for item in good]
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else nullcontext()
            with torch.no_grad(), autocast:
                output = network_outputs(self.network, images, self.inferer)
            prediction = predict_from_outputs(
                output, images.shape[-2:], sizes, self.calibration, self.map_name, self.logits
            )
            for index, item in enumerate(good):
                item[self.pred_key] = prediction.probabilities[index]
                try:
                    self._write(item, prediction, index, sizes[index], model_info)
                except Exception as error:  # one image's writing failure is reported, the rest go on
                    self.errors.add(
                        _source(item, self.image_key), f"writing outputs failed: {failure_reason(error)}"
                    )
        summary = {
            "inputs": self.total,
            "written": len(self.written),
            "failed": len(self.errors.failures),
            "errors_file": str(self.errors.path),
            "seconds": round(time.perf_counter() - start, 3),
        }
        write_json(self.output_dir / "summary.json", summary)
        logger.info(
            f"inference: {summary['written']} of {self.total} input(s) written to {self.output_dir}, "
            f"{summary['failed']} failed"
        )
        return summary

    def _write(self, item: dict, prediction, index: int, original_size: list[int], model_info: dict) -> None:
        name = item["output_name"]
        source = _source(item, self.image_key)
        result = {
            "image": source,
            "original_size": original_size,
            "model": model_info,
            **findings_json(prediction, index, self.class_names),
            "map_grid": list(prediction.maps[self.map_name].shape[-2:]),
        }
        files = {}
        if self.overlays:
            files["overlay"] = self._overlay(source, result, prediction, index, name)
        for map_name in self.nifti_maps:
            path = output_path(self.output_dir / "maps", name, f"_{map_name}.nii.gz")
            write_nifti_maps(path, prediction.maps[map_name][index], original_size)
            files[f"{map_name}_nifti"] = str(path.relative_to(self.output_dir))
        result["files"] = files
        write_json(output_path(self.output_dir, name, ".json"), result)
        self.written.append(name)

    def _overlay(self, source: str, result: dict, prediction, index: int, name: str) -> str:
        grey, _ = load_display_image(source, self.overlay_size)
        class_maps = prediction.maps[self.map_name][index].numpy()
        column = {class_name: k for k, class_name in enumerate(self.class_names)}
        maps = {i: class_maps[column[f["class"]]] for i, f in enumerate(result["findings"])}
        top = int(np.argmax(prediction.probabilities[index].numpy()))
        fallback = (self.class_names[top], float(prediction.probabilities[index, top]), class_maps[top])
        picture = findings_overlay(
            grey, result["original_size"], result["findings"], maps, fallback, self.max_panels
        )
        path = output_path(self.output_dir / "overlays", name, ".png")
        with atomic_output(path, suffix=".png") as temp:
            picture.save(temp)
        return str(path.relative_to(self.output_dir))

    def finalize(self) -> None:
        """Raise RuntimeError when any input failed (after all outputs are written): a non-zero exit.

        The message counts the failures and names the errors file; it does not repeat them, so each failed
        input has exactly one line on stderr (written by ``ErrorLog.add``) and one in the file.
        """
        if self.errors is None:
            raise RuntimeError("InferenceRunner.finalize called before run")
        failures = self.errors.failures
        if failures:
            raise RuntimeError(
                f"{len(failures)} of {self.total} input(s) could not be processed; each is listed with its "
                f"reason in {self.errors.path} and on stderr ('inference: skipped <path>: <reason>')"
            )


def _source(item: dict, image_key: str) -> str:
    """The input file of a processed item: its ``image_path``, else the MetaTensor's ``filename_or_obj``."""
    if "image_path" in item:
        return str(item["image_path"])
    meta = getattr(item.get(image_key), "meta", None) or item.get(f"{image_key}_meta_dict") or {}
    return str(meta.get("filename_or_obj", item.get("output_name")))
