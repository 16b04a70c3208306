"""Tests of the RpSal network modules (custom/networks)."""

from __future__ import annotations

import re

import pytest
import torch
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import BasicBlock, ResNet

from custom.networks.backbones import DENSENET_PRESETS, PretrainedWeightsError
from custom.networks.box_coder import BoxCoder, clip_boxes
from custom.networks.crop import BoxCrop
from custom.networks.gumbel_selection import GumbelProposalSelector, select_boxes, straight_through_gumbel_softmax
from custom.networks.lse_pooling import LSEPooling
from custom.networks.proposals import ProposalGrid, make_proposals
from custom.networks.rpsal import RpSalNet, RpSalProbabilities

TINY = dict(
    backbone="densenet_small",
    crop_backbone="resnet10",
    fpn_channels=32,
    class_channels=16,
    head_channels=8,
    crop_size=16,
)


def tiny_net(**overrides) -> RpSalNet:
    torch.manual_seed(0)
    return RpSalNet(**{**TINY, **overrides})


# ---- proposals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [64, 128, 256, 512, 1024])
def test_proposal_count_is_395_at_every_size(side):
    boxes = make_proposals((side, side))
    assert boxes.shape == (395, 4)
    assert ProposalGrid().num_proposals == 395


def test_proposal_geometry_at_512():
    boxes = make_proposals((512, 512))
    levels = [boxes[:289], boxes[289:370], boxes[370:]]
    # Inside the image every box is within [0, 512].
    assert boxes.min() >= 0 and boxes.max() <= 512
    # Unclipped (interior) boxes are squares of 64, 128 and 256 px.
    for level, size in zip(levels, (64, 128, 256)):
        w, h = level[:, 2] - level[:, 0], level[:, 3] - level[:, 1]
        interior = (level[:, 0] > 0) & (level[:, 1] > 0) & (level[:, 2] < 512) & (level[:, 3] < 512)
        assert interior.any()
        assert torch.allclose(w[interior], torch.tensor(float(size)))
        assert torch.allclose(h[interior], torch.tensor(float(size)))
    # First level: centres on a 17 x 17 grid every 32 px including the borders (the corner box is clipped).
    assert torch.equal(levels[0][0], torch.tensor([0.0, 0.0, 32.0, 32.0]))
    assert torch.equal(levels[0][1], torch.tensor([0.0, 0.0, 64.0, 32.0]))
    assert torch.equal(levels[1][-1], torch.tensor([448.0, 448.0, 512.0, 512.0]))
    # Second level: 128-px squares centred every 64 px from 0 to 512, so left edges clip to 0, 0, 64, ..., 448.
    assert sorted(set(levels[1][:, 0].tolist())) == [64.0 * i for i in range(8)]
    assert levels[1][:9, 0].tolist() == [0.0, 0.0] + [64.0 * i for i in range(1, 8)]
    # The middle box of the largest level is the central 256-px square.
    assert torch.equal(levels[2][12], torch.tensor([128.0, 128.0, 384.0, 384.0]))
    # Row-major order: the 18th first-level box starts the second row of centres (y = 32).
    assert torch.equal(levels[0][17], torch.tensor([0.0, 0.0, 32.0, 64.0]))


def test_proposals_scale_with_the_input_side():
    assert torch.allclose(make_proposals((256, 256)) * 2, make_proposals((512, 512)))


# ---- box coder ---------------------------------------------------------------------------------------------


def test_box_coder_round_trip_and_zero_deltas():
    coder = BoxCoder()
    reference = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 64.0, 32.0]])
    boxes = torch.tensor([[12.0, 18.0, 60.0, 70.0], [5.0, 1.0, 40.0, 30.0]])
    assert torch.allclose(coder.decode(coder.encode(boxes, reference), reference), boxes, atol=1e-4)
    assert torch.allclose(coder.decode(torch.zeros(2, 4), reference), reference)
    clipped = clip_boxes(torch.tensor([[-5.0, 3.0, 70.0, 90.0]]), (64, 64))
    assert torch.equal(clipped, torch.tensor([[0.0, 3.0, 64.0, 64.0]]))


# ---- LSE pooling -------------------------------------------------------------------------------------------


def test_lse_tends_to_max_and_mean_at_the_limits_of_r():
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 8, 8)
    pool = LSEPooling(num_classes=3)
    with torch.no_grad():
        pool.beta.fill_(8.0)  # r = e^8 ~ 3000
        assert torch.allclose(pool(maps), maps.amax(dim=(2, 3)), atol=2e-3)
        pool.beta.fill_(-12.0)  # r ~ 6e-6
        assert torch.allclose(pool(maps), maps.mean(dim=(2, 3)), atol=1e-4)
        pool.beta.fill_(0.0)  # r = 1: strictly between mean and max
        value = pool(maps)
        assert (value > maps.mean(dim=(2, 3))).all() and (value < maps.amax(dim=(2, 3))).all()


