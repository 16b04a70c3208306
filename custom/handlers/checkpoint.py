"""Checkpoints that hold everything needed to continue a run, written atomically, and resumed on rerun.

A checkpoint file holds only tensors and plain containers, so it loads with ``torch.load(weights_only=True)``:
network, optimiser (and scheduler) state, the trainer's epoch/iteration counters, the training stage and
temperature (derived from the counters, stored for readers), any extra objects with a ``state_dict`` (e.g.
the best-metric tracker) and the random number generators' states.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atomic_file import atomic_output, leftover_temporaries
from ..weights_file import CheckpointFileError, load_weights_file
from .stages import unwrap

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or (
        torch.distributed.get_rank() == 0
    )


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path`` (flushed to disk), then rename: a reader never sees
    half a file. A process killed mid-write leaves ``.<name>.<pid>.tmp``; the next run's checkpoint handler
    removes it (``remove_stale_temporary_files``)."""
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())


# The temporary name checkpoints had before they went through atomic_output: "<name>.pt.tmp-<pid>".
_OLD_TEMPORARY_CHECKPOINT = re.compile(r"^.+\.pt\.tmp-(?P<pid>\d+)$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_temporary_files(folder: str) -> list[str]:
    """Remove the temporary checkpoint files that killed processes left in ``folder``.

    Only names the checkpoint writer makes are touched, and only when the process that wrote them is gone
    (on this host), so a write in progress is never disturbed. Returns the names removed.
    """
    candidates = leftover_temporaries(folder, "*.pt")
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            old = _OLD_TEMPORARY_CHECKPOINT.match(name)
            if old:
                candidates.append((Path(folder) / name, int(old.group("pid"))))
    removed = []
    for path, pid in candidates:
        if pid == os.getpid() or _process_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        removed.append(path.name)
    return removed


def _plain(value):
    """A JSON-able, run-independent description of a config value (no object addresses)."""
    if isinstance(value, torch.nn.Module):
        return repr(value)
    if isinstance(value, torch.optim.Optimizer):
        return {
            "optimizer": type(value).__name__,
            "groups": [
                {**{k: _plain(v) for k, v in group.items() if k != "params"}, "parameters": len(group["params"])}
                for group in value.param_groups
            ],
        }
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return value.tolist()
    text = str(value)
    return type(value).__name__ if " at 0x" in text else text


def run_signature_text(signature: Mapping) -> str:
    """The canonical text of a run signature (what defines a training run: network, optimiser, loss, stages,
    data, seed); its SHA-256 goes into every checkpoint."""
    return json.dumps(_plain(signature), sort_keys=True)


def _text_tensor(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def _tensor_text(tensor: torch.Tensor) -> str:
    return bytes(tensor.tolist()).decode("utf-8")


def rng_state() -> dict[str, torch.Tensor]:
    """The states of Python's, NumPy's and torch's generators, as tensors."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_extra": torch.tensor([position, has_gauss, cached_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Restore the generators saved by ``rng_state``."""
    gauss = float(state["python_gauss"][0])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if np.isnan(gauss) else gauss))
    position, has_gauss, cached_gauss = state["numpy_extra"].tolist()
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(position), int(has_gauss), cached_gauss)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


