"""The bundle's inferer: the network's outputs the maps need, as MONAI inferers return them.

``network_def`` stays the model zoo's classifier (``forward`` -> (B, 14) probabilities, what TorchScript and
the zoo's checks see); ``RpSalInferer`` calls its ``outputs`` instead, so that every consumer of the declared
``inferer`` id (the bundle's evaluator, MONAI Label's stock ``BundleInferTask``, the evaluation) gets the
fields the paper's Fig. 2 is drawn from.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from monai.inferers import Inferer

# The RpSalOutput fields postprocessing reads, with their shapes for B images, K classes, N proposals and
# maps of h x w (S/4 of the S x S input).
OUTPUT_FIELDS = {
    "image_logits": "(B, K) logits y of the saliency branch (the paper's classifier)",
    "combined_logits": "(B, K) y + z, z of the crop classifier at the top-1 proposal",
    "saliency_logits": "(B, K, h, w) pre-sigmoid saliency maps",
    "proposal_logits": "(B, K, N) pre-sigmoid proposal confidences",
    "refined_boxes": "(B, K, N, 4) refined proposals, float xyxy in model-input pixels",
}


class RpSalInferer(Inferer):
    """Run RpSalProbabilities (``outputs``) or RpSalNet (``forward``) with the detection module.

    Args:
        amp: bfloat16 autocast on CUDA (outputs are returned in float32 either way).

    ``inferer(inputs, network)`` with ``inputs`` (B, 3, S, S) returns ``{field: tensor}`` for the fields of
    ``OUTPUT_FIELDS``, float32, on the network's device: a dict, so MONAI's ``decollate_batch`` splits it per
    image for the postprocessing transforms.
    """

    def __init__(self, amp: bool = False) -> None:
        super().__init__()
        self.amp = bool(amp)

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args, **kwargs) -> dict[str, torch.Tensor]:
        if inputs.ndim != 4:
            raise ValueError(f"RpSalInferer expects a (B, 3, S, S) batch, got shape {tuple(inputs.shape)}")
        function = getattr(network, "outputs", network)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and inputs.device.type == "cuda" else nullcontext()
        )
        with torch.no_grad(), autocast:
            output = function(inputs, *args, with_detection=True, **kwargs)
        if output.proposal_logits is None:
            raise ValueError(f"{type(network).__name__} gave no detection outputs")
        return {name: getattr(output, name).detach().float() for name in OUTPUT_FIELDS}
