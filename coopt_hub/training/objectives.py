"""Training objectives over the same backbone, each with its own two augmented views per sample.

- coopt: RELA on the optimized data. Backbone + linear head to the target width; loss
  1 - cosine(prediction, standardised target), averaged over the two views. ReLA's optional PCA
  of the targets down to the student's width is not applied: the linear head already maps the
  student's features to the full target width, and the targets keep every dimension a prior gave.
- byol: the paper's main SSL baseline (Grill et al. 2020): online backbone + projector + predictor,
  a momentum (EMA) target backbone + projector, symmetric normalised-MSE loss between the views,
  on BYOL's own augmentations (augment.BYOL_VIEWS).
- supervised: cross-entropy on the labels, averaged over the two views (the upper bound).

coopt and supervised see RELA's views (augment.RELA_VIEWS), byol its own; `views_for` says which,
and every result records them. Epochs, samples/s and wall-clock stay comparable: every objective
passes two views of each sample through the backbone. `forward` returns the loss so that
accelerate's autocast and DDP wrappers cover the whole computation; `backbone` is what the linear
probe evaluates.
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
from coopt_hub.training.augment import BYOL_VIEWS, RELA_VIEWS, ViewPair

OBJECTIVES = ("coopt", "byol", "supervised")
MOMENTUM_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class ByolConfig:
    """BYOL's heads and momentum. The defaults are ReLA's BYOL baseline (LINs-lab/ReLA, methods/byol.py),
    the SSL reference of the CoOpt paper: MLP hidden layers twice the backbone's feature width,
    256-d projections, and a fixed momentum of 0.99.

    The BYOL paper's own settings are hidden_dim=4096, base_momentum=0.996 and the "cosine" schedule
    (tau rises to 1 over the run). Over a short run that schedule barely moves the target network
    (132 steps from 0.996 move it ~23% of the way from its initialisation; a fixed 0.99 moves it
    ~73%), which is why the short runs here default to ReLA's.
    """

    hidden_dim: int | None = None  # None: 2 x the backbone's feature width
    projection_dim: int = 256
    base_momentum: float = 0.99
    momentum_schedule: str = "constant"  # constant | cosine

    def __post_init__(self) -> None:
        if self.momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ConfigError(f"unknown momentum schedule {self.momentum_schedule!r}",
                              hint=f"Choose one of {', '.join(MOMENTUM_SCHEDULES)}.")
        if not 0.0 <= self.base_momentum < 1.0:
            raise ConfigError(f"the BYOL momentum must lie in [0, 1), got {self.base_momentum}",
                              hint="Pass e.g. --byol-momentum 0.99 (ReLA) or 0.996 (BYOL).")
        if (self.hidden_dim is not None and self.hidden_dim <= 0) or self.projection_dim <= 0:
            raise ConfigError("BYOL head sizes must be positive", hint="Pass positive --byol-hidden-dim and "
                              "--byol-projection-dim (or leave --byol-hidden-dim out: 2x the feature width).")

    def momentum(self, progress: float) -> float:
        """The target network's momentum tau after `progress` (in [0, 1]) of the run.

        cosine (BYOL sec. 3.2): tau = 1 - (1 - base) (cos(pi progress) + 1) / 2, from base to 1.
        """
        if self.momentum_schedule == "constant":
            return self.base_momentum
        done = min(max(progress, 0.0), 1.0)
        return 1 - (1 - self.base_momentum) * (math.cos(math.pi * done) + 1) / 2

    def hidden_width(self, feature_dim: int) -> int:
        return self.hidden_dim or 2 * feature_dim


def views_for(objective: str) -> ViewPair:
    """The augmentations an objective trains with unless a run sets its own."""
    return BYOL_VIEWS if objective == "byol" else RELA_VIEWS


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
        hidden = config.hidden_width(feature_dim)
        self.projector = _mlp(feature_dim, hidden, config.projection_dim)
        self.predictor = _mlp(config.projection_dim, hidden, config.projection_dim)
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
        self.momentum = self.config.momentum(progress)
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
