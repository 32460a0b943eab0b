"""BYOL as published: its own augmentations (asymmetric between the views), its momentum, its head
sizes, and that it learns: on digits its probe clearly beats the same backbone left at random init."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from coopt_hub.errors import ConfigError
from coopt_hub.training import (
    BYOL_VIEWS,
    RELA_VIEWS,
    AugmentConfig,
    ByolConfig,
    ProbeConfig,
    TrainConfig,
    TrainingData,
    build_backbone,
    evaluate_probe,
    train,
)
from coopt_hub.training.augment import augment, normalize, two_views
from coopt_hub.training.data import LabeledImages
from coopt_hub.training.objectives import ByolObjective, views_for
from coopt_hub.training.stats import mean_interval

# Geometry and colour switched off: what is left of a view is the operation under test.
PLAIN = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)


def _ramps(n: int, size: int = 32) -> torch.Tensor:
    """uint8 images whose red channel is the x coordinate and green the y coordinate (0..255)."""
    ramp = torch.linspace(0, 255, size)
    image = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), 128.0)])
    return image.round().to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def _unnormalize(x: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    return x * torch.tensor(config.std).view(1, 3, 1, 1) + torch.tensor(config.mean).view(1, 3, 1, 1)


def test_byol_views_are_byols_and_differ_from_relas():
    assert views_for("byol") == BYOL_VIEWS
    assert views_for("coopt") == views_for("supervised") == RELA_VIEWS
    first, second = BYOL_VIEWS.first, BYOL_VIEWS.second
    assert first.scale == second.scale == (0.08, 1.0), "BYOL crops from 8% of the image"
    assert RELA_VIEWS.first.scale == (0.5, 1.0)
    assert (first.brightness, first.contrast, first.saturation, first.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (first.blur_p, second.blur_p) == (1.0, 0.1), "blur: always on the first view, rarely on the second"
    assert (first.solarize_p, second.solarize_p) == (0.0, 0.2), "solarisation on the second view only"
    assert RELA_VIEWS.first.blur_p == RELA_VIEWS.first.solarize_p == 0.0


def _crop_areas(config: AugmentConfig, n: int = 4000) -> np.ndarray:
    """Area of each view's crop box, read off the coordinate ramps it shows."""
    only_crop = dataclasses.replace(config, flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    x = _unnormalize(augment(_ramps(n), torch.Generator().manual_seed(0), only_crop), only_crop)
    width = x[:, 0].amax(dim=(1, 2)) - x[:, 0].amin(dim=(1, 2))
    height = x[:, 1].amax(dim=(1, 2)) - x[:, 1].amin(dim=(1, 2))
    return (width * height).numpy() * (32 / 31) ** 2  # pixel centres span 31/32 of the box


def test_crops_follow_the_configured_scale():
    byol, rela = _crop_areas(BYOL_VIEWS.first), _crop_areas(RELA_VIEWS.first)
    assert rela.min() > 0.45, "RELA crops keep at least half of the image"
    assert byol.min() < 0.15, "BYOL's crops reach down to 8% of the image"
    assert byol.min() > 0.06
    # Uniform areas on [0.08, 1], less the boxes clamped at the border: about 45% are below half the image.
    assert 0.35 < (byol < 0.5).mean() < 0.55, (byol < 0.5).mean()


def test_solarisation_inverts_the_bright_pixels_at_the_configured_rate():
    images = torch.randint(0, 256, (2000, 3, 8, 8), dtype=torch.uint8)
    always = dataclasses.replace(PLAIN, solarize_p=1.0)
    out = _unnormalize(augment(images, torch.Generator().manual_seed(1), always), always)
    x = images.float() / 255
    torch.testing.assert_close(out, torch.where(x >= 0.5, 1 - x, x), atol=1e-5, rtol=0)

    second = dataclasses.replace(BYOL_VIEWS.second, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                                 grayscale_p=0.0, blur_p=0.0)
    out = _unnormalize(augment(images, torch.Generator().manual_seed(2), second), second)
    changed = (out - x).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert 0.15 < changed.float().mean() < 0.25, f"solarised {changed.float().mean():.3f} of views, not 20%"


def test_blur_is_a_gaussian_of_the_configured_width():
    from torchvision.transforms.functional import gaussian_blur

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    sigma_px = 1.5
    blur = dataclasses.replace(PLAIN, blur_p=1.0, blur_sigma=(sigma_px / 32, sigma_px / 32), blur_kernel=7 / 32)
    out = _unnormalize(augment(images, torch.Generator().manual_seed(3), blur), blur)
    expected = gaussian_blur(images.float() / 255, kernel_size=[7, 7], sigma=[sigma_px, sigma_px])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)

    never = dataclasses.replace(PLAIN, blur_p=0.0)
    torch.testing.assert_close(augment(images, torch.Generator().manual_seed(3), never), normalize(images, never),
                               atol=1e-5, rtol=0)


