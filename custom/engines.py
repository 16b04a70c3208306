"""Glue between MONAI's engines and RpSalNet: how a batch reaches the network."""

from __future__ import annotations

import torch
from monai.data import MetaTensor


class PrepareBatch:
    """``prepare_batch`` of the trainer and evaluators: (image (B, 3, S, S), label (B, K)) on the device.

    Images leave MONAI's MetaTensor for a plain tensor (the network needs no metadata, and plain tensors
    avoid per-op metadata bookkeeping) and take the channels-last layout when asked (faster convolutions
    with bf16 on CUDA). Labels become float32.
    """

    def __init__(self, channels_last: bool = False):
        self.channels_last = channels_last

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        images = batchdata["image"]
        labels = batchdata["label"]
        if isinstance(images, MetaTensor):
            images = images.as_tensor()
        if isinstance(labels, MetaTensor):
            labels = labels.as_tensor()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(device=device, non_blocking=non_blocking, memory_format=memory_format)
        labels = torch.as_tensor(labels).to(device=device, dtype=torch.float32, non_blocking=non_blocking)
        return images, labels
