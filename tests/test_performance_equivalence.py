"""The optimised computations equal their straightforward versions (issue 7).

Each test compares a fast path with an independent, plainly written reference on small inputs:
    - proposal pooling (cached sparse RoIAlign, embedding_bag forward and backward) vs torchvision roi_align:
      float32, |difference| <= 1e-5 forward, <= 1e-4 for the gradient of the features;
    - the saliency head (tiled per-class BN-act-conv, no K-fold copy) vs repeat + BatchNorm2d + grouped conv:
      float64, <= 1e-10 for outputs, every gradient and the running statistics, in training and evaluation;
    - the tiled per-class affine-linear primitive: autograd.gradcheck (float64), tiling-independent results;
    - the proposal head (in-place gating, max before the activation) vs the authors' order: float32, 1e-5
      (gradients: 1e-4 + 1e-5 relative);
    - the batched crop (one grid_sample for all K boxes) vs an explicit per-box bilinear sampler: 1e-5;
    - the Det map painting (difference array + cumulative sums) vs painting every box: float64, 1e-12;
    - the whole network with the fast pooler vs with torchvision roi_align: float32, 1e-4;
    - no host synchronisation (item(), float(), bool() of a tensor) in a training forward and backward;
    - the bf16 autocast + channels-last training path runs (dtypes, finite gradients) on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from custom.localisation.maps import detection_map
from custom.losses import RpSalLoss
from custom.networks.box_coder import clip_boxes
from custom.networks.crop import BoxCrop
from custom.networks.fpn_saliency import SaliencyHead
from custom.networks.per_class_linear import per_class_affine_linear
from custom.networks.proposal_head import FixedProposalPooler, ProposalHead, ProposalPooler
from custom.networks.proposals import make_proposals
from custom.networks.rpsal import RpSalNet

TINY = {
    "backbone": "densenet_small",
    "crop_backbone": "resnet10",
    "fpn_channels": 32,
    "class_channels": 16,
    "head_channels": 8,
    "crop_size": 16,
}


def random_boxes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n float xyxy boxes inside a size x size image, at least 1 px wide and high."""
    corners = torch.rand(n, 2, 2, generator=generator) * (size - 1)
    low, high = corners.min(dim=1).values, corners.max(dim=1).values + 1
    return torch.cat([low, high], dim=1)


# ---- proposal pooling --------------------------------------------------------------------------------------