def test_the_two_byol_views_are_augmented_differently():
    bright = torch.randint(160, 256, (1000, 3, 16, 16), dtype=torch.uint8)  # every pixel above the threshold
    first, second = (dataclasses.replace(view, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                                         grayscale_p=0.0) for view in (BYOL_VIEWS.first, BYOL_VIEWS.second))
    views = _unnormalize(two_views(bright, torch.Generator().manual_seed(4), first, second), first)
    assert views.shape == (2000, 3, 16, 16)
    solarised = views.amax(dim=(1, 2, 3)) < 0.45  # a solarised bright image is dark everywhere
    assert not solarised[:1000].any(), "the first view is never solarised"
    assert 0.15 < solarised[1000:].float().mean() < 0.25, "the second view is solarised one time in five"


def test_momentum_schedules():
    rela = ByolConfig()
    assert (rela.base_momentum, rela.momentum_schedule) == (0.99, "constant")
    assert [rela.momentum(p) for p in (0.0, 0.5, 1.0)] == [0.99, 0.99, 0.99]
    byol = ByolConfig(base_momentum=0.996, momentum_schedule="cosine")
    assert byol.momentum(0.0) == pytest.approx(0.996)
    assert byol.momentum(0.5) == pytest.approx(0.998)
    assert byol.momentum(1.0) == pytest.approx(1.0)
    taus = [byol.momentum(p) for p in np.linspace(0, 1, 11)]
    assert taus == sorted(taus), "tau only rises"
    with pytest.raises(ConfigError):
        ByolConfig(momentum_schedule="linear")
    with pytest.raises(ConfigError):
        ByolConfig(base_momentum=1.0)


def test_target_network_moves_by_one_minus_tau():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    objective = ByolObjective(backbone, 8, ByolConfig(base_momentum=0.9))
    assert objective.projector[0].out_features == 16, "hidden width: 2x the feature width by default (ReLA)"
    assert objective.projector[-1].out_features == 256
    target_before = objective.target_backbone[1].weight.detach().clone()
    with torch.no_grad():
        backbone[1].weight.add_(1.0)
    objective.after_step(0.3)
    expected = 0.9 * target_before + 0.1 * backbone[1].weight
    torch.testing.assert_close(objective.target_backbone[1].weight, expected)
    assert ByolObjective(backbone, 8, ByolConfig(hidden_dim=32)).predictor[0].out_features == 32


def _digits(rows: int, test_rows: int, size: int) -> TrainingData:
    from coopt_hub.demo.sample_data import digits_images

    images, labels = digits_images(size)
    pixels = torch.from_numpy(np.stack([np.asarray(i) for i in images[: rows + test_rows]])).permute(0, 3, 1, 2)
    labels = torch.from_numpy(labels[: rows + test_rows])
    return TrainingData(ids=torch.arange(rows), images=pixels[:rows].contiguous(), targets={}, labels=labels[:rows],
                        test=LabeledImages(pixels[rows:].contiguous(), labels[rows:]), num_classes=10)


@pytest.mark.slow
def test_byol_learns_on_digits():
    """Three seeds: each BYOL-trained ResNet-18 against the same network at its random initialisation."""
    torch.set_num_threads(1)
    data = _digits(480, 300, 32)
    probe = ProbeConfig(epochs=100)
    gains = []
    for seed in range(3):
        config = TrainConfig(arch="resnet18", objective="byol", small_stem=False, epochs=3, batch_size=64,
                             eval_points=1, seed=seed, log_every=10**6, probe=probe)
        torch.manual_seed(seed)  # as train() seeds before it builds the backbone: the same initial weights
        untrained, _ = build_backbone(config.backbone(data.image_size))
        baseline = evaluate_probe(untrained, data, device=torch.device("cpu"), config=probe,
                                  augment=BYOL_VIEWS.first, seed=seed)
        result = train(config, data)
        assert result.views["name"] == "byol"
        assert result.byol == dataclasses.asdict(ByolConfig())
        assert result.epoch_losses[-1] < result.epoch_losses[0], result.epoch_losses
        gains.append(result.accuracy - baseline)
    interval = mean_interval(gains)
    assert interval.low > 0.1, f"BYOL's probe gain over random init: {interval.text()} ({gains})"
