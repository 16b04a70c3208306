"""Build RpSalNet and run one forward pass on random input; print its parameter count and output shapes.

Usage: python scripts/smoke_network.py [--image_size 512] [--backbone densenet121] [--crop_backbone resnet34]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fire  # noqa: E402
import torch  # noqa: E402

from custom.networks.rpsal import RpSalNet  # noqa: E402


def smoke(image_size: int = 512, backbone: str = "densenet121", crop_backbone: str = "resnet34", batch: int = 1):
    """Construct the network on the CPU, run it once in eval mode and print what it returns."""
    torch.manual_seed(0)
    net = RpSalNet(backbone=backbone, crop_backbone=crop_backbone).eval()
    parameters = sum(p.numel() for p in net.parameters())
    print(f"RpSalNet({backbone}, {crop_backbone}): {parameters:,} parameters, {net.num_proposals} proposals")
    images = torch.randn(batch, 3, image_size, image_size)
    start = time.perf_counter()
    with torch.no_grad():
        output = net(images)
    print(f"forward of {tuple(images.shape)} in {time.perf_counter() - start:.2f} s")
    for name, value in output._asdict().items():
        print(f"  {name:16s} {tuple(value.shape)}")


if __name__ == "__main__":
    fire.Fire(smoke)