def reference_roi_align(features: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """torchvision roi_align (5x5, sampling ratio 2, aligned) of the same boxes on every image.

    features (B, F, h, w), boxes (N, 4) xyxy pixels of an image_size-px square -> (B, N, F, 5, 5).
    """
    b, n = features.shape[0], boxes.shape[0]
    rois = torch.cat([torch.arange(b).repeat_interleave(n)[:, None].float(), boxes.repeat(b, 1)], dim=1)
    pooled = roi_align(
        features, rois, 5, spatial_scale=features.shape[-1] / image_size, sampling_ratio=2, aligned=True
    )
    return pooled.view(b, n, *pooled.shape[1:])


@pytest.mark.parametrize("channels_last", [False, True])
def test_fixed_pooler_equals_torchvision_roi_align(channels_last):
    generator = torch.Generator().manual_seed(0)
    boxes = torch.cat([make_proposals((64, 64)), random_boxes(40, 64, generator)])
    features = torch.randn(2, 6, 16, 16, generator=generator)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    fast_input = features.clone().requires_grad_(True)
    reference_input = features.clone().requires_grad_(True)
    fast = FixedProposalPooler()(fast_input, boxes, (64, 64))
    reference = reference_roi_align(reference_input, boxes, 64)
    assert fast.shape == reference.shape == (2, boxes.shape[0], 6, 5, 5)
    assert torch.allclose(fast, reference, atol=1e-5, rtol=0)
    upstream = torch.randn(reference.shape, generator=generator)
    (fast * upstream).sum().backward()
    (reference * upstream).sum().backward()
    assert torch.allclose(fast_input.grad, reference_input.grad, atol=1e-4, rtol=0)
    # The ProposalPooler option runs roi_align itself and must agree as well.
    assert torch.allclose(ProposalPooler()(features, boxes, (64, 64)), reference, atol=1e-6, rtol=0)


def test_pooling_matrix_is_cached_without_comparing_values(monkeypatch):
    pooler = FixedProposalPooler()
    boxes = make_proposals((64, 64))
    features = torch.randn(1, 3, 16, 16)
    first = pooler(features, boxes, (64, 64))

    def no_comparison(*args):
        raise AssertionError("torch.equal called: a cache hit must not compare values (a GPU sync)")

    monkeypatch.setattr(torch, "equal", no_comparison)
    assert torch.equal.__name__ == "no_comparison"
    second = pooler(features, boxes, (64, 64))
    monkeypatch.undo()
    assert torch.allclose(first, second, atol=0, rtol=0)
    # Changing the proposals in place invalidates the cached matrix.
    boxes[0] = torch.tensor([0.0, 0.0, 64.0, 64.0])
    moved = pooler(features, boxes, (64, 64))
    assert torch.allclose(moved, reference_roi_align(features, boxes, 64), atol=1e-5, rtol=0)


# ---- saliency head -----------------------------------------------------------------------------------------


def straightforward_saliency_head(head: SaliencyHead, pyramid: torch.Tensor):
    """The authors' head as written: the pyramid repeated K times, BN, act, grouped conv, then BN, act and
    grouped conv again; returns class features (B, K, C, h, w) and saliency logits (B, K, h, w)."""
    k, c = head.num_classes, head.class_channels
    act = head.activation
    class_features = head.class_conv(act(head.input_norm(pyramid.repeat(1, k, 1, 1))))
    saliency = head.saliency_conv(act(head.class_norm(class_features)))
    return class_features.view(pyramid.shape[0], k, c, *pyramid.shape[-2:]), saliency


def randomise_norms(module: nn.Module, generator: torch.Generator) -> None:
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            with torch.no_grad():
                norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator))
                norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=generator))
                norm.running_var.copy_(torch.rand(norm.running_var.shape, generator=generator) + 0.5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_saliency_head_equals_the_straightforward_version(training, channels_last):
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    fast = SaliencyHead(num_classes=3, in_channels=8, class_channels=4).double()
    randomise_norms(fast, generator)
    fast.tile_pixels = 7  # several tiles and a partial last one (2 x 5 x 6 = 60 pixels)
    reference = copy.deepcopy(fast)
    fast.train(training)
    reference.train(training)
    # A mean far from zero against the spread: the folded BatchNorm must keep its precision.
    pyramid = torch.randn(2, 8, 5, 6, generator=generator, dtype=torch.float64) * 2 + 30
    if channels_last:
        pyramid = pyramid.contiguous(memory_format=torch.channels_last)
    fast_input, reference_input = pyramid.clone().requires_grad_(True), pyramid.clone().requires_grad_(True)
    fast_out = fast(fast_input)
    reference_out = straightforward_saliency_head(reference, reference_input)
    upstream = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in reference_out]
    torch.autograd.backward(fast_out, upstream)
    torch.autograd.backward(reference_out, upstream)
    for got, expected in zip(fast_out, reference_out):
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-10, rtol=0)
    assert torch.allclose(fast_input.grad, reference_input.grad, atol=1e-10, rtol=0)
    for (name, got), expected in zip(fast.named_parameters(), reference.parameters()):
        assert torch.allclose(got.grad, expected.grad, atol=1e-9, rtol=0), name
    for (name, got), expected in zip(fast.named_buffers(), reference.buffers()):
        assert torch.allclose(got.double(), expected.double(), atol=1e-12, rtol=0), name
    # The class features come pixel-major (channels-last), the layout the pooler reads without a copy.
    assert fast_out[0].permute(0, 3, 4, 1, 2).is_contiguous()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_centre", [False, True])