def test_lse_sharpness_is_learnable():
    pool = LSEPooling(num_classes=2)
    pool(torch.randn(1, 2, 4, 4)).sum().backward()
    assert pool.beta.grad is not None and torch.isfinite(pool.beta.grad).all()


# ---- Gumbel selection --------------------------------------------------------------------------------------


def test_straight_through_is_one_hot_forward_and_softmax_gradient_backward():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    weights = torch.randn(3, 5, 11)
    generator = torch.Generator().manual_seed(7)
    sample = straight_through_gumbel_softmax(logits, temperature=0.5, generator=generator)
    assert torch.equal(sample.detach().sum(-1), torch.ones(3, 5))
    assert set(sample.detach().unique().tolist()) <= {0.0, 1.0}
    (sample * weights).sum().backward()
    # Reference: the same noise through a plain softmax.
    generator = torch.Generator().manual_seed(7)
    uniform = torch.rand(logits.shape, generator=generator)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    reference_logits = logits.detach().clone().requires_grad_(True)
    soft = torch.softmax((reference_logits + gumbel) / 0.5, dim=-1)
    (soft * weights).sum().backward()
    assert torch.allclose(logits.grad, reference_logits.grad, atol=1e-6)
    assert logits.grad.abs().sum() > 0
    assert torch.equal(sample.detach().argmax(-1), soft.detach().argmax(-1))


def test_selector_is_top1_without_noise_in_eval():
    selector = GumbelProposalSelector().eval()
    logits = torch.randn(2, 3, 9)
    selection = selector(logits, temperature=1.0)
    assert torch.equal(selection.argmax(-1), logits.argmax(-1))
    assert torch.equal(selector(logits, 1.0), selection)
    boxes = torch.randn(2, 3, 9, 4)
    chosen = select_boxes(selection, boxes)
    assert torch.equal(chosen, boxes.gather(2, logits.argmax(-1)[..., None, None].expand(-1, -1, 1, 4))[:, :, 0])


# ---- crop --------------------------------------------------------------------------------------------------


def test_crop_samples_the_box_region():
    # Image whose value is its x coordinate (pixel centres), so a crop's values give where it sampled.
    h, w = 32, 48
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    image = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w)])[None]
    boxes = torch.tensor([[[8.0, 4.0, 24.0, 20.0], [0.0, 0.0, 48.0, 32.0]]])
    crops = BoxCrop(crop_size=(4, 8))(image, boxes)
    assert crops.shape == (1, 2, 3, 4, 8)
    # Crop pixel centres are spread evenly over the box: x = 8 + 16 * (j + 0.5) / 8.
    expected_x = 8 + 16 * (torch.arange(8) + 0.5) / 8
    expected_y = 4 + 16 * (torch.arange(4) + 0.5) / 4
    assert torch.allclose(crops[0, 0, 0, 0], expected_x, atol=1e-4)
    assert torch.allclose(crops[0, 0, 1, :, 0], expected_y, atol=1e-4)


def test_crop_is_differentiable_with_respect_to_the_box():
    image = torch.rand(1, 3, 32, 32)
    boxes = torch.tensor([[[4.0, 6.0, 20.0, 24.0]]], requires_grad=True)
    BoxCrop(8)(image, boxes).sum().backward()
    assert torch.isfinite(boxes.grad).all() and (boxes.grad != 0).all()


# ---- RpSalNet ----------------------------------------------------------------------------------------------


def test_shapes_at_a_small_size():
    net = tiny_net().train()
    out = net(torch.randn(2, 3, 64, 64))
    assert out.image_logits.shape == (2, 14)
    assert out.saliency_logits.shape == (2, 14, 16, 16)
    assert out.proposal_logits.shape == (2, 14, 395)
    assert out.refined_boxes.shape == (2, 14, 395, 4)
    assert out.selection.shape == (2, 14, 395)
    assert out.selected_boxes.shape == (2, 14, 4)
    assert out.crop_logits.shape == (2, 14)
    assert torch.allclose(out.combined_logits, out.image_logits + out.crop_logits)
    assert (out.refined_boxes >= 0).all() and (out.refined_boxes <= 64).all()
    # The zero-initialised regressor starts every refined box at its proposal.
    assert torch.allclose(out.refined_boxes[0, 0], make_proposals((64, 64)), atol=1e-4)
    stage1 = net(torch.randn(2, 3, 64, 64), with_detection=False)
    assert stage1.proposal_logits is None and stage1.image_logits.shape == (2, 14)


