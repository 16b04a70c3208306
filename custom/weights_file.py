"""Reading this bundle's ``.pt`` files (checkpoints, weights, evaluation outputs) without running any code
from them.

Every such file holds tensors and plain containers only, so it is read with ``torch.load(weights_only=True)``;
a file that holds any other pickled object (a class, a function call such as ``os.system``) is refused, and
nothing of it is executed. The error names the file and says what was found; unlike torch's own message, it
does not suggest ``weights_only=False``.
"""

from __future__ import annotations

import os
import pickle
import re

import torch

_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\s+Please use|\n\n|$)", re.DOTALL)


class CheckpointFileError(RuntimeError):
    """A ``.pt`` file that cannot be loaded safely: it holds objects other than tensors, or is corrupt."""


def load_weights_file(path: str | os.PathLike, map_location="cpu"):
    """``torch.load(path, map_location, weights_only=True)``, with errors that name the file.

    Returns:
        What the file holds (tensors in dicts / lists / tuples, numbers, strings).

    Raises:
        FileNotFoundError: no such file.
        CheckpointFileError: the file holds pickled objects other than tensors and plain containers (refused
            before any of them is built), or it is not a readable PyTorch file (truncated, corrupt).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = _UNPICKLER_DETAIL.search(str(error))
        detail = " ".join(found.group(1).split()) if found else str(error).splitlines()[0]
        raise CheckpointFileError(
            f"{path}: refused: the file holds objects other than tensors and plain containers ({detail}). "
            "It is read with torch.load(weights_only=True), which runs no code from the file; use "
            "checkpoints written by this bundle's training, from a source you trust"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointFileError(
            f"{path}: cannot be read as a PyTorch file (truncated or corrupt?): {str(error).splitlines()[0]}"
        ) from error


def load_checkpoint(network: torch.nn.Module, path: str | os.PathLike, device=None) -> torch.nn.Module:
    """Load an RpSalNet state dict (``model.pt`` of training) into ``network`` and put it in eval mode.

    Raises FileNotFoundError / RuntimeError naming the file when it is missing or does not fit the network
    (e.g. the network sizes in the config differ from the trained ones), and CheckpointFileError (a
    RuntimeError) when it holds pickled objects other than tensors (refused, never run) or is corrupt.
    Returns the network.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: model checkpoint not found (train first, or set ckpt_path)")
    state = load_weights_file(path, map_location=device or "cpu")  # weights_only: runs no code from the file
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(
            f"{path}: the checkpoint does not fit the configured network (are the network "
            f"sizes those it was trained with? the demo's are in configs/demo_network.yaml): {str(error)[:600]}"
        ) from error
    return network.eval()