def test_per_class_affine_linear_gradients(shared, with_centre):
    generator = torch.Generator().manual_seed(2)
    k, q, c, pixels = 3, 4, 2, 10

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_(True)

    x = rand(pixels, 1 if shared else k, q)
    centre = rand(1 if shared else k, q) if with_centre else None
    inputs = (x, centre, rand(k, q), rand(k, q), rand(k, c, q), rand(k, c))
    assert torch.autograd.gradcheck(lambda *a: per_class_affine_linear(*a, 0.1, 3), inputs)


def test_per_class_affine_linear_does_not_depend_on_the_tiling():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(50, 1, 8, generator=generator)
    args = (
        torch.randn(1, 8, generator=generator),
        torch.rand(5, 8, generator=generator) + 0.5,
        torch.randn(5, 8, generator=generator),
        torch.randn(5, 3, 8, generator=generator),
        torch.randn(5, 3, generator=generator),
    )
    whole = per_class_affine_linear(x, *args, 0.1, tile_pixels=50)
    for tile in (1, 7, None):
        # Different tile sizes run different GEMM kernels: equal to float32 rounding.
        assert torch.allclose(
            per_class_affine_linear(x, *args, 0.1, tile_pixels=tile), whole, atol=1e-5, rtol=0
        )
    # The plain formula, written out.
    centre, scale, shift, weight, bias = args
    expected = torch.einsum("kcq,pkq->pkc", weight, F.leaky_relu(scale * (x - centre) + shift, 0.1)) + bias
    assert torch.allclose(whole, expected, atol=1e-5, rtol=0)


def test_per_class_affine_linear_under_bf16_autocast():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(40, 1, 16, generator=generator).requires_grad_(True)
    weight = (torch.randn(3, 8, 16, generator=generator) / 4).requires_grad_(True)
    args = (None, torch.ones(3, 16), torch.zeros(3, 16), weight, torch.zeros(3, 8))
    exact = per_class_affine_linear(x, *args, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = per_class_affine_linear(x, *args, 0.1)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), exact, atol=0.05, rtol=0.02)
    low.float().sum().backward()
    assert x.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()


# ---- proposal head -----------------------------------------------------------------------------------------


def straightforward_score(head: ProposalHead, features, saliency, proposals, image_size):
    """Gate, conv, activation, THEN global max pool (the authors' order), linear heads, box decoding."""
    rows, k, c, s, _ = features.shape
    n = proposals.shape[0]
    gated = (features * saliency).reshape(rows, k * c, s, s).contiguous()
    hidden = head.activation(head.conv(gated)).amax(dim=(2, 3)).view(rows // n, n, k, -1)
    logits = torch.einsum("bnkd,kd->bkn", hidden, head.score_weight)
    deltas = torch.einsum("bnkd,kdo->bkno", hidden, head.delta_weight) + head.delta_bias[None, :, None, :]
    return logits, clip_boxes(head.box_coder.decode(deltas, proposals[None, None]), image_size)


def test_proposal_head_equals_the_straightforward_version():
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    head = ProposalHead(num_classes=3, class_channels=4, hidden_channels=5)
    with torch.no_grad():
        head.delta_weight.normal_(0, 0.1, generator=generator)
    proposals = make_proposals((64, 64))
    class_features = torch.randn(2, 3, 4, 16, 16, generator=generator)
    saliency_logits = torch.randn(2, 3, 16, 16, generator=generator)
    features, saliency = head.pool(class_features, saliency_logits, proposals, (64, 64))
    expected = straightforward_score(head, features, saliency, proposals, (64, 64))
    with torch.no_grad():
        inference = head(class_features, saliency_logits, proposals, (64, 64))  # gates in place
    for got, want in zip(inference, expected):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # With autograd: same values and the same gradients to the head's parameters and the pooled inputs.
    leaves = [t.detach().clone().requires_grad_(True) for t in (features, saliency)]
    reference_leaves = [t.detach().clone().requires_grad_(True) for t in (features, saliency)]
    fast_head, reference_head = head, copy.deepcopy(head)
    got = fast_head.score(*leaves, proposals, (64, 64))
    want = straightforward_score(reference_head, *reference_leaves, proposals, (64, 64))
    upstream = [torch.randn(t.shape, generator=generator) for t in want]
    torch.autograd.backward(got, upstream)
    torch.autograd.backward(want, upstream)
    for a, b in zip(
        leaves + list(fast_head.parameters()), reference_leaves + list(reference_head.parameters())
    ):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-5)  # gradients reach the hundreds