def test_shapes_at_the_paper_size():
    torch.manual_seed(0)
    net = RpSalNet().eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 512, 512))
    assert out.image_logits.shape == (1, 14)
    assert out.saliency_logits.shape == (1, 14, 128, 128)
    assert out.refined_boxes.shape == (1, 14, 395, 4)
    assert out.crop_logits.shape == (1, 14)


def test_input_size_must_be_a_multiple_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_net()(torch.randn(1, 3, 70, 64))


def test_crop_loss_reaches_the_box_regressor():
    net = tiny_net().train()
    out = net(torch.randn(2, 3, 64, 64))
    torch.nn.functional.binary_cross_entropy_with_logits(out.crop_logits, torch.ones(2, 14)).backward()
    grad = net.proposal_head.delta_weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    score_grad = net.proposal_head.score_weight.grad
    assert score_grad is not None and torch.isfinite(score_grad).all() and score_grad.abs().sum() > 0


def test_eval_mode_is_deterministic():
    net = tiny_net().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = net(x), net(x)
    for first, second in zip(a, b):
        # The training-only fields (the reinforce estimator's samples) are None in evaluation.
        assert (first is None and second is None) or torch.equal(first, second)


def test_weights_round_trip_through_a_file(tmp_path):
    net = tiny_net().eval()
    with torch.no_grad():
        net.temperature.fill_(0.25)
    path = tmp_path / "model.pt"
    torch.save(net.state_dict(), path)
    torch.manual_seed(123)
    other = RpSalNet(**TINY)
    other.load_state_dict(torch.load(path, weights_only=True))
    other.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for first, second in zip(net(x), other(x)):
            assert (first is None and second is None) or torch.equal(first, second)
    assert float(other.temperature) == 0.25


def test_probability_network_returns_a_tensor_and_shares_the_state_dict():
    net = tiny_net().eval()
    torch.manual_seed(5)
    wrapper = RpSalProbabilities(**TINY).eval()
    wrapper.load_state_dict(net.state_dict())  # an RpSalNet checkpoint loads as is
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        probs = wrapper(x)
        expected = torch.sigmoid(net(x).image_logits)
        combined = RpSalProbabilities(**TINY, logits="combined").eval()
        combined.load_state_dict(net.state_dict())
        combined_probs = combined(x)
    assert probs.shape == (2, 14) and ((probs >= 0) & (probs <= 1)).all()
    assert torch.equal(probs, expected)
    assert torch.allclose(combined_probs, torch.sigmoid(net(x).combined_logits))
    assert wrapper.outputs(x).refined_boxes.shape == (2, 14, 395, 4)
    with pytest.raises(ValueError, match="logits"):
        RpSalProbabilities(**TINY, logits="crop")


# ---- ImageNet weights from local files ---------------------------------------------------------------------


def _old_style(state: dict) -> dict:
    """torchvision's pre-0.3 DenseNet key names ('norm.1' for 'norm1')."""
    pattern = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    # Those files also predate BatchNorm's num_batches_tracked.
    return {
        pattern.sub(r"\1.\2.", key): value for key, value in state.items() if "num_batches_tracked" not in key
    }


def test_imagenet_weights_load_from_local_files_including_old_densenet_keys(tmp_path):
    torch.manual_seed(1)
    densenet = DenseNet(**DENSENET_PRESETS["densenet_small"])
    resnet = ResNet(BasicBlock, [1, 1, 1, 1])
    densenet_file, resnet_file = tmp_path / "densenet.pth", tmp_path / "resnet.pth"
    old_keys = _old_style(densenet.state_dict())
    assert any(".norm.1." in key for key in old_keys)
    torch.save(old_keys, densenet_file)
    torch.save(resnet.state_dict(), resnet_file)
    net = RpSalNet(**TINY, backbone_weights=str(densenet_file), crop_weights=str(resnet_file))
    assert torch.equal(net.fpn.features.conv0.weight, densenet.features.conv0.weight)
    assert torch.equal(
        net.fpn.features.denseblock1.denselayer1.norm1.running_mean,
        densenet.features.denseblock1.denselayer1.norm1.running_mean,
    )
    assert torch.equal(net.crop_classifier.body.layer4[0].conv1.weight, resnet.layer4[0].conv1.weight)


def test_missing_or_mismatched_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="not found"):
        RpSalNet(**TINY, backbone_weights=str(tmp_path / "absent.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(ResNet(BasicBlock, [2, 2, 2, 2]).state_dict(), wrong)  # resnet18 keys for a resnet10 body
    with pytest.raises(PretrainedWeightsError, match="wrong.pth.*unexpected"):
        RpSalNet(**TINY, crop_weights=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="garbage.pth"):
        RpSalNet(**TINY, backbone_weights=str(garbage))
