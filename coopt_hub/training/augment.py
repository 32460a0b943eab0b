"""The RELA/BYOL augmentations, applied to a whole batch at once on the training device.

Per-sample random parameters are drawn on the CPU from a generator seeded per step (so a resumed
run sees exactly the views it would have seen), then every operation is one batched tensor op:
crop + resize + flip is a single affine `grid_sample`, colour jitter is per-sample scalars and a
per-sample 3x3 hue matrix. Two deliberate differences from torchvision's per-image transforms,
both to keep the batch in one kernel:
- the jitter operations run in a fixed order (brightness, contrast, saturation, hue) instead of a
  random permutation per image;
- hue is rotated in YIQ space (a linear map) rather than shifted in HSV; the two agree closely
  for the +-0.2 turn used here.
A RandomResizedCrop box that does not fit is clamped to the image rather than re-drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass(frozen=True)
class AugmentConfig:
    """Defaults are METHOD.md's: RandomResizedCrop(0.5-1), flip, jitter(0.8,0.8,0.8,0.2) p=0.8, gray p=0.2."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def normalize(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] and standardised with the config's mean/std."""
    x = images.float().div_(255.0)
    mean = torch.tensor(config.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 RGB matrices rotating chroma (I, Q) by `turns` of a full circle."""
    to_yiq = torch.tensor(_RGB_TO_YIQ)
    from_yiq = torch.linalg.inv(to_yiq)
    angle = turns * (2 * math.pi)
    rotation = torch.zeros(turns.shape[0], 3, 3)
    rotation[:, 0, 0] = 1.0
    rotation[:, 1, 1] = torch.cos(angle)
    rotation[:, 1, 2] = -torch.sin(angle)
    rotation[:, 2, 1] = torch.sin(angle)
    rotation[:, 2, 2] = torch.cos(angle)
    return from_yiq @ rotation @ to_yiq


def augment(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """One random view of each uint8 [B, 3, S, S] image, as a normalised float32 [B, 3, S, S]."""
    n, _, height, width = images.shape
    device = images.device

    # RandomResizedCrop + horizontal flip: the crop box, in grid_sample's [-1, 1] coordinates.
    area = _uniform(n, *config.scale, generator)
    log_ratio = _uniform(n, math.log(config.ratio[0]), math.log(config.ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    box_w = torch.sqrt(area * aspect).clamp(max=1.0)
    box_h = torch.sqrt(area / aspect).clamp(max=1.0)
    center_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - box_w)
    center_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - box_h)
    flip = torch.where(torch.rand(n, generator=generator) < config.flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = box_w * flip
    theta[:, 0, 2] = center_x
    theta[:, 1, 1] = box_h
    theta[:, 1, 2] = center_y

    # Colour jitter, applied to a `jitter_p` fraction of the batch (identity factors elsewhere).
    jitter = torch.rand(n, generator=generator) < config.jitter_p
    brightness = torch.where(jitter, _uniform(n, 1 - config.brightness, 1 + config.brightness, generator), 1.0)
    contrast = torch.where(jitter, _uniform(n, 1 - config.contrast, 1 + config.contrast, generator), 1.0)
    saturation = torch.where(jitter, _uniform(n, 1 - config.saturation, 1 + config.saturation, generator), 1.0)
    hue = torch.where(jitter, _uniform(n, -config.hue, config.hue, generator), 0.0)
    grayscale = torch.rand(n, generator=generator) < config.grayscale_p

    x = images.float().div_(255.0)
    grid = F.affine_grid(theta.to(device), [n, 3, height, width], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return v.to(device).view(n, 1, 1, 1)

    x = (x * per_sample(brightness)).clamp_(0, 1)
    mean_gray = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean_gray) * per_sample(contrast) + mean_gray).clamp_(0, 1)
    gray = _gray(x)
    x = ((x - gray) * per_sample(saturation) + gray).clamp_(0, 1)
    x = torch.einsum("bij,bjhw->bihw", _hue_matrices(hue).to(device), x).clamp_(0, 1)
    x = torch.where(per_sample(grayscale), _gray(x).expand(-1, 3, -1, -1), x)

    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def two_views(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """Two independent views of each image, stacked as [view 1 of the batch; view 2] -> [2B, 3, S, S]."""
    return augment(torch.cat([images, images]), generator, config)
