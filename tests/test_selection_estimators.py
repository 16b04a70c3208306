"""The selection's gradient estimators on a problem whose expected loss is exact (custom/networks/gumbel_selection).

N proposal boxes b(n); the loss of a selection is h(box) = 1 - IoU(box, target), as the network's crop loss is a
function of the selected box. Sampling n from softmax(c), the expected loss E(c) = sum_n p_n f(n) with
f(n) = h(b(n)) has the exact gradient dE/dc_n = p_n (f(n) - E). An unbiased estimator's mean over many draws must
approach it. The paper's straight-through Gumbel-Softmax differentiates h at the selected box through the
selection weights (box = sum_n s_n b(n), as ``select_boxes``): it is measured and printed, not held to a bar.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from custom.losses import RpSalLoss
from custom.networks.gumbel_selection import (
    leave_one_out_advantage,
    proposal_pooling,
    sample_proposals,
    score_function_surrogate,
    straight_through_gumbel_softmax,
)
from custom.networks.rpsal import RpSalNet

from test_networks import TINY

DRAWS = 20000


TARGET = torch.tensor([[20.0, 24.0, 44.0, 52.0]])


def _box_loss(boxes: torch.Tensor) -> torch.Tensor:
    """h: (..., 4) xyxy -> (...) 1 - IoU with TARGET, differentiable in the boxes."""
    lo = torch.maximum(boxes[..., :2], TARGET[0, :2])
    hi = torch.minimum(boxes[..., 2:], TARGET[0, 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).prod(-1)
    union = area + (TARGET[0, 2:] - TARGET[0, :2]).prod() - inter
    return 1 - inter / union


def _toy_problem(seed: int = 0, proposals: int = 12):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(proposals, generator=generator) * 1.5
    corners = torch.rand(proposals, 2, generator=generator) * 40
    sizes = 8 + torch.rand(proposals, 2, generator=generator) * 24
    boxes = torch.cat([corners, corners + sizes], dim=-1)
    losses = _box_loss(boxes)
    p = logits.softmax(-1)
    exact = p * (losses - (p * losses).sum())
    return logits, boxes, losses, exact, generator


def _compare(estimate: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(estimate, exact, dim=0).item()
    relative_error = ((estimate - exact).norm() / exact.norm()).item()
    return cosine, relative_error


def _reinforce_mean_gradient(logits, losses, generator, samples: int = 4) -> torch.Tensor:
    # DRAWS independent rows share one parameter: the gradient of the mean surrogate is the mean estimate.
    parameter = logits.clone().requires_grad_(True)
    rows = parameter.expand(DRAWS, -1)
    indices, log_probs = sample_proposals(rows, samples, generator=generator)
    sample_losses = losses[indices]
    # The loss mean carries no gradient to the confidences here; the surrogate carries all of it.
    (sample_losses.mean() + score_function_surrogate(sample_losses, log_probs)).backward()
    return parameter.grad


def _straight_through_mean_gradient(logits, boxes, generator, temperature: float) -> torch.Tensor:
    parameter = logits.clone().requires_grad_(True)
    selection = straight_through_gumbel_softmax(parameter.expand(DRAWS, -1), temperature, generator=generator)
    _box_loss(selection @ boxes).mean().backward()
    return parameter.grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_with_leave_one_out_baseline_is_unbiased(seed):
    logits, _, losses, exact, generator = _toy_problem(seed)
    estimate = _reinforce_mean_gradient(logits, losses, generator)
    cosine, relative_error = _compare(estimate, exact)
    print(f"seed {seed}: reinforce S=4 cosine {cosine:+.3f}, relative error {relative_error:.3f}")
    assert cosine >= 0.9 and relative_error <= 0.2


@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_straight_through_gradient_is_measured(temperature, capsys):
    figures = []
    for seed in range(3):
        logits, boxes, _, exact, generator = _toy_problem(seed)
        figures.append(_compare(_straight_through_mean_gradient(logits, boxes, generator, temperature), exact))
    with capsys.disabled():  # shown in every run of the suite, not only with -s
        print(
            f"\nstraight-through Gumbel-Softmax, tau {temperature}: (cosine, relative error) with the exact "
            "gradient over 3 toys: " + ", ".join(f"({c:+.2f}, {e:.2f})" for c, e in figures)
        )
    # Biased: it does not reach the unbiased estimator's bar on these toys (the printed figures are the record).
    assert min(c for c, _ in figures) < 0.9


def test_leave_one_out_advantage_is_loss_minus_the_others_mean():
    losses = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    assert torch.allclose(leave_one_out_advantage(losses), torch.tensor([[-2.667, -1.333, 0.0, 4.0]]), atol=1e-3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_advantage(torch.ones(3, 1))


def test_score_function_surrogate_is_zero_valued():
    log_probs = torch.randn(2, 3, 4, requires_grad=True)
    surrogate = score_function_surrogate(torch.rand(2, 3, 4), log_probs)
    assert surrogate.item() == 0.0
    surrogate.backward()
    assert log_probs.grad.abs().sum() > 0


def test_sampling_follows_the_softmax():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0])
    indices, log_probs = sample_proposals(logits.expand(5000, -1), 4, generator=generator)
    frequency = torch.bincount(indices.flatten(), minlength=3) / indices.numel()
    assert torch.allclose(frequency, logits.softmax(-1), atol=0.02)
    assert torch.allclose(log_probs, logits.log_softmax(-1)[indices])
    with pytest.raises(ValueError, match="num_samples"):
        sample_proposals(logits, 0)


def test_proposal_pooling_lies_between_mean_and_max():
    logits = torch.randn(2, 14, 395)
    pooled = proposal_pooling(logits, 5.0)
    assert pooled.shape == (2, 14)
    assert (pooled >= logits.mean(-1) - 1e-5).all() and (pooled <= logits.amax(-1) + 1e-5).all()
    assert torch.allclose(proposal_pooling(logits, 1e4), logits.amax(-1), atol=1e-2)
    assert torch.allclose(proposal_pooling(logits, 1e-4), logits.mean(-1), atol=1e-2)


# ---- the estimators inside RpSalNet and RpSalLoss ------------------------------------------------------------


def _tiny(**overrides) -> RpSalNet:
    torch.manual_seed(0)
    return RpSalNet(**{**TINY, **overrides})


def _loss(terms) -> RpSalLoss:
    return RpSalLoss([0.9] * 14, [0.1] * 14, terms={2: terms}, stage=2)


def test_reinforce_training_output_and_its_gradients():
    net = _tiny(selection_estimator="reinforce", num_samples=3).train()
    out = net(torch.randn(2, 3, 64, 64))
    assert out.sample_combined_logits.shape == (2, 14, 3) and out.sample_log_probs.shape == (2, 14, 3)
    assert out.proposal_image_logits.shape == (2, 14)
    assert torch.allclose(out.crop_logits, (out.sample_combined_logits - out.image_logits[..., None]).mean(-1))
    labels = (torch.rand(2, 14) > 0.5).float()
    loss = _loss({"combined_logits": 1.0})(out, labels)
    # The surrogate adds gradient, not value: the loss is the mean per-sample BCE.
    expected = _loss({"combined_logits": 1.0}).bce.elementwise(out.sample_combined_logits, labels).mean()
    assert torch.allclose(loss, expected)
    loss.backward()
    head = net.proposal_head
    for name in ("score_weight", "delta_weight"):
        grad = getattr(head, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # Evaluation is the deterministic top-1 whatever the estimator.
    net.eval()
    with torch.no_grad():
        first, second = net(torch.ones(1, 3, 64, 64)), net(torch.ones(1, 3, 64, 64))
    assert first.sample_combined_logits is None and torch.equal(first.selected_boxes, second.selected_boxes)


def test_multiple_instance_term_trains_the_confidences_alone():
    net = _tiny().train()
    out = net(torch.randn(2, 3, 64, 64))
    _loss({"proposal_image_logits": 1.0})(out, torch.ones(2, 14)).backward()
    assert net.proposal_head.score_weight.grad.abs().sum() > 0
    assert net.crop_classifier.body.conv1.weight.grad is None


def test_shared_proposal_head_has_one_set_of_weights():
    shared, per_class = _tiny(shared_proposal_head=True), _tiny()
    count = lambda m: sum(p.numel() for p in m.proposal_head.parameters())  # noqa: E731
    assert count(per_class) > count(shared) * 10
    out = shared.train()(torch.randn(2, 3, 64, 64))
    assert out.proposal_logits.shape == (2, 14, 395) and out.refined_boxes.shape == (2, 14, 395, 4)


def test_invalid_estimator_settings_are_clear_errors():
    with pytest.raises(ValueError, match="selection_estimator"):
        _tiny(selection_estimator="gumbel")
    with pytest.raises(ValueError, match="num_samples >= 2"):
        _tiny(selection_estimator="reinforce", num_samples=1)
    with pytest.raises(ValueError, match="mil_sharpness"):
        _tiny(mil_sharpness=0)


def test_mean_and_contrast_reductions_prefer_a_box_tight_around_the_evidence():
    from custom.networks.proposal_head import ProposalHead

    torch.manual_seed(0)
    # One class, evidence in an 8 x 8-cell square of a 16 x 16 feature map (64-px input); proposals: that square,
    # the whole image (same maximum, diluted mean), a box inside the square (same mean, no edges in common),
    # a box twice the square's side.
    features = torch.zeros(1, 1, 2, 16, 16)
    features[..., 4:12, 4:12] = 1.0
    saliency = torch.full((1, 1, 16, 16), 10.0)
    proposals = torch.tensor([[16.0, 16.0, 48.0, 48.0], [0.0, 0.0, 64.0, 64.0], [20.0, 20.0, 44.0, 44.0],
                              [8.0, 8.0, 56.0, 56.0]])
    scores = {}
    for reduction in ("max", "mean", "contrast"):
        head = ProposalHead(num_classes=1, class_channels=2, hidden_channels=3, reduction=reduction)
        with torch.no_grad():
            head.conv.weight.zero_()
            head.conv.weight[:, :, 1, 1] = 0.1  # the centre tap only: each RoI bin scored by itself
            head.conv.bias.zero_()
            head.score_weight.fill_(1.0)
        logits, _ = head(features, saliency, proposals, (64, 64))
        scores[reduction] = logits[0, 0]
    assert torch.allclose(scores["max"][0], scores["max"][1])  # max cannot tell the boxes apart
    assert scores["mean"][0] > scores["mean"][1] + 0.1
    assert scores["mean"][2] > scores["mean"][0] - 0.03  # mean cannot tell it from the inner box
    # contrast: the box whose edges are the evidence's beats the inner, the larger and the whole-image box
    assert scores["contrast"][0] > scores["contrast"][2:].max() + 0.05 and scores["contrast"][0] > 0.2
    assert scores["contrast"][1] == 0  # a box whose context is itself (clipped to the image) has no contrast
    with pytest.raises(ValueError, match="reduction"):
        ProposalHead(num_classes=1, class_channels=2, hidden_channels=3, reduction="sum")
    with pytest.raises(ValueError, match="context_scale"):
        ProposalHead(num_classes=1, class_channels=2, hidden_channels=3, reduction="contrast", context_scale=1)
