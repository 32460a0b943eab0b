"""Linear probe on frozen features: the evaluation METHOD.md prescribes (Adam, lr 3e-4).

Features of the un-augmented train and test images are extracted once per evaluation, standardised
with the train features' statistics, and a linear classifier is fitted with minibatch Adam on the
training device. A torch probe rather than sklearn's LogisticRegression: it follows the paper's
optimiser, runs on the GPU next to the features, and on the small sets used on CPU it takes well
under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from coopt_hub.core.progress import Progress, Silent
from coopt_hub.errors import ConfigError
from coopt_hub.training.augment import AugmentConfig, normalize
from coopt_hub.training.data import LabeledImages, TrainingData


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 100
    lr: float = 3e-4
    batch_size: int = 256
    weight_decay: float = 0.0
    feature_batch_size: int = 512


def probe_splits(data: TrainingData) -> tuple[LabeledImages, LabeledImages]:
    """(probe train, probe test): the training split and the evaluation split.

    Never a slice of the training split: the student saw those rows (the supervised one their
    labels), so a probe scored there would overstate what it learned.
    """
    if data.labels is None:
        raise ConfigError(
            "the linear probe needs labels and this dataset has none",
            hint="Evaluate on a dataset with a label column, or train without evaluation points.",
        )
    if data.test is None:
        raise ConfigError(
            "the linear probe needs an evaluation split, and this data has none",
            hint="Load the data with an evaluation split (--eval-split NAME), or pass --eval-points 0.",
        )
    return LabeledImages(data.images, data.labels), data.test


@torch.no_grad()
def extract_features(
    backbone: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device, augment: AugmentConfig
) -> torch.Tensor:
    """float32 [N, F] features of uint8 images, backbone in eval mode (restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [
            backbone(normalize(images[i : i + batch_size].to(device, non_blocking=True), augment)).float()
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks)


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    config: ProbeConfig,
    seed: int = 0,
    progress: Progress | None = None,
) -> float:
    """Test accuracy of a linear classifier trained on (train_x, train_y); a bar over the epochs."""
    device = train_x.device
    train_y = train_y.to(device)
    test_y = test_y.to(device)
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0).clamp_min(1e-6)
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = nn.Linear(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    n = train_x.shape[0]
    with torch.enable_grad(), (progress or Silent()).bar(config.epochs, "linear probe", unit="epoch") as bar:
        for _ in range(config.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for start in range(0, n, config.batch_size):
                rows = order[start : start + config.batch_size]
                loss = F.cross_entropy(classifier(train_x[rows]), train_y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            bar.update(1)
    with torch.no_grad():
        predictions = classifier(test_x).argmax(dim=1)
    return float((predictions == test_y).float().mean())


def evaluate_probe(
    backbone: nn.Module,
    data: TrainingData,
    *,
    device: torch.device,
    config: ProbeConfig,
    augment: AugmentConfig,
    seed: int = 0,
    progress: Progress | None = None,
) -> float:
    """Linear-probe test accuracy of the frozen `backbone` on `data` (`progress`: a bar over the probe's epochs)."""
    probe_train, probe_test = probe_splits(data)
    extract = dict(batch_size=config.feature_batch_size, device=device, augment=augment)
    train_x = extract_features(backbone, probe_train.images, **extract)
    test_x = extract_features(backbone, probe_test.images, **extract)
    return fit_linear_probe(
        train_x, probe_train.labels, test_x, probe_test.labels, data.num_classes, config, seed, progress
    )
