"""Per-epoch records of training: best model per stage, a metrics log (CSV + JSON lines), NaN guard."""

from __future__ import annotations

import csv
import json
import logging
import math
import os

import torch
from ignite.engine import Engine, Events

from ..labels import CLASS_NAMES
from .checkpoint import atomic_save, is_main_process
from .stages import unwrap

logger = logging.getLogger(__name__)


class StageBestModel:
    """Keeps the best network weights of each stage by a validation metric (higher is better).

    Attach to the validation evaluator; the training stage is read from the trainer through ``schedule``
    (the StageSchedule attached to it). Writes ``<ckpt_dir>/best_stage<N>.pt`` (weights only) when the
    metric improves within stage N, and ``<ckpt_dir>/<final_name>`` (``model.pt``, the bundle's model)
    alongside whenever that stage is the latest one seen: at the end of training it holds the last stage's
    best. Its state (best value per stage) is saved in the training checkpoint so a resumed run keeps
    comparing against the right values.
    """

    def __init__(self, schedule, network: torch.nn.Module, ckpt_dir: str, metric_name: str,
                 final_name: str = "model.pt"):
        self.schedule = schedule
        self.network = network
        self.ckpt_dir = ckpt_dir
        self.metric_name = metric_name
        self.final_name = final_name
        self.best: dict[int, float] = {}

    def state_dict(self) -> dict:
        stages = sorted(self.best)
        return {"stages": torch.tensor(stages, dtype=torch.int64),
                "values": torch.tensor([self.best[s] for s in stages], dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        self.best = {int(s): float(v) for s, v in zip(state["stages"].tolist(), state["values"].tolist())}

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.COMPLETED, self.update)

    def path(self, stage: int) -> str:
        return os.path.join(self.ckpt_dir, f"best_stage{stage}.pt")

    def update(self, evaluator: Engine) -> None:
        trainer = self.schedule.engine
        stage = int(getattr(trainer.state, "stage", 1)) if trainer is not None else 1
        value = float(evaluator.state.metrics.get(self.metric_name, float("nan")))
        if math.isnan(value) or value <= self.best.get(stage, -math.inf):
            return
        self.best[stage] = value
        if is_main_process():
            weights = unwrap(self.network).state_dict()
            atomic_save(weights, self.path(stage))
            if stage >= max(self.best):
                atomic_save(weights, os.path.join(self.ckpt_dir, self.final_name))
        epoch = trainer.state.epoch if trainer is not None else "?"
        logger.info(f"stage {stage}: best {self.metric_name} {value:.4f} at epoch {epoch}")


class MetricsLog:
    """Appends one row per evaluation to ``<log_dir>/<filename>.csv`` and ``.jsonl``; also TensorBoard
    scalars when ``torch.utils.tensorboard`` is importable. Logs the per-class AUC at INFO level.

    Attach to the validation evaluator; the trainer's counters are read through ``schedule`` (the
    StageSchedule attached to the trainer); ``auc_metrics`` are the MultiLabelAUC objects whose ``per_class``
    values are logged, by metric name.
    """

    def __init__(self, schedule, log_dir: str, auc_metrics: dict | None = None, class_names=CLASS_NAMES,
                 filename: str = "metrics"):
        self.schedule = schedule
        self.filename = filename
        self.log_dir = log_dir
        self.auc_metrics = dict(auc_metrics or {})
        self.class_names = tuple(class_names)
        self._writer = None

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.COMPLETED, self.write)

    def _tensorboard(self):
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                self._writer = False
            else:
                self._writer = SummaryWriter(self.log_dir)
        return self._writer

    def write(self, evaluator: Engine) -> None:
        trainer = self.schedule.engine  # None when evaluating without training (the `testing` entry point)
        state = trainer.state if trainer is not None else None
        output = state.output if state is not None else None
        loss = output.get("loss") if isinstance(output, dict) else None
        row = {
            "stage": int(getattr(state, "stage", 0)),
            "epoch": state.epoch if state is not None else 0,
            "iteration": state.iteration if state is not None else 0,
            "temperature": float(getattr(state, "temperature", float("nan"))),
            "train_loss": float(loss) if loss is not None else float("nan"),
        }
        row.update({name: float(value) for name, value in evaluator.state.metrics.items()
                    if isinstance(value, (int, float))})
        for name, metric in self.auc_metrics.items():
            row[f"{name}_samples"] = metric.num_samples
            if metric.per_class:
                row.update({f"{name}/{c}": v for c, v in zip(self.class_names, metric.per_class)})
                logger.info(f"epoch {row['epoch']} {name} per class: " + ", ".join(
                    f"{c} {v:.3f}" for c, v in zip(self.class_names, metric.per_class)))
        if not is_main_process():
            return
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, f"{self.filename}.jsonl"), "a") as handle:
            handle.write(json.dumps(row) + "\n")
        csv_path = os.path.join(self.log_dir, f"{self.filename}.csv")
        new = not os.path.exists(csv_path)
        with open(csv_path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row), extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        tensorboard = self._tensorboard() if self.filename == "metrics" else None
        if tensorboard:
            for key, value in row.items():
                if key not in ("stage", "epoch", "iteration") and not math.isnan(value):
                    tensorboard.add_scalar(key, value, row["iteration"])
            tensorboard.flush()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard:
    """Stops training with a clear error when the loss is NaN or infinite.

    Each iteration only accumulates a flag on the device (no host-device synchronisation); the flag is read
    every ``check_every`` iterations and at the end of each epoch, BEFORE the checkpoint handler saves, so
    the last saved checkpoint is always one from before the fault. TrainingCheckpoint calls ``check`` before
    each save too, so the order of attaching does not matter.
    """

    def __init__(self, check_every: int = 10):
        self.check_every = max(1, int(check_every))
        self._bad = None
        self._first_bad_iteration = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every), self.check)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.check)

    def accumulate(self, engine: Engine) -> None:
        loss = engine.state.output["loss"] if isinstance(engine.state.output, dict) else engine.state.output
        bad = ~torch.isfinite(torch.as_tensor(loss).detach())
        self._bad = bad if self._bad is None else self._bad | bad

    def check(self, engine: Engine) -> None:
        if self._bad is not None and bool(self._bad):
            state = engine.state
            raise NonFiniteLossError(
                f"non-finite training loss in stage {getattr(state, 'stage', '?')}, epoch {state.epoch}, at or "
                f"before iteration {state.iteration} (checked every {self.check_every} iterations); the last "
                "checkpoint saved before this point is kept. Lower the learning rate or check the data."
            )
        self._bad = None
