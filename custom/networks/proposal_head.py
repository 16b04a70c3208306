"""Detection module: proposal features, per-class confidence and box refinement (paper Sec. 3.2).

Shapes for B images of H x W pixels, K classes, N proposals, C class channels, maps h x w = H/4 x W/4:
    ProposalPooler:  features (B, F, h, w), proposals (N, 4) -> pooled (B, N, F, s, s), s = output_size
    ProposalHead:    class features (B, K, C, h, w), saliency logits (B, K, h, w), proposals (N, 4)
                     -> proposal logits (B, K, N) (pre-sigmoid confidence c(n, k)),
                        refined boxes (B, K, N, 4) xyxy input pixels, clipped to the image
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from .box_coder import BoxCoder, clip_boxes


# How a proposal's pooled conv output becomes one vector (``ProposalHead``).
REDUCTIONS = ("max", "mean", "contrast")


class ProposalPooler(nn.Module):
    """RoIAlign of the same N boxes on every image of the batch.

    Args:
        output_size: s, the pooled grid is s x s (authors: 5).
        sampling_ratio: sampling points per bin side (authors: 2).

    ``forward(features (B, F, h, w), proposals (N, 4) xyxy input pixels, image_size (H, W))``
    -> (B, N, F, s, s). The scale from input pixels to feature cells is w / W (same on both axes).
    """

    def __init__(self, output_size: int = 5, sampling_ratio: int = 2):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    # The detection module runs eagerly (or exported by torch.export), not in a scripted model: TorchScript
    # compiles the image-logit path of RpSalProbabilities and leaves this forward out.
    @torch.jit.unused
    def forward(self, features: torch.Tensor, proposals: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        return roi_align_pool(features, proposals, image_size, self.output_size, self.sampling_ratio)


def roi_align_pool(features: torch.Tensor, proposals: torch.Tensor, image_size: tuple[int, int], output_size: int,
                   sampling_ratio: int) -> torch.Tensor:
    """torchvision's RoIAlign (``aligned=True``) of the same N proposals on every image: (B, F, h, w) ->
    (B, N, F, s, s) float32."""
    b, f = features.shape[:2]
    n = proposals.shape[0]
    batch_index = torch.arange(b, device=features.device, dtype=proposals.dtype).repeat_interleave(n)
    rois = torch.cat([batch_index[:, None], proposals.repeat(b, 1)], dim=1)
    # roi_align has no bfloat16 kernel on CUDA: pool in float32 whatever the autocast dtype.
    pooled = roi_align(
        features.float(),
        rois.float(),
        output_size=output_size,
        spatial_scale=features.shape[-1] / image_size[1],
        sampling_ratio=sampling_ratio,
        aligned=True,
    )
    return pooled.view(b, n, f, output_size, output_size)


def roi_align_matrix(
    proposals: torch.Tensor,
    feature_size: tuple[int, int],
    spatial_scale: float,
    output_size: int = 5,
    sampling_ratio: int = 2,
) -> torch.Tensor:
    """RoIAlign (``aligned=True``) of fixed boxes as a sparse (N * s * s, h * w) matrix.

    Row ``(n * s + i) * s + j`` holds the bilinear weights with which bin (i, j) of box n averages the
    feature cells, exactly as torchvision's ``roi_align`` computes them (same sample points, same border
    rules), so ``matrix @ features.view(h * w, F)`` equals ``roi_align`` of the boxes.

    Args:
        proposals: (N, 4) xyxy input pixels. feature_size: (h, w). spatial_scale: feature cells per pixel.
    """
    height, width = feature_size
    n = proposals.shape[0]
    s, g = output_size, sampling_ratio
    boxes = proposals.double() * spatial_scale - 0.5  # aligned=True: pixel centres at half-integers
    start_x, start_y = boxes[:, 0], boxes[:, 1]
    bin_w = (boxes[:, 2] - boxes[:, 0]) / s
    bin_h = (boxes[:, 3] - boxes[:, 1]) / s
    # Sample points: (N, s bins, g samples) per axis.
    offsets = (torch.arange(s, dtype=torch.float64)[:, None] + (torch.arange(g, dtype=torch.float64) + 0.5) / g)
    xs = start_x[:, None, None] + offsets * bin_w[:, None, None]
    ys = start_y[:, None, None] + offsets * bin_h[:, None, None]

    def axis_weights(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
        """Low/high cell index and their weights along one axis, with roi_align's border rules."""
        outside = (coords < -1.0) | (coords > size)
        coords = coords.clamp(min=0)
        low = coords.floor().long()
        at_edge = low >= size - 1
        low = torch.where(at_edge, torch.full_like(low, size - 1), low)
        high = torch.where(at_edge, low, low + 1)
        coords = torch.where(at_edge, low.double(), coords)
        frac = coords - low
        valid = (~outside).double()
        return low, high, (1 - frac) * valid, frac * valid

    x_low, x_high, wx_low, wx_high = axis_weights(xs, width)  # (N, s, g)
    y_low, y_high, wy_low, wy_high = axis_weights(ys, height)
    rows, cols, vals = [], [], []
    bin_index = torch.arange(n * s * s).view(n, s, s)
    for y_idx, wy in ((y_low, wy_low), (y_high, wy_high)):
        for x_idx, wx in ((x_low, wx_low), (x_high, wx_high)):
            # (N, s_y, g_y, s_x, g_x) contributions of one bilinear corner.
            cell = y_idx[:, :, :, None, None] * width + x_idx[:, None, None, :, :]
            weight = wy[:, :, :, None, None] * wx[:, None, None, :, :] / (g * g)
            rows.append(bin_index[:, :, None, :, None].expand_as(cell).reshape(-1))
            cols.append(cell.reshape(-1))
            vals.append(weight.reshape(-1))
    rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
    keep = vals != 0
    matrix = torch.sparse_coo_tensor(
        torch.stack([rows[keep], cols[keep]]), vals[keep].float(), (n * s * s, height * width), check_invariants=True
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return matrix.coalesce().to_sparse_csr()


class _RowPooling(torch.autograd.Function):
    """``matrix @ rows`` for a fixed sparse matrix given as CSR triplets, and its transpose for the backward.

    Each output row is a weighted sum of a few input rows: ``embedding_bag(mode="sum")`` with per-sample
    weights computes exactly that, with vectorised, multithreaded kernels on the CPU and the GPU, and needs
    no conversion of the index arrays per call as the sparse-matrix product does.
    """

    @staticmethod
    def forward(ctx, rows, matrix: _PoolingMatrix):
        ctx.matrix = matrix
        return F.embedding_bag(
            matrix.columns, rows, matrix.offsets, mode="sum", per_sample_weights=matrix.values
        )

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None
        matrix = ctx.matrix
        grad_rows = F.embedding_bag(
            matrix.t_columns, grad.contiguous(), matrix.t_offsets, mode="sum",
            per_sample_weights=matrix.t_values,
        )
        return grad_rows, None


class _PoolingMatrix(NamedTuple):
    """A (R, P) sparse matrix and its transpose as CSR triplets.

    Row r sums ``values[o[r]:o[r+1]]`` times the input rows ``columns[o[r]:o[r+1]]``; ``offsets`` is o without
    its last entry, as embedding_bag takes it.
    """

    columns: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    t_columns: torch.Tensor
    t_offsets: torch.Tensor
    t_values: torch.Tensor


def _csr_triplets(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    offsets = matrix.crow_indices()[:-1].contiguous()
    return offsets, matrix.col_indices().contiguous(), matrix.values().contiguous()


def batch_pooling_matrix(matrix: torch.Tensor, batch: int) -> _PoolingMatrix:
    """The block-diagonal matrix applying the (R, P) CSR ``matrix`` to each of ``batch`` images stacked along
    the rows, (batch*R, batch*P), with its transpose, as embedding_bag triplets."""
    rows, cols = matrix.shape
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        transpose = matrix.to_sparse_coo().t().coalesce().to_sparse_csr()
    triplets = []
    for csr, (height, width) in ((matrix, (rows, cols)), (transpose, (cols, rows))):
        offsets, columns, values = _csr_triplets(csr)
        nnz = columns.numel()
        image = torch.arange(batch, device=columns.device)
        triplets.append((
            (columns[None] + image[:, None] * width).reshape(-1),
            (offsets[None] + image[:, None] * nnz).reshape(-1),
            values.repeat(batch),
        ))
    (columns, offsets, values), (t_columns, t_offsets, t_values) = triplets
    return _PoolingMatrix(columns, offsets, values, t_columns, t_offsets, t_values)


class FixedProposalPooler(nn.Module):
    """RoIAlign of fixed proposals as one sparse linear map, built once per (proposals, feature size, batch).

    Equal to :class:`ProposalPooler` (torchvision ``roi_align``, ``aligned=True``) to float rounding: the same
    bilinear weights (``roi_align_matrix``) applied as weighted sums of feature rows, forward and backward
    (``embedding_bag``) instead of a per-box kernel whose CPU backward is single-threaded; the proposals are
    fixed, so the matrix is cached.

    ``forward(features (B, F, h, w), proposals (N, 4) xyxy input pixels, image_size (H, W))``
    -> (B, N, F, s, s) float32, stored as (B, N, s, s, F) (channels-last per proposal). Features stored
    channels-last (pixel-major) are read without a copy.
    """

    def __init__(self, output_size: int = 5, sampling_ratio: int = 2):
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self._cache: dict[tuple, tuple[torch.Tensor, int, torch.Tensor, _PoolingMatrix]] = {}

    def freeze_for_export(self, proposals: torch.Tensor, feature_size: tuple[int, int],
                          image_size: tuple[int, int]) -> None:
        """Before ``torch.export``: keep the one-image pooling matrix of these proposals as constant CSR
        triplets (non-persistent buffers: the state dict is unchanged), so the exported graph holds the same
        sparse pooling without building it from data (its nonzeros are data-dependent in a trace)."""
        matrix = roi_align_matrix(proposals.detach().cpu(), feature_size, feature_size[1] / image_size[1],
                                  self.output_size, self.sampling_ratio)
        offsets, columns, values = _csr_triplets(matrix)
        for name, value in (("export_offsets", offsets), ("export_columns", columns), ("export_values", values)):
            self.register_buffer(name, value.clone().to(proposals.device), persistent=False)  # own storage
        self.export_sizes = (tuple(int(v) for v in feature_size), tuple(int(v) for v in image_size))

    def _traced_pooling(self, features: torch.Tensor, proposals: torch.Tensor,
                        image_size: tuple[int, int]) -> torch.Tensor:
        """The pooling inside a torch.export trace: the frozen matrix applied to every image at once (the batch
        folded into the feature columns, so any batch size), or torchvision's RoIAlign when none is frozen
        for these sizes (an exported graph then needs torchvision's ops to run)."""
        b, f, h, w = features.shape
        s = self.output_size
        if getattr(self, "export_sizes", None) != ((h, w), tuple(int(v) for v in image_size)):
            return roi_align_pool(features, proposals, image_size, s, self.sampling_ratio)
        rows = features.float().permute(2, 3, 0, 1).reshape(h * w, b * f)  # (P, B*F)
        pooled = F.embedding_bag(self.export_columns, rows, self.export_offsets, mode="sum",
                                 per_sample_weights=self.export_values)  # (N*s*s, B*F)
        return pooled.view(-1, s, s, b, f).permute(3, 0, 4, 1, 2)

    def matrix(self, proposals: torch.Tensor, feature_size: tuple[int, int], image_size: tuple[int, int],
               batch: int = 1) -> _PoolingMatrix:
        """The block-diagonal pooling matrix of ``batch`` images (cached; rebuilt if the proposals change).

        The same proposals tensor, unmodified since (``ProposalGrid`` caches it), is recognised without
        comparing values, so a cached lookup never waits for the GPU.
        """
        key = (tuple(feature_size), tuple(image_size), proposals.shape[0], str(proposals.device), batch)
        cached = self._cache.get(key)
        if cached is not None and cached[0] is proposals and cached[1] == proposals._version:
            return cached[3]
        if cached is None or not torch.equal(cached[2], proposals):
            matrix = roi_align_matrix(
                proposals.detach().cpu(), feature_size, feature_size[1] / image_size[1], self.output_size,
                self.sampling_ratio,
            )
            pooling = _PoolingMatrix(*(t.to(proposals.device) for t in batch_pooling_matrix(matrix, batch)))
        else:
            pooling = cached[3]
        # The tensor itself (kept alive, so its identity stays unique), its version, a copy of its values.
        self._cache[key] = (proposals, proposals._version, proposals.detach().clone(), pooling)
        return pooling

    # The detection module runs eagerly (or exported by torch.export), not in a scripted model: TorchScript
    # compiles the image-logit path of RpSalProbabilities and leaves this forward out.
    @torch.jit.unused
    def forward(
        self, features: torch.Tensor, proposals: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_pooling(features, proposals, image_size)
        b, f, h, w = features.shape
        n, s = proposals.shape[0], self.output_size
        matrix = self.matrix(proposals, (h, w), image_size, b)
        # Pixel rows (B*h*w, F), in float32 (also under autocast, for the accumulation).
        rows = features.float().permute(0, 2, 3, 1).reshape(b * h * w, f)
        if torch.jit.is_tracing():  # no Python autograd.Function in TorchScript; the forward is the same
            pooled = F.embedding_bag(
                matrix.columns, rows, matrix.offsets, mode="sum", per_sample_weights=matrix.values
            )
        else:
            pooled = _RowPooling.apply(rows, matrix)  # (B*N*s*s, F)
        return pooled.view(b, n, s, s, f).permute(0, 1, 4, 2, 3)


class ProposalHead(nn.Module):
    """Per (proposal, class): a confidence logit and a refined box, from the class's pooled features.

    As the authors' implementation: the pooled class features (C channels) are multiplied by the pooled
    sigmoid saliency of the same class, then per class a 3x3 conv C -> ``hidden_channels``, activation,
    global max pooling, a bias-free linear layer to the confidence and a zero-initialised linear layer to
    box deltas (so refinement starts at the proposals). The K class branches run as one grouped conv.

    Args:
        num_classes: K.
        class_channels: C.
        hidden_channels: channels after the 3x3 conv (authors: 64).
        pooler: the proposal pooling (RoIAlign 5x5 of the fixed proposals as a cached sparse matrix by
            default; ``ProposalPooler()`` runs torchvision's ``roi_align`` instead, with the same result).
        shared: one set of conv / confidence / box weights for all classes, applied to each class's features
            (the authors' code) instead of one set per class.
        reduction: how the s x s conv output of a proposal is reduced to one vector: ``max`` (the authors'
            global max pooling), ``mean`` (beyond the paper: a box's evidence averaged over its area, so a
            box tight around a finding outscores a larger box holding the same maximum) or ``contrast``
            (beyond the paper: the mean over the box minus the mean over its context, the box enlarged
            ``context_scale`` times about its centre; the additive contrast of ContextLocNet, Kantorov et
            al., ECCV 2016). A box inside a larger finding then scores low too, so the best-scoring box is
            the one whose edges follow the finding's. The box deltas read the box's own mean.
        context_scale: side of the context box over the proposal's side (``contrast`` only).
    """

    def __init__(
        self,
        num_classes: int = 14,
        class_channels: int = 128,
        hidden_channels: int = 64,
        leaky_slope: float = 0.1,
        pooler: nn.Module | None = None,
        shared: bool = False,
        reduction: str = "max",
        context_scale: float = 1.8,
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if not context_scale > 1:
            raise ValueError(f"context_scale must be above 1, got {context_scale!r}")
        self.num_classes = num_classes
        self.shared = bool(shared)
        self.reduction = reduction
        self.context_scale = float(context_scale)
        self._context_cache: tuple | None = None
        k = 1 if self.shared else num_classes  # sets of weights
        self.pooler = pooler if pooler is not None else FixedProposalPooler()
        self.conv = nn.Conv2d(k * class_channels, k * hidden_channels, kernel_size=3, padding=1, groups=k)
        self.activation = nn.LeakyReLU(leaky_slope)
        self.score_weight = nn.Parameter(torch.empty(k, hidden_channels))
        self.delta_weight = nn.Parameter(torch.zeros(k, hidden_channels, 4))
        self.delta_bias = nn.Parameter(torch.zeros(k, 4))
        # The authors' initialisation, N(0.01, 0.01^2): with max-pooled activations that are mostly positive, a small
        # positive weight makes the first confidences grow with the saliency-gated features, so stage 2 starts
        # from the salient proposals. A zero-mean start gives each class a random sign instead; on the demo
        # phantom its top-1 proposals then sat on the LEAST salient places (confidence-saliency correlation
        # -0.9 to +0.7 by class) and stayed there.
        nn.init.normal_(self.score_weight, mean=0.01, std=0.01)
        self.box_coder = BoxCoder()

    def extra_repr(self) -> str:
        context = f", context_scale={self.context_scale}" if self.reduction == "contrast" else ""
        return f"shared={self.shared}, reduction={self.reduction!r}{context}"

    def pooled_boxes(self, proposals: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """The boxes to pool: the N proposals, then (``contrast``) their N context boxes -> (N or 2N, 4)."""
        if self.reduction != "contrast":
            return proposals
        # The same tensor back for the same (unmodified) proposals, so the pooler's matrix cache knows it
        # without comparing values (which would wait for the GPU).
        cached = self._context_cache
        if cached is not None and cached[0] is proposals and cached[1] == (proposals._version, tuple(image_size)):
            return cached[2]
        centre = (proposals[:, :2] + proposals[:, 2:]) / 2
        half = (proposals[:, 2:] - proposals[:, :2]) * (self.context_scale / 2)
        context = clip_boxes(torch.cat([centre - half, centre + half], dim=1), image_size)
        boxes = torch.cat([proposals, context])
        self._context_cache = (proposals, (proposals._version, tuple(image_size)), boxes)
        return boxes

    # The detection module runs eagerly (or exported by torch.export), not in a scripted model: TorchScript
    # compiles the image-logit path of RpSalProbabilities and leaves this forward out.
    @torch.jit.unused
    def forward(
        self,
        class_features: torch.Tensor,
        saliency_logits: torch.Tensor,
        proposals: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """class features (B, K, C, h, w), saliency logits (B, K, h, w), proposals (N, 4) xyxy input pixels,
        image_size (H, W) -> proposal logits (B, K, N), refined boxes (B, K, N, 4) xyxy input pixels."""
        features, saliency = self.pool(class_features, saliency_logits, self.pooled_boxes(proposals, image_size),
                                       image_size)
        # The pooled tensors are fresh: without autograd they can be gated in place.
        needs_grad = torch.is_grad_enabled() and (features.requires_grad or saliency.requires_grad)
        return self.score(features, saliency, proposals, image_size, inplace=not needs_grad)

    def pool(
        self,
        class_features: torch.Tensor,
        saliency_logits: torch.Tensor,
        proposals: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled class features (B*N, K, C, s, s) and pooled sigmoid saliency (B*N, K, 1, s, s) of the
        proposals, float32, rows ordered image-major (row b*N + n)."""
        b, k, c, h, w = class_features.shape
        n = proposals.shape[0]
        # (B, N, K*C, s, s) and (B, N, K, s, s).
        pooled = self.pooler(class_features.reshape(b, k * c, h, w), proposals, image_size)
        pooled_saliency = self.pooler(torch.sigmoid(saliency_logits), proposals, image_size)
        s = pooled.shape[-1]
        return pooled.reshape(b * n, k, c, s, s), pooled_saliency.reshape(b * n, k, 1, s, s)

    def score(
        self,
        features: torch.Tensor,
        saliency: torch.Tensor,
        proposals: torch.Tensor,
        image_size: tuple[int, int],
        inplace: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features and saliency (``pool`` of ``pooled_boxes``: M = N or 2N boxes per image)
        -> proposal logits (B, K, N), refined boxes (B, K, N, 4).

        ``inplace`` gates ``features`` in place (overwriting it), saving a (B*N, K*C, s, s) allocation; only
        without autograd.
        """
        rows, k, c, s, _ = features.shape
        n = proposals.shape[0]
        m = 2 * n if self.reduction == "contrast" else n  # boxes pooled per image
        b = rows // m
        gated = features.mul_(saliency) if inplace else features * saliency
        if self.shared:  # every class's features through the one conv: (B*N*K, C, s, s)
            gated = gated.reshape(rows * k, c, s, s)
        else:  # channels-last storage (B*N, s, s, K*C) when the pooler gives it, which the conv keeps
            gated = gated.view(rows, k * c, s, s)
        if not torch.is_autocast_enabled(gated.device.type):  # (autocast casts for the conv itself)
            gated = gated.to(self.conv.weight.dtype)
        hidden = self.conv(gated)
        if self.reduction == "max":
            # Global max pool, then the activation: leaky ReLU is increasing, so act(max(x)) == max(act(x))
            # (the same values; the gradient goes to the same maximum), on 25x fewer values.
            hidden = self.activation(hidden.amax(dim=(2, 3)))
        else:
            hidden = self.activation(hidden).mean(dim=(2, 3))
        pooled = hidden.view(b, m, k, -1)  # (B, M, K, hidden)
        evidence = hidden = pooled[:, :n]  # (B, N, K, hidden): each proposal's own mean or max
        context = pooled[:, n:]
        if self.reduction == "contrast":
            evidence = hidden - context
        score_weight, delta_weight, delta_bias = self.score_weight, self.delta_weight, self.delta_bias
        if self.shared:
            score_weight, delta_weight, delta_bias = (
                w.expand(k, *w.shape[1:]) for w in (score_weight, delta_weight, delta_bias)
            )
        logits = torch.einsum("bnkd,kd->bkn", evidence, score_weight.to(hidden.dtype))
        deltas = torch.einsum("bnkd,kdo->bkno", hidden, delta_weight.to(hidden.dtype))
        deltas = deltas + delta_bias[None, :, None, :].to(hidden.dtype)
        refined = clip_boxes(self.box_coder.decode(deltas.float(), proposals[None, None]), image_size)
        return logits, refined
