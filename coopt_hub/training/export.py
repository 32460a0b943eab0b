"""The trained student in timm's Hub format: config.json + model.safetensors (the backbone alone,
timm's own key names) + a model card, so that `timm.create_model("hf-hub:ORG/NAME", pretrained=True)`
rebuilds it with the trained weights and its preprocessing (input size, mean, std).

timm rebuilds a model from its name and constructor arguments only. A backbone changed after timm
built it (the small-image stem of CNNs: a 3x3 stride-1 first conv, no max-pool) cannot be rebuilt
that way, so every export is checked by loading it back through timm and comparing features: once
before training (on the untrained backbone, so a long run never ends in an unloadable export) and
once on the trained weights.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import ModelCard, ModelCardData
from timm.models import save_for_hf
from torch import nn

from coopt_hub.errors import ConfigError
from coopt_hub.training.augment import AugmentConfig
from coopt_hub.training.data import DatasetOrigin
from coopt_hub.training.models import BackboneConfig, build_backbone

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class StudentFacts:
    """What the model card states about a trained student."""

    arch: str
    objective: str
    targets: str | None  # aligned/raw for coopt
    seeds: tuple[int, ...]
    epochs: float
    image_size: int
    views: str
    accuracy: float | None  # the last linear-probe evaluation
    origin: DatasetOrigin | None
    hub_name: str | None = None  # ORG/NAME when it is pushed to the Hub


def _data_config(image_size: int, augment: AugmentConfig) -> dict:
    return {"input_size": (3, image_size, image_size), "mean": tuple(augment.mean), "std": tuple(augment.std),
            "crop_pct": 1.0, "interpolation": "bicubic"}


def _probe_input(image_size: int) -> torch.Tensor:
    return torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _same_features(a: nn.Module, b: nn.Module, images: torch.Tensor) -> bool:
    """Both in eval mode on the CPU in fp32, where the two computations are the same arithmetic."""
    a.eval(), b.eval()
    first, second = a(images).float(), b(images).float()
    return first.shape == second.shape and torch.allclose(first, second, rtol=1e-4, atol=1e-5)


def _cpu_copy(backbone: nn.Module) -> nn.Module:
    # A copy: the training model stays where it is. Contiguous: safetensors stores no channels-last strides.
    return copy.deepcopy(backbone).cpu().float().to(memory_format=torch.contiguous_format)


def load_student(directory: Path) -> nn.Module:
    """The student in `directory`, rebuilt by timm exactly as `timm.create_model("hf-hub:...")` does."""
    return timm.create_model(f"local-dir:{Path(directory).resolve()}", pretrained=True)


def _not_rebuildable(arch: str, reason: str) -> ConfigError:
    return ConfigError(
        f"timm cannot rebuild this {arch} student from its Hub config ({reason}): "
        "its small-image stem is changed after timm builds the model, and no timm argument expresses it",
        hint="Export a student timm rebuilds as trained: pass --no-small-stem (best with --image-size above 64), "
        "or a ViT such as --arch vit_tiny_patch16_224, whose small-image patches are timm arguments. "
        "The resume checkpoint (--output) keeps the weights either way.",
    )


def _write_weights(backbone: nn.Module, directory: Path, image_size: int, augment: AugmentConfig) -> None:
    save_for_hf(backbone, str(directory), safe_serialization=True, data_config=_data_config(image_size, augment))


def _verify(backbone: nn.Module, directory: Path, arch: str, images: torch.Tensor) -> None:
    try:
        rebuilt = load_student(directory)
    except RuntimeError as err:  # the state dict does not fit the model timm builds
        raise _not_rebuildable(arch, str(err).splitlines()[0]) from err
    if not _same_features(backbone, rebuilt, images):
        raise _not_rebuildable(arch, "it loads but computes other features")


def check_exportable(config: BackboneConfig, augment: AugmentConfig) -> None:
    """Raise ConfigError before training when timm could not rebuild this backbone from an export."""
    with torch.random.fork_rng(devices=[]):
        backbone, _ = build_backbone(config)
    with tempfile.TemporaryDirectory() as tmp:
        _write_weights(backbone, Path(tmp), config.image_size, augment)
        _verify(backbone, Path(tmp), config.arch, _probe_input(config.image_size))


def save_student(
    backbone: nn.Module, directory: Path, facts: StudentFacts, augment: AugmentConfig, images: torch.Tensor | None = None
) -> Path:
    """Write the student (timm format + card) to `directory` and check that timm loads it back with the
    same features on `images` (normalised float [B, 3, S, S]; default: random inputs)."""
    directory.mkdir(parents=True, exist_ok=True)
    student = _cpu_copy(backbone)
    _write_weights(student, directory, facts.image_size, augment)
    _verify(student, directory, facts.arch, _probe_input(facts.image_size) if images is None else images.cpu().float())
    (directory / CARD_FILE).write_text(str(student_card(facts, json.loads((directory / CONFIG_FILE).read_text()))))
    return directory


def student_card(facts: StudentFacts, config: dict) -> ModelCard:
    origin = facts.origin
    data = ModelCardData(library_name="timm", tags=["image-feature-extraction", "timm", "coopt-hub"],
                         datasets=[origin.repo] if origin else None)
    objective = facts.objective + (f" ({facts.targets} targets)" if facts.targets else "")
    accuracy = "not measured" if facts.accuracy is None else f"{facts.accuracy:.4f}"
    lines = [
        f"# {facts.arch} trained with {objective}",
        "",
        "A student backbone (no classifier) trained by coopt-hub's recipes.",
        "",
        f"- Dataset: {origin.repo}, revision {origin.revision} (commit {origin.commit})" if origin else
        "- Dataset: in-memory data (no Hub revision)",
        f"- Objective: {objective}, augmentations: {facts.views} views",
        f"- Seeds: {', '.join(str(s) for s in facts.seeds)}",
        f"- Training: {facts.epochs:.2f} epochs at {facts.image_size} px"
        + (f" on split `{origin.train_split}`" if origin else ""),
        f"- Linear-probe accuracy: {accuracy}"
        + (f" on split `{origin.eval_split}` (frozen features)" if origin and origin.eval_split else ""),
        f"- Features: {config.get('num_features')} wide; inputs {facts.image_size} px, normalised with the "
        "mean/std in config.json",
        "",
        "```python",
        "import timm",
        f'model = timm.create_model("hf-hub:{facts.hub_name or "ORG/NAME"}", pretrained=True)  # pooled features',
        "model.eval()",
        "```",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
