"""What each training stage may change: frozen parameters stay bit-identical, the BatchNorm policy declared in
train.yaml holds, and resume refuses a checkpoint of a differently configured run."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.bundle import ConfigParser

from conftest import TRAIN_CONFIGS, REPO_ROOT, write_overrides
from custom.handlers.stages import parameter_groups


def stage2_trainer(tmp_path, phantom, **extra):
    """train.yaml + demo.yaml on the tiny phantom, running only stage 2 (one epoch) in this process."""
    overrides = write_overrides(tmp_path, phantom, epochs=(0, 1, 0), num_workers=0, **extra)
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / c) for c in TRAIN_CONFIGS] + [str(overrides)])
    torch.manual_seed(0)
    trainer = parser.get_parsed_content("train#trainer")
    return parser, trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {name for name, value in module.state_dict().items() if not torch.equal(before[name], value)}


def is_batchnorm_entry(module: torch.nn.Module, name: str) -> bool:
    owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
    return isinstance(owner, torch.nn.modules.batchnorm._BatchNorm)


def test_stage_2_leaves_frozen_parameters_and_their_batchnorm_statistics_bit_identical(tmp_path, tiny_phantom):
    parser, trainer = stage2_trainer(tmp_path, tiny_phantom)
    assert parser.get_parsed_content("optimizer").defaults["weight_decay"] > 0  # decay is on
    groups = parameter_groups(trainer.network)
    frozen = {name: groups[name] for name in ("backbone", "classification_heads")}
    before = {name: snapshot(module) for name, module in frozen.items()}
    head_before = snapshot(groups["proposal_head"])
    trainer.run()
    assert trainer.state.iteration > 5
    for name, module in frozen.items():
        # weights, BN affine parameters AND running statistics: nothing moves (AdamW's decoupled weight
        # decay used to move frozen weights whose gradients were zeroed instead of None)
        assert changed(before[name], module) == set(), name
    assert changed(head_before, groups["proposal_head"]), "the proposal head did not train"


def test_stage_2_batchnorm_policy_from_the_config(tmp_path, tiny_phantom):
    # The authors' stage 2: the backbone's BatchNorm affine parameters train and its statistics update.
    _, trainer = stage2_trainer(
        tmp_path, tiny_phantom, backbone_stage2="batchnorm", classification_statistics_stage2="update"
    )
    backbone = parameter_groups(trainer.network)["backbone"]
    before = snapshot(backbone)
    trainer.run()
    moved = changed(before, backbone)
    assert moved and all(is_batchnorm_entry(backbone, name) for name in moved)
    assert any(name.endswith("running_mean") for name in moved)
    assert any(name.endswith(".weight") for name in moved)  # BN affine
    assert not any("conv" in name for name in moved)


def test_resume_refuses_a_checkpoint_written_under_another_configuration(tmp_path, tiny_phantom, caplog):
    _, trainer = stage2_trainer(tmp_path, tiny_phantom)
    trainer.run()
    assert (tmp_path / "models" / "last.pt").exists()
    _, other = stage2_trainer(tmp_path, tiny_phantom, mil_weight=0.5)
    with pytest.raises(RuntimeError, match=r"different configuration \(differs in: loss\).*--resume False"):
        other.run()
    # the same configuration resumes (and finds its one epoch done); on purpose, another one continues too
    _, same = stage2_trainer(tmp_path, tiny_phantom)
    same.run()
    _, allowed = stage2_trainer(tmp_path, tiny_phantom, mil_weight=0.5, allow_config_change=True)
    with caplog.at_level(logging.WARNING):
        allowed.run()
    assert "written under another configuration (differs in: loss)" in caplog.text
    # another optimiser grouping (a branch with its own optimizer_groups) continues with fresh Adam moments
    _, regrouped = stage2_trainer(tmp_path, tiny_phantom, allow_config_change=True,
                                  optimizer_groups={"proposal_head": {"lr_scale": 10.0}})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        regrouped.run()
    assert "parameter groups differ" in caplog.text and "starts afresh" in caplog.text
