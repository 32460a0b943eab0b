"""A trained student leaves in timm's Hub format: `timm.create_model("hf-hub:ORG/NAME", pretrained=True)`
loads it from the hub (the suite's embedded one) with the features it had in training, its card
names where it came from, and its resume state (optimizer, RNG, step) stays in the checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from coopt_hub.errors import ConfigError
from coopt_hub.training import (
    RELA_VIEWS,
    DatasetOrigin,
    LabeledImages,
    ProbeConfig,
    TrainConfig,
    TrainingData,
    build_backbone,
    train,
)
from coopt_hub.training.augment import normalize
from coopt_hub.training.export import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, check_exportable
from coopt_hub.training.publish import push_student

SIZE = 16
ORIGIN = DatasetOrigin("org/digits-coopt", "v1", "c0ffee" * 6 + "c0ff", "train", "test")
RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def digits() -> TrainingData:
    from sklearn.datasets import load_digits

    loaded = load_digits()
    images = torch.from_numpy((loaded.images * 15.9).astype(np.uint8)).repeat_interleave(2, 1).repeat_interleave(2, 2)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(loaded.target)
    targets = np.eye(10)[loaded.target[:256]] @ np.random.default_rng(0).normal(size=(10, 16))
    return TrainingData(ids=torch.arange(256), images=images[:256], targets={"aligned": torch.from_numpy(targets).half()},
                        labels=labels[:256], test=LabeledImages(images[256:512], labels[256:512]), num_classes=10,
                        origin=ORIGIN)


def _config(tmp_path: Path, **changes) -> TrainConfig:
    base = TrainConfig(arch="test_resnet", small_stem=False, epochs=1, batch_size=64, eval_points=1, log_every=10**6,
                       seed=3, probe=ProbeConfig(epochs=5), output_dir=str(tmp_path / "checkpoints"),
                       student_dir=str(tmp_path / "student"), student_name="org/student")
    return dataclasses.replace(base, **changes)


def _features_from_checkpoint(config: TrainConfig, checkpoint: str, images: torch.Tensor) -> torch.Tensor:
    """The trained backbone's features, rebuilt from the resume checkpoint (the training model's own state)."""
    backbone, _ = build_backbone(config.backbone(SIZE))
    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    backbone.eval()
    with torch.no_grad():
        return backbone(images)


def test_student_loads_with_timm_from_the_hub_with_its_training_features(digits, tmp_path, hub, new_repo_id):
    torch.set_num_threads(1)
    config = _config(tmp_path)
    result = train(config, digits)
    student = Path(result.student)
    assert sorted(p.name for p in student.iterdir()) == [CARD_FILE, CONFIG_FILE, WEIGHTS_FILE]
    assert json.loads((student / CONFIG_FILE).read_text())["architecture"] == "test_resnet"

    repo = new_repo_id("student")
    push_student(hub, repo, student, "a student")
    model = timm.create_model(f"hf-hub:{repo}", pretrained=True)
    model.eval()
    assert model.pretrained_cfg["input_size"] == (3, SIZE, SIZE)
    assert tuple(model.pretrained_cfg["mean"]) == RELA_VIEWS.first.mean
    images = normalize(digits.test.images[:32], RELA_VIEWS.first)
    with torch.no_grad():
        loaded = model(images)
    expected = _features_from_checkpoint(config, result.checkpoint, images)
    torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5)


def test_the_card_names_dataset_revision_objective_seeds_and_accuracy(digits, tmp_path):
    torch.set_num_threads(1)
    result = train(_config(tmp_path, objective="byol", output_dir=None), digits)
    card = (Path(result.student) / CARD_FILE).read_text()
    front, body = card.split("---\n")[1:3]
    assert "library_name: timm" in front
    assert "- org/digits-coopt" in front, front
    assert "org/digits-coopt, revision v1 (commit " + ORIGIN.commit in body
    assert "Objective: byol" in body and "byol views" in body
    assert "Seeds: 3" in body
    assert f"Linear-probe accuracy: {result.accuracy:.4f} on split `test`" in body
    assert 'timm.create_model("hf-hub:org/student", pretrained=True)' in body


def test_resume_state_stays_out_of_the_student(digits, tmp_path):
    torch.set_num_threads(1)
    config = _config(tmp_path, eval_points=0)
    result = train(config, digits)
    weights = load_file(str(Path(result.student) / WEIGHTS_FILE))
    assert set(weights) == set(timm.create_model("test_resnet", num_classes=0).state_dict()), "not timm's key names"
    checkpoint = Path(result.checkpoint)
    assert (checkpoint / "optimizer.bin").is_file(), "the optimizer state belongs to the resume checkpoint"
    assert json.loads((checkpoint / "training_state.json").read_text())["loop"]["step"] == result.steps
    resumed = train(dataclasses.replace(config, epochs=2, resume=True), digits)
    assert resumed.steps == 2 * result.steps


def test_a_student_timm_cannot_rebuild_is_refused_before_training(digits, tmp_path):
    with pytest.raises(ConfigError, match="small-image stem") as err:
        check_exportable(_config(tmp_path, arch="resnet18", small_stem=True).backbone(32), RELA_VIEWS.first)
    assert "--no-small-stem" in err.value.hint
    # test_resnet's small stem only changes a stride: the weights would load, the features would not match.
    with pytest.raises(ConfigError, match="other features"):
        train(_config(tmp_path, small_stem=True), digits)
    assert not (tmp_path / "checkpoints").exists(), "it trained before refusing"


@pytest.mark.slow
def test_train_from_hub_pushes_a_loadable_student(hub, digits_source, new_collaboration, new_repo_id, tmp_path):
    from helpers_hub import FakePrior

    from coopt_hub.platform.merge.run import merge

    collab = new_collaboration(digits_source, "student-coopt", shards=2, anchors=64, dim=16)
    good = FakePrior("good", 24)
    first = collab.push(0, good)
    collab.push(1, FakePrior("other", 12, rank=12), reference=(0, good, first))
    dataset = merge(hub, collab.repo).repo
    name = new_repo_id("recipe-student")
    done = subprocess.run(
        [sys.executable, str(RECIPES / "train_from_hub.py"), "--dataset", dataset, "--revision", "v1",
         "--arch", "test_resnet", "--no-small-stem", "--image-size", "16", "--epochs", "1", "--batch-size", "64",
         "--probe-epochs", "5", "--output-dir", str(tmp_path / "student"), "--push-to-hub", name],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    card = (tmp_path / "student" / CARD_FILE).read_text()
    assert f"{dataset}, revision v1" in card and f"{result['accuracy']:.4f}" in card
    model = timm.create_model(f"hf-hub:{name}", pretrained=True)
    local = timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True)
    for a, b in zip(model.state_dict().values(), local.state_dict().values()):
        torch.testing.assert_close(a, b)
