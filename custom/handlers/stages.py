"""The paper's three training stages on one Ignite trainer, and the Gumbel temperature schedule.

One trainer runs ``sum(stage epochs)`` epochs; at the start of each epoch this handler derives the stage from
the epoch number and configures the network, loss and optimiser for it. Because the stage and the temperature
are functions of the epoch and iteration counters, a run resumed from a checkpoint lands in the same stage
with the same temperature.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

from ignite.engine import Engine, Events
from torch import nn

logger = logging.getLogger(__name__)

TRAIN_MODES = ("all", "batchnorm", "none")
BATCHNORM_STATISTICS = ("update", "frozen")


def unwrap(network: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers."""
    return network.module if hasattr(network, "module") and isinstance(network.module, nn.Module) else network


def parameter_groups(network: nn.Module) -> dict[str, nn.Module]:
    """The parts of RpSalNet a stage trains or freezes, by name."""
    net = unwrap(network)
    return {
        "backbone": net.fpn.features,
        "classification_heads": nn.ModuleList([net.fpn.lateral, net.saliency_head, net.lse_pooling]),
        "proposal_head": net.proposal_head,
        "crop_body": net.crop_classifier.body,
        "crop_heads": nn.ParameterList([net.crop_classifier.head_weight, net.crop_classifier.head_bias]),
    }


def set_trainable(module: nn.Module, mode: str) -> None:
    """``all``: every parameter trains; ``batchnorm``: only BatchNorm affine parameters; ``none``: frozen."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train mode must be one of {TRAIN_MODES}, got {mode!r}")
    for parameter in module.parameters():
        parameter.requires_grad_(mode == "all")
    if mode == "batchnorm":
        for child in module.modules():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                for parameter in child.parameters():
                    parameter.requires_grad_(True)


def optimizer_parameter_groups(network: nn.Module, settings: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Parameter groups for the optimiser: one per group of ``parameter_groups`` named in ``settings`` (with
    those settings, e.g. ``{"proposal_head": {"lr_scale": 0.1, "eps": 0.1}}``), the rest in one default group.

    ``lr_scale`` multiplies each stage's lr (``StageSchedule`` keeps it); other keys are the optimiser's own
    (eps, weight_decay, betas, ...). Every parameter is in exactly one group.
    """
    settings = dict(settings or {})
    groups = parameter_groups(network)
    unknown = set(settings) - set(groups)
    if unknown:
        raise ValueError(f"optimiser settings name unknown parameter groups {sorted(unknown)}; known: {sorted(groups)}")
    claimed: set[int] = set()
    result = []
    for name, options in settings.items():
        params = [p for p in groups[name].parameters() if id(p) not in claimed]
        claimed.update(id(p) for p in params)
        result.append({"params": params, "name": name, **dict(options)})
    rest = [p for p in unwrap(network).parameters() if id(p) not in claimed]
    return [{"params": rest, "name": "default"}, *result]


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    return [child for child in module.modules() if isinstance(child, nn.modules.batchnorm._BatchNorm)]


def keep_batchnorm_statistics(network: nn.Module, layers: Sequence[nn.Module]):
    """Make ``layers`` (BatchNorm) normalise with, and keep, their running statistics while the network
    trains: the trainer calls ``network.train()`` every iteration, so a forward pre-hook on the network sets
    them back to evaluation behaviour before each forward (also where a layer is applied functionally, as the
    saliency head's tiled BN is). Returns the hook handle (``remove()`` undoes it), or None for no layers."""
    layers = list(layers)
    if not layers:
        return None

    def set_layers_to_eval(_module, _inputs) -> None:
        for layer in layers:
            layer.training = False

    return unwrap(network).register_forward_pre_hook(set_layers_to_eval)


