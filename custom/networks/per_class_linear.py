"""Per-class BN-act-conv1x1 branches computed tile by tile, without K-fold copies of their input.

The authors' saliency head gives every class k its own BN-act-conv1x1 on the SAME pyramid features, then a
second BN-act-conv1x1 on that class's features. Written straightforwardly (repeat the pyramid K times,
BatchNorm over K*Q channels, activation, grouped 1x1 conv; then BatchNorm, activation, grouped conv) each
step writes and reads a full-size tensor: 235 MB per 512-px image for the first, 117 MB for the second, and
autograd keeps several of them. With the BatchNorm folded into a per-class affine map (its statistics are
computed beforehand), both branches are one primitive,

    out[p, k, :] = weight[k] @ leaky_relu(scale[k] * (x[p, k'] - centre[k']) + shift[k]) + bias[k]

(k' = 0 when x is shared by the classes, k' = k otherwise), which is evaluated here for a tile of pixels at
a time: the activations of one tile stay in the CPU cache, and the backward pass recomputes them from x
instead of storing them. The arithmetic is the same as the straightforward version's (the same products
and sums, in tiles), so results agree to float rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Activations held per tile: 2^20 elements (4 MiB in float32, about one CPU core's L2 cache) on the CPU;
# on a GPU tiles only bound the memory (2^27 elements, 256 MiB in bfloat16), and few launches remain.
CPU_TILE_ELEMENTS = 1 << 20
GPU_TILE_ELEMENTS = 1 << 27


def default_tile_pixels(device: torch.device, num_classes: int, in_channels: int) -> int:
    """Pixels per tile so that one tile's (pixels, K, Q) activations hold about the elements above."""
    elements = CPU_TILE_ELEMENTS if device.type == "cpu" else GPU_TILE_ELEMENTS
    return max(1, elements // (num_classes * in_channels))


def _centred_tile(x: torch.Tensor, centre: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """x[start:stop] - centre, class-major: (1 or K, tile, Q)."""
    tile = x[start:stop].transpose(0, 1)
    return tile if centre is None else tile - centre[:, None, :]


class _PerClassAffineLinear(torch.autograd.Function):
    """Autograd function behind :func:`per_class_affine_linear` (arguments as there, already cast).

    Tiles are worked on class-major, (K, tile, .): each step is one kernel (one batched GEMM for all classes),
    so a tile costs a handful of kernel launches and thread synchronisations whatever K.
    """

    @staticmethod
    def forward(ctx, x, centre, scale, shift, weight, bias, negative_slope: float, tile: int):
        pixels = x.shape[0]
        k, c, _ = weight.shape
        out = torch.empty(pixels, k, c, device=x.device, dtype=weight.dtype)
        weight_t = weight.transpose(1, 2)  # (K, Q, C)
        scale3, shift3 = scale[:, None, :], shift[:, None, :]
        for start in range(0, pixels, tile):
            stop = min(start + tile, pixels)
            pre = torch.addcmul(shift3, _centred_tile(x, centre, start, stop), scale3)  # (K, tile, Q)
            act = F.leaky_relu_(pre, negative_slope).to(weight.dtype)
            # (K, tile, Q) @ (K, Q, C), plus the bias, into the (tile, K, C) rows of the output.
            torch.add(torch.bmm(act, weight_t).transpose(0, 1), bias, out=out[start:stop])
        ctx.save_for_backward(x, centre, scale, shift, weight)
        ctx.negative_slope = negative_slope
        ctx.tile = tile
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, centre, scale, shift, weight = ctx.saved_tensors
        need_x, need_centre, need_scale, need_shift, need_weight, need_bias = ctx.needs_input_grad[:6]
        pixels = x.shape[0]
        grad_out = grad_out.to(weight.dtype)
        # Parameter gradients accumulate over tiles in float32 at least, whatever the compute dtype.
        acc = torch.promote_types(weight.dtype, torch.float32)

        def zeros(like: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
            return (
                torch.zeros(like.shape, device=x.device, dtype=acc) if needed and like is not None else None
            )

        grad_x = torch.empty_like(x) if need_x else None
        grad_centre, grad_scale = zeros(centre, need_centre), zeros(scale, need_scale)
        grad_shift, grad_weight = zeros(shift, need_shift), zeros(weight, need_weight)
        grad_bias = grad_out.sum(dim=0, dtype=acc) if need_bias else None
        need_pre_grad = need_x or need_centre or need_scale or need_shift
        scale3, shift3 = scale[:, None, :], shift[:, None, :]
        for start in range(0, pixels, ctx.tile):
            stop = min(start + ctx.tile, pixels)
            centred = _centred_tile(x, centre, start, stop)  # (K or 1, tile, Q)
            pre = torch.addcmul(shift3, centred, scale3)  # (K, tile, Q), recomputed instead of stored
            grad_tile = grad_out[start:stop].transpose(0, 1)  # (K, tile, C)
            if need_weight:
                act = F.leaky_relu(pre, ctx.negative_slope).to(weight.dtype)
                if grad_weight.dtype == weight.dtype:
                    grad_weight.baddbmm_(grad_tile.transpose(1, 2), act)
                else:  # a low-precision product, accumulated in float32
                    grad_weight += torch.bmm(grad_tile.transpose(1, 2), act)
            if not need_pre_grad:
                continue
            grad_act = torch.bmm(grad_tile, weight).to(pre.dtype)  # (K, tile, Q)
            # leaky_relu's own backward kernel: grad where pre > 0, grad * slope elsewhere.
            grad_pre = torch.ops.aten.leaky_relu_backward(grad_act, pre, ctx.negative_slope, False)
            if need_x or need_centre:
                grad_centred = grad_pre * scale3
                if x.shape[1] == 1:  # x shared by the classes: its gradient sums theirs
                    grad_centred = grad_centred.sum(dim=0, keepdim=True)
                if need_x:
                    grad_x[start:stop] = grad_centred.transpose(0, 1)
                if need_centre:
                    grad_centre -= grad_centred.sum(dim=1)
            if need_scale:
                grad_scale += (grad_pre * centred).sum(dim=1)
            if need_shift:
                grad_shift += grad_pre.sum(dim=1)

        def cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
            return None if grad is None else grad.to(like.dtype)

        return (
            grad_x,
            cast(grad_centre, centre),
            cast(grad_scale, scale),
            cast(grad_shift, shift),
            cast(grad_weight, weight),
            cast(grad_bias, weight),
            None,
            None,
        )


def per_class_affine_linear(
    x: torch.Tensor,
    centre: Optional[torch.Tensor],
    scale: torch.Tensor,
    shift: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    negative_slope: float,
    tile_pixels: Optional[int] = None,
) -> torch.Tensor:
    """``out[p, k] = weight[k] @ leaky_relu(scale[k] * (x[p, k'] - centre[k']) + shift[k]) + bias[k]``.

    Args:
        x: (P, 1, Q) features shared by the K classes (k' = 0), or (P, K, Q) per class (k' = k); P pixels
            of all images in any order.
        centre: (1 or K, Q) as x's second dim, subtracted first (a BatchNorm's mean; None: zeros).
        scale, shift: (K, Q) the rest of the per-class affine map (a folded BatchNorm).
        weight: (K, C, Q) per-class linear map (a grouped 1x1 conv's weight); bias: (K, C).
        negative_slope: of the leaky ReLU.
        tile_pixels: pixels per tile (None: :func:`default_tile_pixels`). The result does not depend on it.

    Returns:
        (P, K, C). Under autocast the matrix products run in the autocast dtype (the output has it) and
        the affine map and activation in float32 at least, as BatchNorm does; otherwise in weight's dtype.
    """
    k, c, q = weight.shape
    if x.dim() != 3 or (x.shape[1] != 1 and x.shape[1] != k) or x.shape[2] != q:
        raise ValueError(f"x must be (P, 1, Q) or (P, K, Q) with K={k}, Q={q}; got {list(x.shape)}")
    if list(scale.shape) != [k, q] or list(shift.shape) != [k, q] or list(bias.shape) != [k, c]:
        raise ValueError(
            f"expected scale and shift ({k}, {q}), bias ({k}, {c}); got {list(scale.shape)}, "
            f"{list(shift.shape)}, {list(bias.shape)}"
        )
    if centre is not None and centre.shape != x.shape[1:]:
        raise ValueError(f"centre must be {list(x.shape[1:])}, got {list(centre.shape)}")
    # The casts stay outside the Function, so autograd carries the gradients back through them.
    affine_dtype = torch.promote_types(torch.promote_types(torch.float32, scale.dtype), x.dtype)
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        # TorchScript cannot hold a Python autograd.Function (nor query autocast), and torch.export cannot
        # trace its out= products: the same maths, plainly.
        compute_dtype = weight.dtype
        centred = x.to(affine_dtype) if centre is None else x.to(affine_dtype) - centre.to(affine_dtype)
        act = F.leaky_relu(scale.to(affine_dtype) * centred + shift.to(affine_dtype), negative_slope)
        out = torch.einsum("pkq,kcq->pkc", act.to(compute_dtype), weight.to(compute_dtype))
        return (out + bias.to(compute_dtype)).contiguous()
    tile = tile_pixels if tile_pixels is not None else default_tile_pixels(x.device, k, q)
    return _tiled(x, centre, scale, shift, weight, bias, negative_slope, tile, affine_dtype)


@torch.jit.unused
def _tiled(x, centre, scale, shift, weight, bias, negative_slope: float, tile: int, affine_dtype: torch.dtype):
    """The tiled autograd Function, under the caller's autocast dtype for the products (eager only)."""
    device_type = x.device.type
    compute_dtype = weight.dtype
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return _PerClassAffineLinear.apply(
            x,
            None if centre is None else centre.to(affine_dtype),
            scale.to(affine_dtype),
            shift.to(affine_dtype),
            weight.to(compute_dtype),
            bias.to(compute_dtype),
            float(negative_slope),
            int(tile),
        )
