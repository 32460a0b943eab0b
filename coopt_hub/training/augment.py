"""The two augmented views of each sample, applied to a whole batch at once on the training device.

Each objective has its own views (`ViewPair`): RELA's for the coopt and supervised objectives
(METHOD.md), BYOL's published pipeline for byol (Grill et al. 2020, table 6): stronger crops,
milder colour jitter, Gaussian blur and solarisation, asymmetric between the two views.

Per-sample random parameters are drawn on the CPU from a generator seeded per step (so a resumed
run sees exactly the views it would have seen), then every operation is one batched tensor op:
crop + resize + flip is a single affine `grid_sample`, colour jitter is per-sample scalars and a
per-sample 3x3 hue matrix, blur is one grouped convolution with per-sample kernels. Deliberate
differences from torchvision's per-image transforms, all to keep the batch in one kernel:
- the jitter operations run in a fixed order (brightness, contrast, saturation, hue) instead of a
  random permutation per image;
- hue is rotated in YIQ space (a linear map) rather than shifted in HSV; the two agree closely
  for the turns used here;
- a RandomResizedCrop box that does not fit is clamped to the image rather than re-drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
# BYOL blurs 224 px images with sigma in [0.1, 2.0] px and a 23 px kernel. Blur is kept relative
# to the image side, so that it removes the same share of detail at every size: at 32 px it is
# almost nothing, as in the CIFAR recipes of ReLA and solo-learn, which switch it off there.
_BYOL_SIDE = 224


@dataclass(frozen=True)
class AugmentConfig:
    """One view's augmentations. Defaults are RELA's (METHOD.md): RandomResizedCrop(0.5-1), flip,
    jitter(0.8, 0.8, 0.8, 0.2) p=0.8, grayscale p=0.2, no blur, no solarisation."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    # Gaussian sigma and kernel size as fractions of the image side (see _BYOL_SIDE).
    blur_sigma: tuple[float, float] = (0.1 / _BYOL_SIDE, 2.0 / _BYOL_SIDE)
    blur_kernel: float = 23 / _BYOL_SIDE
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # pixels at or above it (in [0, 1]) are inverted
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class ViewPair:
    """The augmentations of the first and the second view of every sample."""

    name: str
    first: AugmentConfig = field(default_factory=AugmentConfig)
    second: AugmentConfig = field(default_factory=AugmentConfig)


RELA_VIEWS = ViewPair("rela")
_BYOL_VIEW = AugmentConfig(scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
# BYOL's asymmetry: the first view is always blurred and never solarised, the second rarely blurred
# and solarised one time in five.
BYOL_VIEWS = ViewPair(
    "byol",
    first=replace(_BYOL_VIEW, blur_p=1.0, solarize_p=0.0),
    second=replace(_BYOL_VIEW, blur_p=0.1, solarize_p=0.2),
)


def normalize(images: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32, scaled to [0, 1] and standardised with the config's mean/std."""
    return _standardize(images.float().div_(255.0), config)


def _standardize(x: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
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


def _crop_boxes(n: int, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip as [n, 2, 3] affine maps in grid_sample's [-1, 1] coordinates."""
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
    return theta


@dataclass(frozen=True)
class _ColourDraws:
    """Per-sample colour parameters; identity values where a sample is not jittered."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    grayscale: torch.Tensor  # bool

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, config: AugmentConfig) -> _ColourDraws:
        jitter = torch.rand(n, generator=generator) < config.jitter_p
        return cls(
            brightness=torch.where(jitter, _uniform(n, 1 - config.brightness, 1 + config.brightness, generator), 1.0),
            contrast=torch.where(jitter, _uniform(n, 1 - config.contrast, 1 + config.contrast, generator), 1.0),
            saturation=torch.where(jitter, _uniform(n, 1 - config.saturation, 1 + config.saturation, generator), 1.0),
            hue=torch.where(jitter, _uniform(n, -config.hue, config.hue, generator), 0.0),
            grayscale=torch.rand(n, generator=generator) < config.grayscale_p,
        )


def _jitter(x: torch.Tensor, draws: _ColourDraws) -> torch.Tensor:
    n, device = x.shape[0], x.device

    def per_sample(v: torch.Tensor) -> torch.Tensor:
        return v.to(device).view(n, 1, 1, 1)

    x = (x * per_sample(draws.brightness)).clamp_(0, 1)
    mean_gray = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean_gray) * per_sample(draws.contrast) + mean_gray).clamp_(0, 1)
    gray = _gray(x)
    x = ((x - gray) * per_sample(draws.saturation) + gray).clamp_(0, 1)
    x = torch.einsum("bij,bjhw->bihw", _hue_matrices(draws.hue).to(device), x).clamp_(0, 1)
    return torch.where(per_sample(draws.grayscale), _gray(x).expand(-1, 3, -1, -1), x)


def blur_kernel_size(side: int, config: AugmentConfig) -> int:
    """The odd Gaussian kernel size for images of `side` pixels (at least 3)."""
    size = max(3, int(round(config.blur_kernel * side)))
    return size if size % 2 else size + 1


def _blur(x: torch.Tensor, sigma_px: torch.Tensor, size: int) -> torch.Tensor:
    """Separable Gaussian blur of each sample with its own sigma (in pixels); reflect padding."""
    n, channels, height, width = x.shape
    offsets = torch.arange(size, dtype=torch.float32) - size // 2
    kernels = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma_px[:, None] ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).to(x.device, x.dtype)
    weight = kernels.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel) group
    flat = x.reshape(1, n * channels, height, width)
    pad = size // 2
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), weight.view(-1, 1, 1, size), groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), weight.view(-1, 1, size, 1), groups=n * channels)
    return flat.view(n, channels, height, width)


def augment(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """One random view of each uint8 [B, 3, S, S] image, as a normalised float32 [B, 3, S, S].

    Order as in BYOL: crop + flip, colour jitter, grayscale, blur, solarisation.
    """
    n, _, height, width = images.shape
    device = images.device
    theta = _crop_boxes(n, generator, config)
    colours = _ColourDraws.draw(n, generator, config)
    blurred = torch.rand(n, generator=generator) < config.blur_p
    sigma = _uniform(n, *config.blur_sigma, generator) * max(height, width)
    solarized = torch.rand(n, generator=generator) < config.solarize_p

    x = images.float().div_(255.0)
    grid = F.affine_grid(theta.to(device), [n, 3, height, width], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = _jitter(x, colours)
    if blurred.any():
        size = blur_kernel_size(max(height, width), config)
        x = torch.where(blurred.to(device).view(n, 1, 1, 1), _blur(x, sigma.clamp_min(1e-3), size), x)
    if solarized.any():
        flip = solarized.to(device).view(n, 1, 1, 1) & (x >= config.solarize_threshold)
        x = torch.where(flip, 1 - x, x)
    return _standardize(x, config)


def two_views(
    images: torch.Tensor, generator: torch.Generator, first: AugmentConfig, second: AugmentConfig | None = None
) -> torch.Tensor:
    """Two views of each image, stacked as [view 1 of the batch; view 2] -> [2B, 3, S, S]; the second
    view uses `second` (default: the same augmentations as the first)."""
    if second is None or second == first:
        return augment(torch.cat([images, images]), generator, first)  # one kernel over both views
    return torch.cat([augment(images, generator, first), augment(images, generator, second)])
