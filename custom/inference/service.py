"""The declared inference path built once and applied per image, for long-running processes (a DICOM node, a
notebook, a web service): ``FindingsService.from_config`` instantiates the bundle config's ``preprocessing``,
``network`` (with its checkpoint), ``inferer`` and ``postprocessing`` once; calling the service on a file runs
exactly what ``inference.yaml``'s evaluator runs on it and returns the findings document.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import torch

from custom.weights_file import load_checkpoint


class FindingsService:
    """One image in, its findings document out.

    Args:
        preprocessing, network, inferer, postprocessing: the config's components (network in eval mode, its
            weights loaded); device: the network's device.
    """

    def __init__(self, preprocessing: Callable, network: torch.nn.Module, inferer: Callable,
                 postprocessing: Callable, device=None) -> None:
        self.preprocessing = preprocessing
        self.network = network.eval()
        self.inferer = inferer
        self.postprocessing = postprocessing
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.parser = None

    @classmethod
    def from_config(cls, config_files: str | Sequence[str], overrides: Mapping | None = None) -> "FindingsService":
        """Build from ``configs/inference.yaml`` (and files merged on it) with ``overrides`` (config id -> value)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(config_files)
        for key, value in (overrides or {}).items():
            parser[key] = value
        device = parser.get_parsed_content("device")
        network = parser.get_parsed_content("network")
        load_checkpoint(network, parser.get_parsed_content("checkpoint"), device)
        service = cls(parser.get_parsed_content("preprocessing"), network, parser.get_parsed_content("inferer"),
                      parser.get_parsed_content("postprocessing"), device)
        service.parser = parser  # the rest of the config (version, DICOM settings) for the service's user
        return service

    def process(self, image: str | os.PathLike | Mapping) -> dict:
        """The whole data dict of one image after postprocessing (``findings``, ``maps``, ``probabilities`` ...).

        Raises the loader's ImageLoadError (naming the file) for an unreadable input.
        """
        data = dict(image) if isinstance(image, Mapping) else {"image": str(image)}
        data.setdefault("image_path", str(data["image"]))
        data = self.preprocessing(data)
        batch = torch.as_tensor(data["image"])[None].to(self.device)
        outputs = self.inferer(batch, self.network)
        data["pred"] = {name: value[0] for name, value in outputs.items()}
        return self.postprocessing(data)

    def __call__(self, image: str | os.PathLike | Mapping) -> dict:
        """The findings document of one image (``custom.inference.findings``)."""
        return self.process(image)["findings"]
