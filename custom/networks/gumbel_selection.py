"""Selection of one proposal per class and the gradient estimators that train it (paper Sec. 3.2).

Two estimators of the gradient of the expected crop loss with respect to the proposal confidences:

- ``straight_through`` (the paper's): one hard Gumbel-max sample, whose backward is that of the Gumbel-Softmax
  relaxation (Jang et al. 2017). Biased: the hard sample is argmax(logits + g) at any temperature, and the
  relaxed gradient need not point where the expected loss falls (``tests/test_selection_estimators.py`` measures
  it on a problem whose expected loss is exact).
- ``reinforce``: S samples per class from softmax(logits), the same distribution as the straight-through's hard
  sample; the confidences get the score-function gradient (L_s - b_s) grad log p(s) with a leave-one-out
  baseline b_s (the mean loss of the other S - 1 samples), which is unbiased. The refined boxes of the samples
  keep their pathwise gradient through the differentiable crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ESTIMATORS = ("straight_through", "reinforce")


def straight_through_gumbel_softmax(
    logits: torch.Tensor, temperature: float | torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One-hot sample over the last dim whose gradient is that of the Gumbel-softmax relaxation.

    Forward: one_hot(argmax(logits + g)), g ~ Gumbel(0, 1). Backward: the gradient of
    softmax((logits + g) / temperature). Input (..., N) -> output (..., N), exactly one 1 per row. The
    temperature may be a 0-dim tensor on the logits' device (no host synchronisation).
    """
    uniform = torch.rand(logits.shape, device=logits.device, dtype=torch.float32, generator=generator)
    # Clamping keeps log(-log(u)) finite at u = 0 or 1.
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1 - 1e-7)))
    soft = F.softmax((logits.float() + gumbel) / temperature, dim=-1)
    hard = F.one_hot(soft.argmax(dim=-1), logits.shape[-1]).to(soft.dtype)
    return (hard - soft.detach() + soft).to(logits.dtype)


def sample_proposals(
    logits: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` independent draws per row from softmax(logits), with replacement.

    Args:
        logits: (..., N) confidence logits.
        num_samples: S.

    Returns:
        indices (..., S) int64 and their log-probabilities (..., S) float32 (differentiable in ``logits``).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    log_p = F.log_softmax(logits.float(), dim=-1)
    rows = log_p.detach().exp().reshape(-1, logits.shape[-1])
    indices = torch.multinomial(rows, num_samples, replacement=True, generator=generator)
    indices = indices.view(*logits.shape[:-1], num_samples)
    return indices, log_p.gather(-1, indices)


def leave_one_out_advantage(losses: torch.Tensor) -> torch.Tensor:
    """L_s minus the mean loss of the other samples, over the last dim (S >= 2), without gradient."""
    samples = losses.shape[-1]
    if samples < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per class")
    losses = losses.detach()
    baseline = (losses.sum(dim=-1, keepdim=True) - losses) / (samples - 1)
    return losses - baseline


def score_function_surrogate(losses: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """A zero-valued scalar whose gradient is the REINFORCE estimate of grad E[loss].

    Args:
        losses: (..., S) per-sample losses (their gradient is not used here).
        log_probs: (..., S) log-probabilities of the samples.

    Returns:
        mean(advantage * (log p - stop_gradient(log p))): 0 in value, so a logged loss stays the loss; its
        gradient is mean(advantage * grad log p), matching ``losses.mean()``'s normalisation.
    """
    advantage = leave_one_out_advantage(losses)
    return (advantage * (log_probs - log_probs.detach())).mean()


class GumbelProposalSelector(nn.Module):
    """Selects one proposal per (image, class) from confidence logits.

    Training: straight-through Gumbel-Softmax at ``temperature`` (annealed by the training schedule).
    Evaluation: the top-1 proposal, no noise (deterministic).

    ``forward(proposal_logits (B, K, N), temperature)`` -> one-hot selection (B, K, N).
    """

    # The detection module runs eagerly (or exported by torch.export), not in a scripted model: TorchScript
    # compiles the image-logit path of RpSalProbabilities and leaves this forward out.
    @torch.jit.unused
    def forward(self, proposal_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.training:
            return straight_through_gumbel_softmax(proposal_logits, temperature)
        return F.one_hot(proposal_logits.argmax(dim=-1), proposal_logits.shape[-1]).to(proposal_logits.dtype)


def select_boxes(selection: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The selected box of each class: selection (B, K, N) one-hot, boxes (B, K, N, 4) -> (B, K, 4).

    A weighted sum rather than indexing, so the gradient reaches both the selection and the boxes.
    """
    # In float32 at least even under autocast: bfloat16 would round 512-px coordinates to 2 px.
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    with torch.autocast(boxes.device.type, enabled=False):
        return torch.einsum("bkn,bkno->bko", selection.to(dtype), boxes.to(dtype))


def gather_boxes(indices: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The boxes of sampled proposals: indices (B, K, S), boxes (B, K, N, 4) -> (B, K, S, 4), float32 at
    least; the gradient reaches the boxes (pathwise), not the indices."""
    dtype = torch.promote_types(boxes.dtype, torch.float32)
    return boxes.to(dtype).gather(2, indices[..., None].expand(*indices.shape, 4))


def proposal_pooling(proposal_logits: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Multiple-instance pooling of the N proposal confidences of each class to an image logit.

    LSE with sharpness r (WSDDN-style weak supervision of every proposal): (1/r) log mean_n exp(r c(n, k)),
    between the mean (r -> 0) and the max (r -> inf) of the confidences.

    ``proposal_logits (B, K, N)`` -> (B, K) float32.
    """
    n = proposal_logits.shape[-1]
    return (torch.logsumexp(sharpness * proposal_logits.float(), dim=-1) - math.log(n)) / sharpness