class StageSchedule:
    """Configures each epoch for its training stage and anneals the Gumbel-Softmax temperature.

    Args:
        network: RpSalNet (or a DDP wrapper of it).
        optimizer: one optimiser over all parameters; frozen ones get no gradient and are skipped.
        loss: RpSalLoss (its ``set_stage`` is called).
        stages: one mapping per stage, in order: ``epochs``, ``lr``, ``detection`` (run the detection
            module), ``train`` ({group: "all" | "batchnorm" | "none"} for the groups of ``parameter_groups``;
            groups not named are frozen), and optionally ``batchnorm_statistics`` ({group: "update" |
            "frozen"}; groups not named update their running statistics in train mode, as PyTorch does).
            Each optimiser parameter group's lr is the stage lr times the group's ``lr_scale`` (default 1).
        temperature_start, temperature_end: the temperature is annealed exponentially from start to end,
            per iteration, over the stages listed in ``anneal_stages`` (paper: 1 -> 0.001 over stages 2 and 3).
        reset_optimizer_state: clear Adam's moments when a new stage starts (each stage is a new optimisation
            problem; the authors' fastai code built a new optimiser per stage).
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer,
        loss,
        stages: Sequence[Mapping],
        temperature_start: float = 1.0,
        temperature_end: float = 1e-3,
        anneal_stages: Sequence[int] = (2, 3),
        reset_optimizer_state: bool = True,
    ):
        if not stages:
            raise ValueError("at least one training stage is needed")
        for number, stage in enumerate(stages, start=1):
            missing = {"epochs", "lr", "detection", "train"} - set(stage)
            if missing:
                raise ValueError(f"training stage {number} lacks {sorted(missing)}")
        self.network = network
        self.optimizer = optimizer
        self.loss = loss
        self.stages = [dict(stage) for stage in stages]
        self.temperature_start = temperature_start
        self.temperature_end = temperature_end
        self.anneal_stages = tuple(anneal_stages)
        self.reset_optimizer_state = reset_optimizer_state
        self.engine: Engine | None = None  # the trainer, once attached (read by the validation handlers)
        self._statistics_hook = None
        self.first_epochs = []  # first epoch (1-based) of each stage
        epoch = 1
        for stage in self.stages:
            self.first_epochs.append(epoch)
            epoch += int(stage["epochs"])
        self.max_epochs = epoch - 1

    def stage_of_epoch(self, epoch: int) -> int:
        """Stage number (1-based) of a 1-based epoch; epochs past the end belong to the last stage."""
        stage = 1
        for number, first in enumerate(self.first_epochs, start=1):
            if epoch >= first and int(self.stages[number - 1]["epochs"]) > 0:
                stage = number
        return stage

    def temperature_at(self, iteration: int, epoch_length: int) -> float:
        """Temperature after ``iteration`` completed iterations (exponential from start to end)."""
        annealed = [n for n in self.anneal_stages if 1 <= n <= len(self.stages)]
        if not annealed:
            return self.temperature_start
        start = (self.first_epochs[min(annealed) - 1] - 1) * epoch_length
        span = sum(int(self.stages[n - 1]["epochs"]) for n in annealed) * epoch_length
        progress = min(max((iteration - start) / span, 0.0), 1.0) if span > 0 else 0.0
        return self.temperature_start * math.exp(progress * math.log(self.temperature_end / self.temperature_start))

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        engine.add_event_handler(Events.EPOCH_STARTED, self.start_epoch)
        engine.add_event_handler(Events.ITERATION_STARTED, self.update_temperature)

    def start_epoch(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        number = self.stage_of_epoch(epoch)
        stage = self.stages[number - 1]
        entering = epoch == self.first_epochs[number - 1] and engine.state.iteration == (epoch - 1) * (
            engine.state.epoch_length or 0
        )
        groups = parameter_groups(self.network)
        unknown = set(stage["train"]) - set(groups)
        if unknown:
            raise ValueError(f"training stage {number} names unknown parameter groups {sorted(unknown)}")
        statistics = dict(stage.get("batchnorm_statistics") or {})
        unknown = set(statistics) - set(groups)
        if unknown:
            raise ValueError(f"training stage {number} names unknown batchnorm groups {sorted(unknown)}")
        for name, module in groups.items():
            set_trainable(module, stage["train"].get(name, "none"))
        for name, policy in statistics.items():
            if policy not in BATCHNORM_STATISTICS:
                raise ValueError(f"training stage {number}: batchnorm statistics of {name} must be one of "
                                 f"{BATCHNORM_STATISTICS}, got {policy!r}")
        if self._statistics_hook is not None:
            self._statistics_hook.remove()
        self._statistics_hook = keep_batchnorm_statistics(
            self.network,
            [layer for name, policy in statistics.items() if policy == "frozen" for layer in batchnorm_layers(groups[name])],
        )
        unwrap(self.network).with_detection = bool(stage["detection"])
        self.loss.set_stage(number)
        for group in self.optimizer.param_groups:
            group["lr"] = float(stage["lr"]) * float(group.get("lr_scale", 1.0))
        if entering and self.reset_optimizer_state and number > 1:
            self.optimizer.state.clear()
        engine.state.stage = number
        if entering:
            logger.info(f"training stage {number} ({stage.get('name', number)}) starts at epoch {epoch}")

    def update_temperature(self, engine: Engine) -> None:
        # ITERATION_STARTED fires after the counter moved on: iteration - 1 iterations are complete.
        temperature = self.temperature_at(engine.state.iteration - 1, engine.state.epoch_length)
        unwrap(self.network).temperature.fill_(temperature)
        engine.state.temperature = temperature