class TrainingCheckpoint:
    """Saves ``<ckpt_dir>/last.pt`` after every epoch (and every ``every_n_iterations``, if > 0); on start,
    if ``resume`` and that file exists, restores everything from it so the run continues where it stopped.

    Only the main process writes; every process reads. A NaN guard attached before this handler keeps a bad
    state from ever being saved.

    Args:
        ckpt_dir: folder of the checkpoint.
        network, optimizer, lr_scheduler: the objects whose state is saved (DDP wrappers are unwrapped).
        extra: more objects with ``state_dict``/``load_state_dict`` to keep (e.g. the best-model tracker).
        resume: continue from ``last.pt`` when it exists (the default: rerunning the same command resumes).
        every_n_iterations: also save every n iterations (0: only at the end of each epoch).
        guard: a NonFiniteLossGuard checked before every save.
        run_signature: what defines the run (train.yaml's ``run_signature``: network, optimiser, loss,
            stages, temperature, data, seed). Its text and SHA-256 are saved; resuming from a checkpoint
            written under another signature is refused, naming what differs, unless ``allow_config_change``.
        allow_config_change: continue from a checkpoint of a differently configured run on purpose (e.g. a
            stage-1 model branched into several stage-2 settings); logged.
    """

    def __init__(
        self,
        ckpt_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler=None,
        extra: Mapping[str, object] | None = None,
        resume: bool = True,
        every_n_iterations: int = 0,
        filename: str = "last.pt",
        guard=None,
        run_signature: Mapping | None = None,
        allow_config_change: bool = False,
    ):
        self.path = os.path.join(ckpt_dir, filename)
        self.network = network
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.extra = dict(extra or {})
        self.resume = resume
        self.every_n_iterations = int(every_n_iterations)
        self.guard = guard
        self.signature_text = run_signature_text(run_signature) if run_signature is not None else None
        self.allow_config_change = bool(allow_config_change)

    @property
    def signature_digest(self) -> str | None:
        if self.signature_text is None:
            return None
        return hashlib.sha256(self.signature_text.encode("utf-8")).hexdigest()

    def attach(self, engine: Engine) -> None:
        # STARTED fires before the first EPOCH_STARTED, so the stage schedule sees the resumed counters.
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.every_n_iterations > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_n_iterations), self.save)

    def state(self, engine: Engine) -> dict:
        return {
            "network": unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "trainer": {
                "epoch": torch.tensor(engine.state.epoch),
                "iteration": torch.tensor(engine.state.iteration),
                "epoch_length": torch.tensor(engine.state.epoch_length),
                "stage": torch.tensor(getattr(engine.state, "stage", 0)),
                "temperature": unwrap(self.network).temperature.detach().clone().cpu(),
            },
            "extra": {name: obj.state_dict() for name, obj in self.extra.items()},
            "rng": rng_state(),
            "run_signature": {}
            if self.signature_text is None
            else {"text": _text_tensor(self.signature_text), "sha256": _text_tensor(self.signature_digest)},
        }

    def save(self, engine: Engine) -> None:
        if self.guard is not None:
            self.guard.check(engine)  # never save a state reached through a NaN loss
        if is_main_process():
            atomic_save(self.state(engine), self.path)

    def load(self, engine: Engine) -> None:
        if is_main_process():
            stale = remove_stale_temporary_files(os.path.dirname(os.path.abspath(self.path)))
            if stale:
                logger.info(f"removed {len(stale)} temporary checkpoint file(s) left by a killed run: "
                            f"{', '.join(stale)}")
        if not (self.resume and os.path.isfile(self.path)):
            return
        try:
            checkpoint = load_weights_file(self.path)  # weights_only: runs no code from the file
        except CheckpointFileError as error:
            raise CheckpointFileError(
                f"{error}. To start over, move it away or run with --resume False"
            ) from error
        self.check_signature(checkpoint.get("run_signature") or {})
        unwrap(self.network).load_state_dict(checkpoint["network"])
        saved_groups = [len(group["params"]) for group in checkpoint["optimizer"]["param_groups"]]
        groups = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved_groups != groups and self.allow_config_change:
            # Another grouping (e.g. a branch of the run with its own optimizer_groups): the saved moments
            # cannot be matched to parameters by position, so the optimiser starts afresh.
            logger.warning(f"{self.path}: the optimiser's parameter groups differ (saved {saved_groups}, now "
                           f"{groups}); its state (Adam moments) starts afresh, as allow_config_change allows")
        else:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.lr_scheduler is not None and checkpoint["lr_scheduler"]:
            self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        for name, obj in self.extra.items():
            if name in checkpoint["extra"]:
                obj.load_state_dict(checkpoint["extra"][name])
        trainer = checkpoint["trainer"]
        saved_length = int(trainer["epoch_length"])
        if engine.state.epoch_length and saved_length != engine.state.epoch_length:
            raise RuntimeError(
                f"{self.path}: saved with {saved_length} iterations per epoch, this run has "
                f"{engine.state.epoch_length} (different data or batch size); move the checkpoint away to start over"
            )
        engine.state.iteration = int(trainer["iteration"])
        engine.state.epoch = int(trainer["iteration"]) // saved_length
        set_rng_state(checkpoint["rng"])
        logger.info(
            f"resumed from {self.path}: stage {int(trainer['stage'])}, epoch {engine.state.epoch}, "
            f"iteration {engine.state.iteration}, temperature {float(trainer['temperature']):.4g}"
        )

    def check_signature(self, saved: Mapping[str, torch.Tensor]) -> None:
        """Refuse (RuntimeError) to continue a checkpoint written under a different run signature."""
        if self.signature_text is None:
            return
        if "sha256" not in saved:
            logger.warning(f"{self.path} holds no run signature (written before signatures were kept); "
                           "continuing from it without checking its configuration")
            return
        if _tensor_text(saved["sha256"]) == self.signature_digest:
            return
        old, new = json.loads(_tensor_text(saved["text"])), json.loads(self.signature_text)
        differ = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
        if self.allow_config_change:
            logger.warning(f"continuing from {self.path}, written under another configuration (differs in: "
                           f"{', '.join(differ)}), as allow_config_change asks")
            return
        raise RuntimeError(
            f"{self.path} was written by a run with a different configuration (differs in: {', '.join(differ)}); "
            "resuming would silently continue another run. Use another ckpt_dir, move the checkpoint away or "
            "run with --resume False to start over, or --allow_config_change True to continue from it on purpose"
        )
