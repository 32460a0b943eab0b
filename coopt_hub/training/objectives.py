"""Training objectives over the same backbone and the same two augmented views per sample.

- coopt: RELA on the optimized data. Backbone + linear head to the target width; loss
  1 - cosine(prediction, standardised target), averaged over the two views. ReLA's optional PCA
  of the targets down to the student's width is not applied: the linear head already maps the
  student's features to the full target width, and the targets keep every dimension a prior gave.
- byol: the paper's main SSL baseline (Grill et al. 2020): online backbone + projector + predictor,
  an EMA target backbone + projector, symmetric normalised-MSE loss between the views.
- supervised: cross-entropy on the labels, averaged over the two views (the upper bound).

Every objective sees the same views, so epochs, samples/s and wall-clock are comparable across
them. `forward` returns the loss so that accelerate's autocast and DDP wrappers cover the whole
computation; `backbone` is what the linear probe evaluates.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coopt_hub.errors import ConfigError

OBJECTIVES = ("coopt", "byol", "supervised")


@dataclass(frozen=True)
class ByolConfig:
    """The BYOL paper's settings: 4096-wide hidden layers, 256-d projections, tau from 0.996 to 1."""

    hidden_dim: int = 4096
    projection_dim: int = 256
    base_momentum: float = 0.996


class Objective(nn.Module, ABC):
    backbone: nn.Module

    @abstractmethod
    def forward(
        self, views: torch.Tensor, targets: torch.Tensor | None, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Loss of a batch. views: [2B, 3, S, S], two views stacked; targets [B, dim]; labels [B]."""

    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with the run's progress in [0, 1]."""


def target_statistics(targets: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std of the targets, accumulated in float64 over row chunks."""
    total = np.zeros(targets.shape[1])
    squares = np.zeros(targets.shape[1])
    for start in range(0, targets.shape[0], chunk):
        block = targets[start : start + chunk].double().numpy()
        total += block.sum(axis=0)
        squares += (block**2).sum(axis=0)
    n = max(targets.shape[0], 1)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    # A constant dimension carries no information; dividing by ~0 would only amplify fp16 noise.
    std = np.where(std > 1e-6, std, 1.0)
    return torch.from_numpy(mean).float(), torch.from_numpy(std).float()


class CoOptObjective(Objective):
    def __init__(self, backbone: nn.Module, feature_dim: int, targets: torch.Tensor):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, targets.shape[1])
        mean, std = target_statistics(targets)
        # Buffers, so a checkpoint carries the standardisation it was trained with.
        self.register_buffer("target_mean", mean)
        self.register_buffer("target_std", std)

    def forward(self, views, targets, labels):
        if targets is None:
            raise ConfigError("the coopt objective needs targets", hint="Load a merged CoOpt dataset.")
        prediction = self.head(self.backbone(views)).float()
        goal = ((targets.float() - self.target_mean) / self.target_std).repeat(2, 1)
        return (1 - F.cosine_similarity(prediction, goal, dim=1)).mean()


class SupervisedObjective(Objective):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, views, targets, labels):
        if labels is None:
            raise ConfigError("the supervised objective needs labels", hint="Use a dataset with a label column.")
        logits = self.head(self.backbone(views)).float()
        return F.cross_entropy(logits, labels.repeat(2))


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


class ByolObjective(Objective):
    def __init__(self, backbone: nn.Module, feature_dim: int, config: ByolConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.projector = _mlp(feature_dim, config.hidden_dim, config.projection_dim)
        self.predictor = _mlp(config.projection_dim, config.hidden_dim, config.projection_dim)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self._target_parameters():
            p.requires_grad_(False)
        self.momentum = config.base_momentum

    def _target_parameters(self):
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def forward(self, views, targets, labels):
        prediction = self.predictor(self.projector(self.backbone(views))).float()
        with torch.no_grad():
            target = self.target_projector(self.target_backbone(views)).float()
        # Symmetric loss: view 1's prediction against view 2's target, and the reverse.
        target = torch.cat(target.chunk(2)[::-1])
        return 2 * (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        # tau rises from base_momentum to 1 on a cosine schedule over the run (BYOL eq. in sec. 3.2).
        base = self.config.base_momentum
        self.momentum = 1 - (1 - base) * (math.cos(math.pi * min(progress, 1.0)) + 1) / 2
        online = list(self.backbone.parameters()) + list(self.projector.parameters())
        torch._foreach_lerp_(list(self._target_parameters()), online, 1 - self.momentum)
        # Batch-norm statistics are not learned; the target network uses the online ones.
        for source, target in (
            (self.backbone, self.target_backbone),
            (self.projector, self.target_projector),
        ):
            for b_online, b_target in zip(source.buffers(), target.buffers()):
                b_target.copy_(b_online)


def build_objective(
    name: str,
    backbone: nn.Module,
    feature_dim: int,
    *,
    targets: torch.Tensor | None = None,
    num_classes: int | None = None,
    byol: ByolConfig | None = None,
) -> Objective:
    if name == "coopt":
        if targets is None:
            raise ConfigError("the coopt objective needs targets", hint="Load a merged CoOpt dataset.")
        return CoOptObjective(backbone, feature_dim, targets)
    if name == "supervised":
        if not num_classes:
            raise ConfigError(
                "the supervised objective needs labels, and this dataset has no label column",
                hint="Use --objective coopt or byol, or a source dataset with labels.",
            )
        return SupervisedObjective(backbone, feature_dim, num_classes)
    if name == "byol":
        return ByolObjective(backbone, feature_dim, byol or ByolConfig())
    raise ConfigError(f"unknown objective {name!r}", hint=f"Choose one of {', '.join(OBJECTIVES)}.")
