"""Backbone constructors and loading of ImageNet weights from local torchvision state-dict files.

Nothing is downloaded: the user names a local file (for example torchvision's ``densenet121-a639ec97.pth``
or ``resnet34-b627a593.pth``). Old torchvision DenseNet files name layers ``norm.1`` instead of ``norm1``;
those keys are renamed on load. A missing file or any key mismatch is a clear error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import nn
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, ResNet

from ..weights_file import CheckpointFileError, load_weights_file

# DenseNet variants: torchvision's DenseNet-121 (the paper's) and a small one for tests and CPU demos.
DENSENET_PRESETS: dict[str, dict] = {
    "densenet121": {"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64},
    "densenet_small": {"growth_rate": 12, "block_config": (2, 3, 4, 3), "num_init_features": 32},
}

# ResNet variants of BasicBlock: ResNet-34 (the paper's crop classifier) and smaller ones for tests and demos.
RESNET_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "resnet34": (3, 4, 6, 3),
    "resnet18": (2, 2, 2, 2),
    "resnet10": (1, 1, 1, 1),
}

# torchvision's DenseNet checkpoints from before 0.3 spell 'denselayer1.norm.1.weight' for 'norm1.weight'.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


class PretrainedWeightsError(RuntimeError):
    """A local ImageNet weight file is missing, unreadable, or does not fit the network."""


def replace_relu(module: nn.Module, negative_slope: float) -> nn.Module:
    """Replace every ``nn.ReLU`` inside ``module`` by ``nn.LeakyReLU(negative_slope)`` (in place).

    The paper replaces all ReLU activations of the ImageNet backbone with LeakyReLU(0.1).
    """
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.LeakyReLU(negative_slope, inplace=child.inplace))
        else:
            replace_relu(child, negative_slope)
    return module


def build_densenet_features(name: str = "densenet121", leaky_slope: float | None = 0.1) -> nn.Sequential:
    """Return the ``features`` module of a torchvision DenseNet preset (see ``DENSENET_PRESETS``).

    Layers: conv0, norm0, relu0, pool0, denseblock1, transition1, ..., denseblock4, norm5.
    """
    if name not in DENSENET_PRESETS:
        raise ValueError(f"unknown DenseNet preset {name!r}; choose one of {sorted(DENSENET_PRESETS)}")
    features = DenseNet(**DENSENET_PRESETS[name]).features
    if leaky_slope is not None:
        replace_relu(features, leaky_slope)
    return features


def build_resnet_body(name: str = "resnet34") -> ResNet:
    """Return a torchvision BasicBlock ResNet preset with its ``fc`` layer replaced by identity.

    Input (B, 3, H, W) -> output (B, 512) after global average pooling.
    """
    if name not in RESNET_PRESETS:
        raise ValueError(f"unknown ResNet preset {name!r}; choose one of {sorted(RESNET_PRESETS)}")
    body = ResNet(BasicBlock, list(RESNET_PRESETS[name]))
    body.fc = nn.Identity()
    return body


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a local file with ``weights_only=True`` (no code from the file is run)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"{path}: weight file not found (ImageNet weights are read from local files)")
    try:
        state = load_weights_file(path)
    except CheckpointFileError as error:  # pickled objects refused, or a truncated/corrupt file
        reason = str(error).removeprefix(f"{path}: ")
        raise PretrainedWeightsError(f"{path}: not a readable PyTorch weight file ({reason})") from error
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise PretrainedWeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def load_torchvision_weights(
    module: nn.Module, path: str | os.PathLike, prefix: str, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load the entries of a torchvision state-dict file that start with ``prefix`` into ``module``.

    Args:
        module: the network part to fill (e.g. DenseNet ``features`` or a ResNet body).
        path: local file saved by torchvision (``torch.save(model.state_dict())``).
        prefix: key prefix of that part in the file (``"features."`` for DenseNet, ``""`` for ResNet).
        ignore_prefixes: keys of the file to leave out (e.g. the ImageNet classifier ``"fc."``).

    Raises:
        PretrainedWeightsError: the file is missing or unreadable, keys are missing or unexpected, or a shape
            differs; the message names the file and the first offending keys.
    """
    state = read_state_dict(path)
    selected = {}
    for key, value in state.items():
        key = _OLD_DENSENET_KEY.sub(r"\1\2", key)
        if key.startswith(ignore_prefixes) or not key.startswith(prefix):
            continue
        selected[key[len(prefix) :]] = value
    own = module.state_dict()
    # torchvision's ImageNet files predate BatchNorm's num_batches_tracked counter: keep the module's own.
    for key in own:
        if key.endswith("num_batches_tracked") and key not in selected:
            selected[key] = own[key]
    missing = sorted(set(own) - set(selected))
    unexpected = sorted(set(selected) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(selected) if own[k].shape != selected[k].shape)
    if missing or unexpected or wrong_shape:
        raise PretrainedWeightsError(
            f"{os.fspath(path)}: weights do not fit the network: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} of another shape (e.g. {wrong_shape[:3]})"
        )
    module.load_state_dict(selected)
