"""Backbones: any timm architecture by name, returning pooled features (num_classes=0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from coopt_hub.errors import ConfigError
from coopt_hub.priors.timm import pretrained_overlay

# At or below this input size the ImageNet stem (stride 4 before the first stage) leaves too few
# pixels: a resnet18 at 32 px would end in a 1x1 map. The CIFAR convention shrinks the stem.
SMALL_IMAGE_MAX = 64


@dataclass(frozen=True)
class BackboneConfig:
    arch: str = "resnet18"
    image_size: int = 32
    # None: on when image_size <= SMALL_IMAGE_MAX. ResNets get a 3x3 stride-1 first conv and no
    # max-pool; other CNNs get stride 1 in their first strided conv; fixed-size models (ViTs) get
    # img_size=image_size and, unless kwargs set it, patches of image_size // 8 (an 8x8 token grid).
    small_stem: bool | None = None
    pretrained: bool = False  # timm's published weights for `arch` (ARCH or ARCH.TAG), from the weights endpoint
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model

    @property
    def uses_small_stem(self) -> bool:
        return self.image_size <= SMALL_IMAGE_MAX if self.small_stem is None else self.small_stem


def _first_strided_conv(module: nn.Module) -> nn.Conv2d | None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
            return m
    return None


def _shrink_stem(model: nn.Module) -> None:
    if isinstance(model, timm.models.resnet.ResNet):
        if isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (7, 7):
            model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        else:  # deep stems (resnet*d, test_resnet): a stack of 3x3 convs, the first strided
            conv = _first_strided_conv(model.conv1)
            if conv is not None:
                conv.stride = (1, 1)
        model.maxpool = nn.Identity()
        return
    conv = _first_strided_conv(model)
    if conv is not None:
        conv.stride = (1, 1)


def build_backbone(config: BackboneConfig) -> tuple[nn.Module, int]:
    """Create the timm model without a classifier; returns (model, feature width)."""
    if not timm.is_model(config.arch):
        raise ConfigError(
            f"timm has no architecture {config.arch!r}",
            hint="List names with `python -c \"import timm; print(timm.list_models('*resnet*'))\"`.",
        )
    kwargs = dict(config.kwargs)
    pretrained_cfg = timm.models.get_pretrained_cfg(config.arch)
    fixed_input = bool(pretrained_cfg and pretrained_cfg.fixed_input_size)
    if fixed_input:
        kwargs.setdefault("img_size", config.image_size)
        if config.uses_small_stem:
            kwargs.setdefault("patch_size", max(config.image_size // 8, 1))
    if config.pretrained:
        # From the weights endpoint (huggingface.co, or --weights-endpoint), never from HF_ENDPOINT:
        # that is the hub of the dataset, which holds no model repos. A failure names the URL.
        kwargs.setdefault("pretrained_cfg_overlay", pretrained_overlay(config.arch))
    try:
        model = timm.create_model(config.arch, pretrained=config.pretrained, num_classes=0, **kwargs)
    except TypeError as err:
        raise ConfigError(
            f"timm could not build {config.arch} with {kwargs}: {err}",
            hint="Drop or rename the --model-kwarg that the architecture does not accept.",
        ) from err
    if config.uses_small_stem and not fixed_input:
        _shrink_stem(model)
    return model, _feature_width(model, config)


def _feature_width(model: nn.Module, config: BackboneConfig) -> int:
    # num_features is not always the pooled output width (e.g. models with a conv head after it),
    # so measure it; this also fails early, with a clear message, when the input is too small.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, 3, config.image_size, config.image_size))
    except RuntimeError as err:
        raise ConfigError(
            f"{config.arch} cannot run on {config.image_size}px inputs: {err}",
            hint="Use a larger --image-size, or small_stem / --model-kwarg settings that suit small images.",
        ) from err
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise ConfigError(
            f"{config.arch} returns features of shape {tuple(out.shape)}, not [batch, width]",
            hint="Pick an architecture whose timm model pools its features (most do with num_classes=0).",
        )
    return int(out.shape[1])