# ---- crop --------------------------------------------------------------------------------------------------


def bilinear_crop(image: torch.Tensor, box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop (C, ch, cw) of one (C, H, W) image at one xyxy box (pixels of that image).

    Crop pixel (i, j) samples the image at the point (x0 + (x1 - x0)(j + 0.5)/cw, y0 + (y1 - y0)(i + 0.5)/ch),
    bilinearly between pixel centres (pixel m's centre at m + 0.5), zero outside the image.
    """
    channels, height, width = image.shape
    ch, cw = size
    x = box[0] + (box[2] - box[0]) * (torch.arange(cw) + 0.5) / cw - 0.5  # in pixel-index units
    y = box[1] + (box[3] - box[1]) * (torch.arange(ch) + 0.5) / ch - 0.5
    x0, y0 = x.floor().long(), y.floor().long()
    out = torch.zeros(channels, ch, cw)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wx = 1 - (x - xi).abs()
            wy = 1 - (y - yi).abs()
            inside = ((yi >= 0) & (yi < height))[:, None] & ((xi >= 0) & (xi < width))[None, :]
            values = image[:, yi.clamp(0, height - 1)][:, :, xi.clamp(0, width - 1)]
            out += values * (wy[:, None] * wx[None, :] * inside)
    return out


def test_batched_crop_equals_per_box_crops():
    generator = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 24, 32, generator=generator)
    boxes = torch.stack([random_boxes(4, 24, generator) for _ in range(2)])
    boxes[0, 0] = torch.tensor([-3.0, -2.0, 10.0, 30.0])  # partly outside: zero padding
    crops = BoxCrop((6, 5))(images, boxes)
    assert crops.shape == (2, 4, 3, 6, 5)
    for b in range(2):
        for k in range(4):
            expected = bilinear_crop(images[b], boxes[b, k], (6, 5))
            assert torch.allclose(crops[b, k], expected, atol=1e-5, rtol=0), (b, k)
    # Gradients to the boxes and the images equal those of one grid_sample call per box.
    fast_boxes, loop_boxes = boxes.clone().requires_grad_(True), boxes.clone().requires_grad_(True)
    fast_images, loop_images = images.clone().requires_grad_(True), images.clone().requires_grad_(True)
    upstream = torch.randn(crops.shape, generator=generator)
    (BoxCrop((6, 5))(fast_images, fast_boxes) * upstream).sum().backward()
    single = BoxCrop((6, 5))
    total = sum(
        (single(loop_images[b : b + 1], loop_boxes[b : b + 1, k : k + 1])[0, 0] * upstream[b, k]).sum()
        for b in range(2)
        for k in range(4)
    )
    total.backward()
    assert torch.allclose(fast_boxes.grad, loop_boxes.grad, atol=1e-4, rtol=0)
    assert torch.allclose(fast_images.grad, loop_images.grad, atol=1e-5, rtol=0)


# ---- Det map -----------------------------------------------------------------------------------------------


def painted_det_map(logits, boxes, input_size, grid_size, weighting, normalize):
    """Every box painted on the grid: a pixel is covered when its centre lies in [x0, x1) x [y0, y1)."""
    (height, width), (rows, cols) = input_size, grid_size
    weights = torch.sigmoid(logits.double()) if weighting == "sigmoid" else logits.double()
    centre_y = (torch.arange(rows, dtype=torch.float64) + 0.5) * height / rows
    centre_x = (torch.arange(cols, dtype=torch.float64) + 0.5) * width / cols
    b = boxes.double()
    in_y = (centre_y >= b[..., 1, None]) & (centre_y < b[..., 3, None])  # (B, K, N, rows)
    in_x = (centre_x >= b[..., 0, None]) & (centre_x < b[..., 2, None])
    masks = (in_y[..., :, None] & in_x[..., None, :]).double()  # (B, K, N, rows, cols)
    painted = (weights[..., None, None] * masks).sum(dim=2)
    return painted / weights.sum(dim=2)[..., None, None] if normalize else painted


@pytest.mark.parametrize("weighting,normalize", [("sigmoid", True), ("sigmoid", False), ("raw", False)])
def test_det_map_painting_equals_painting_every_box(weighting, normalize):
    generator = torch.Generator().manual_seed(7)
    boxes = torch.stack([random_boxes(30, 64, generator) for _ in range(2 * 3)]).view(2, 3, 30, 4)
    # Edges exactly on pixel centres (every 4 px from 2 on a 16-cell grid of 64 px): half-open rule.
    boxes[0, 0, :3] = torch.tensor([[6.0, 6.0, 10.0, 14.0], [2.0, 2.0, 2.0, 30.0], [0.0, 0.0, 64.0, 64.0]])
    logits = torch.randn(2, 3, 30, generator=generator, dtype=torch.float64)
    fast = detection_map(logits, boxes, 64, 16, weighting, normalize)
    expected = painted_det_map(logits, boxes, (64, 64), (16, 16), weighting, normalize)
    assert torch.allclose(fast, expected, atol=1e-12, rtol=0)


# ---- whole network -----------------------------------------------------------------------------------------


def test_network_with_the_fast_pooler_equals_torchvision_roi_align():
    torch.manual_seed(8)
    fast = RpSalNet(**TINY).eval()
    randomise_norms(fast, torch.Generator().manual_seed(8))
    reference = copy.deepcopy(fast)
    reference.proposal_head.pooler = ProposalPooler()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got, want = fast(images), reference(images)
    for name, a, b in zip(got._fields, got, want):
        assert (a is None) == (b is None), name  # the reinforce-only fields are None in eval mode
        if a is not None:
            assert torch.allclose(a, b, atol=1e-4, rtol=0), name


def test_training_step_makes_no_host_synchronisation(monkeypatch):
    """On a GPU, item(), float(), int(), bool() or tolist() of a tensor waits for the device; none may run in
    the forward and backward of a training step (checked here on the CPU by making them fail)."""
    torch.manual_seed(9)
    net = RpSalNet(**TINY).train()
    loss = RpSalLoss([0.9] * 14, [0.1] * 14, stage=3)
    images, labels = torch.randn(2, 3, 64, 64), (torch.rand(2, 14) < 0.3).float()
    loss(net(images), labels).backward()  # first step: builds the cached proposals and pooling matrices

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the training step")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    value = loss(net(images), labels)
    value.backward()
    monkeypatch.undo()
    assert torch.isfinite(value)


def test_bf16_autocast_channels_last_training_step_runs():
    """The GPU precision path (bf16 autocast, channels-last) exercised on the CPU: dtypes fit, gradients are
    finite, and the selected boxes stay float32 (bf16 would round 512-px coordinates to 2 px)."""
    torch.manual_seed(10)
    # Crops of 32 px, not TINY's 16: with 16-px crops the ResNet's last stage sees 1x1 maps, and torch 2.14's
    # CPU bf16 channels-last weight gradient of a 3x3 stride-2 conv on a 1x1 input is sometimes non-finite
    # (a bare nn.Conv2d(256, 512, 3, 2, 1): 1 in 200 backward passes, different runs on the same inputs;
    # never on 2x2 inputs in 400). That CPU kernel is not on any path we run (CPU trains in float32).
    net = RpSalNet(**{**TINY, "crop_size": 32}).train().to(memory_format=torch.channels_last)
    loss = RpSalLoss([0.9] * 14, [0.1] * 14, stage=3)
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    labels = (torch.rand(2, 14) < 0.3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = net(images)
        value = loss(output, labels)
    value.backward()
    assert output.saliency_logits.dtype == torch.bfloat16
    assert output.selected_boxes.dtype == torch.float32 and output.refined_boxes.dtype == torch.float32
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in net.parameters())
    assert all(torch.isfinite(g).all() for g in grads)
