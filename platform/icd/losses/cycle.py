"""Cycle loss: LPIPS over a 3x3 grid of 224-px patches of the decoded images (coefficient 1).

Production uses LPIPS with the ImageNet-pretrained VGG backbone. Offline (no torchvision
download possible) the backbone is random (``pnet_rand=True``); the metric is then named
``lpips_randvgg`` everywhere, so the two are never confused.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

PATCH = 224
MIN_SIDE = 64  # smaller images (the toy world's 32 px) are upsampled to this before VGG


class PatchLPIPS(torch.nn.Module):
    def __init__(self, pretrained_backbone: bool = True, grid: int = 3, patch: int = PATCH):
        super().__init__()
        import lpips

        with warnings.catch_warnings():  # lpips still calls torchvision's vgg16 with pretrained=; ours is no choice
            warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated", category=UserWarning)
            warnings.filterwarnings("ignore", message="Arguments other than a weight enum", category=UserWarning)
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
        self.lpips.eval().requires_grad_(False)
        self.grid, self.patch = grid, patch
        self.name = "lpips_vgg" if pretrained_backbone else "lpips_randvgg"

    def patch_starts(self, side: int) -> list[int]:
        """Top-left offsets of the grid along one axis: evenly spaced, covering the whole side."""
        size = min(self.patch, side)
        if self.grid == 1 or side == size:
            return [0]
        step = (side - size) / (self.grid - 1)
        return [round(i * step) for i in range(self.grid)]

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS over the patch grid; images in [-1, 1], (B, 3, H, W). Returns one value per image."""
        if images.shape != targets.shape:
            raise ValueError(f"shape mismatch: {tuple(images.shape)} vs {tuple(targets.shape)}")
        if min(images.shape[-2:]) < MIN_SIDE:
            scale = MIN_SIDE / min(images.shape[-2:])
            images = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            targets = F.interpolate(targets, scale_factor=scale, mode="bilinear", align_corners=False)
        height, width = images.shape[-2:]
        ph, pw = min(self.patch, height), min(self.patch, width)
        values = []
        for top in self.patch_starts(height):
            for left in self.patch_starts(width):
                a = images[..., top:top + ph, left:left + pw]
                b = targets[..., top:top + ph, left:left + pw]
                values.append(self.lpips(a.float(), b.float(), normalize=False).flatten())
        return torch.stack(values).mean(0)


def cycle_loss(lpips_module: PatchLPIPS, decoded: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Mean patch-grid LPIPS between the cycle's decoded images and its inputs (no grad to the inputs)."""
    return lpips_module(decoded, inputs.detach()).mean()
