"""The network and the paper's maps as one tensor program, exported for deployment (issue 17).

``RpSalMapsModel`` maps the normalised image batch (B, 3, S, S) to the 14 probabilities (B, K) and the Sal,
Det and Mix maps (B, K, S/4, S/4) (``custom.localisation.maps``, Det weighted as the thresholds file says).
``export_pt2`` writes it with ``torch.export`` (``torch.export.load`` reads it with torch alone), ``export_onnx``
with ``torch.onnx.export(..., dynamo=True)`` (run by onnxruntime); both keep the batch size dynamic and carry
the bundle's metadata and inference config, as ``model.ts`` does. While exporting, the network takes its
traceable paths (``torch.compiler.is_compiling()``): the plain per-class affine map, and for the proposal
pooling (whose eager sparse matrix is built from the data) the one-image matrix frozen as constants
(``.pt2``: aten ops only, so torch alone runs it) or ONNX's RoIAlign operator (``.onnx``); the same maths
(tested equal).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from custom.localisation.maps import rpsal_maps

OUTPUT_NAMES = ("probabilities", "sal", "det", "mix")


class RpSalMapsModel(nn.Module):
    """``forward(images (B, 3, S, S))`` -> (probabilities (B, K), sal, det, mix (B, K, S/4, S/4)), float32.

    Args:
        network: RpSalProbabilities or RpSalNet with its weights, in eval mode (its proposal pooler gets the
            pooling matrix of ``input_size`` frozen as constants).
        input_size: S, the side of the network input the program is exported for.
        weighting, normalize, sharpness: Det's weighting (``custom.localisation.maps.detection_map``), those
            of the thresholds file the box thresholds were chosen with.
        logits: "image" (the paper's y) or "combined" (y + z), the probabilities' logits.
    """

    def __init__(self, network: nn.Module, input_size: int, weighting: str = "softmax", normalize: bool = True,
                 sharpness: float = 5.0, logits: str = "image") -> None:
        super().__init__()
        if logits not in ("image", "combined"):
            raise ValueError(f"logits must be 'image' or 'combined', got {logits!r}")
        self.network = network.eval()
        self.input_size = int(input_size)
        # The proposal pooling's sparse matrix as constants of the graph (aten ops only: torch alone runs it).
        core = getattr(network, "module", network)
        proposals = core.proposals((self.input_size, self.input_size), torch.device("cpu"))
        feature_size = (self.input_size // 4, self.input_size // 4)
        core.proposal_head.pooler.freeze_for_export(proposals, feature_size, (self.input_size, self.input_size))
        self.weighting, self.normalize, self.sharpness, self.logits = weighting, bool(normalize), float(sharpness), logits

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        output = getattr(self.network, "outputs", self.network)(images, with_detection=True)
        chosen = output.image_logits if self.logits == "image" else output.combined_logits
        maps = rpsal_maps(
            output.saliency_logits.float(), output.proposal_logits.float(), output.refined_boxes.float(),
            (images.shape[-2], images.shape[-1]), self.weighting, self.normalize, self.sharpness,
        )
        return torch.sigmoid(chosen.float()), maps["sal"], maps["det"], maps["mix"]


def _example(input_size: int, batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(0)),)


def export_program(model: RpSalMapsModel, max_batch: int = 64) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` at its input size, batch dimension dynamic in [1, max_batch]."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        return torch.export.export(model.eval(), _example(model.input_size), dynamic_shapes={"images": {0: batch}})


def _extra_files(metadata_file: str | os.PathLike | None, config_file: str | os.PathLike | None) -> dict:
    extra = {}
    if metadata_file is not None:
        extra["metadata.json"] = Path(metadata_file).read_text(encoding="utf-8")
    if config_file is not None:
        from monai.bundle import ConfigParser  # export time only: the bundle's tools are at hand

        extra["inference.json"] = json.dumps(ConfigParser.load_config_file(str(config_file)))
    return extra


def export_pt2(model: RpSalMapsModel, path: str | os.PathLike,
               metadata_file: str | os.PathLike | None = None,
               config_file: str | os.PathLike | None = None) -> Path:
    """Write ``model`` as a ``torch.export`` program (``.pt2``); ``metadata.json`` and the inference config
    travel inside it (``torch.export.load(path, extra_files={"metadata.json": "", "inference.json": ""})``)."""
    program = export_program(model)
    path = Path(path)
    torch.export.save(program, str(path), extra_files=_extra_files(metadata_file, config_file))
    return path


def export_onnx(model: RpSalMapsModel, path: str | os.PathLike,
                metadata_file: str | os.PathLike | None = None,
                config_file: str | os.PathLike | None = None, opset: int = 18) -> Path:
    """Write ``model`` as ONNX through the ``torch.export`` program (``dynamo=True``; needs ``onnxscript``),
    batch size dynamic; the metadata and inference config as the model's ``metadata_props``."""
    import onnx

    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=64)
    # ONNX has RoIAlign as an operator: the pooling takes it instead of the frozen matrix, whose embedding_bag
    # onnxscript writes as a loop (measured 60x slower on onnxruntime, docs/benchmarks.md).
    pooler = getattr(model.network, "module", model.network).proposal_head.pooler
    frozen, pooler.export_sizes = pooler.export_sizes, None
    try:
        with torch.no_grad():
            torch.onnx.export(model.eval(), _example(model.input_size), str(path), dynamo=True,
                              opset_version=opset, input_names=["images"], output_names=list(OUTPUT_NAMES),
                              dynamic_shapes={"images": {0: batch}}, external_data=False)
    finally:
        pooler.export_sizes = frozen
    proto = onnx.load(str(path))
    for key, value in _extra_files(metadata_file, config_file).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path


def load_network(config_files: str | Sequence[str], checkpoint: str | os.PathLike, overrides: dict | None = None):
    """The inference config's ``network`` with the checkpoint's weights, and the config's thresholds."""
    from monai.bundle import ConfigParser

    from custom.weights_file import load_checkpoint

    parser = ConfigParser()
    parser.read_config(config_files)
    parser["device"] = "$torch.device('cpu')"
    for key, value in (overrides or {}).items():
        parser[key] = value
    network = load_checkpoint(parser.get_parsed_content("network"), checkpoint, "cpu")
    return network, parser.get_parsed_content("thresholds"), int(parser.get_parsed_content("image_size"))
