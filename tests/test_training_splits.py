"""Which rows training reads: the plan's split (named in the manifest), never another split of the
same name-space; and an evaluation split that is never the training split, chosen by a stated rule,
with no silent hold-out. Merged datasets are written by hand to the suite's hub (the layout of
docs/design.md), so the reading side is checked on its own."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.numpy import save

from coopt_hub.errors import ConfigError
from coopt_hub.training import ProbeConfig, TrainConfig, TrainingDataError, load_training_data, train
from coopt_hub.training.data import choose_eval_split
from coopt_hub.training.probe import probe_splits

ROWS = 48
DIM = 8
SIZE = 8
FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
RECIPES = Path(__file__).parents[1] / "recipes"


def _split(labels: np.ndarray, shade: int, ids: bool = False, targets: bool = False) -> bytes:
    """A parquet split of flat grey images (brightness `shade` + label) with the given labels."""
    from PIL import Image

    images = [Image.new("RGB", (SIZE, SIZE), (shade + int(y),) * 3) for y in labels]
    table = datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=FEATURES)
    if ids:
        table = table.add_column("id", list(range(len(labels))))
    if targets:
        table = table.add_column("target", [[0.0] * DIM] * len(labels))
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    return buffer.getvalue()


def _merged(hf_api, new_repo_id, split: str, others: dict[str, int], recorded: list[str] | None = None) -> tuple:
    """A copy-mode merge planned on `split`, next to the splits in `others` (name -> shade). Returns
    (repo, the planned split's labels)."""
    from huggingface_hub import CommitOperationAdd

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, ROWS)
    operations = [CommitOperationAdd(f"data/{split}-00000-of-00001.parquet", _split(labels, 100, True, True))]
    for name, shade in others.items():
        # The same ids with other labels: a loader that read this split would disagree with the targets.
        operations.append(CommitOperationAdd(f"data/{name}-00000-of-00001.parquet",
                                             _split((labels + 1) % 10, shade, True, True)))
    ids = np.arange(ROWS)
    targets = np.eye(DIM, dtype=np.float16)[labels % DIM]
    manifest = {"images": "copy", "dim": DIM, "label_column": "label",
                "source": {"repo": "org/source", "revision": "0" * 40, "split": split, "image_column": "image"}}
    if recorded is not None:
        manifest["splits"] = {name: {"files": [], "num_rows": ROWS} for name in recorded}
    operations += [
        CommitOperationAdd("targets/train.safetensors", save({"ids": ids[::-1].copy(), "targets": targets[::-1].copy()})),
        CommitOperationAdd("coopt/manifest.json", json.dumps(manifest).encode()),
    ]
    repo = new_repo_id("splits")
    hf_api.create_repo(repo, repo_type="dataset")
    hf_api.create_commit(repo, operations, commit_message="merge", repo_type="dataset")
    return repo, labels


def test_training_reads_the_plans_split_even_when_train_exists(hf_api, new_repo_id):
    repo, labels = _merged(hf_api, new_repo_id, "unlabeled", {"train": 50, "test": 150})
    data = load_training_data(repo, image_size=SIZE)
    np.testing.assert_array_equal(data.labels.numpy(), labels, err_msg="labels of another split than the targets")
    assert int(data.images[0, 0, 0, 0]) == 100 + labels[0], "images of another split"
    np.testing.assert_array_equal(data.targets["aligned"].numpy(), np.eye(DIM, dtype=np.float16)[labels % DIM])
    assert data.origin.train_split == "unlabeled"
    assert data.origin.eval_split == "test"
    assert data.origin.commit == hf_api.dataset_info(repo).sha
    assert int(data.test.images[0, 0, 0, 0]) == 150 + (labels[0] + 1) % 10


def test_another_training_split_is_refused(hf_api, new_repo_id):
    repo, _ = _merged(hf_api, new_repo_id, "unlabeled", {"train": 50, "test": 150})
    with pytest.raises(ConfigError, match="planned on split 'unlabeled'") as err:
        load_training_data(repo, image_size=SIZE, train_split="train")
    assert "--train-split unlabeled" in err.value.hint


def test_a_manifest_that_does_not_record_the_plans_split_is_refused(hf_api, new_repo_id):
    repo, _ = _merged(hf_api, new_repo_id, "unlabeled", {"test": 150}, recorded=["train", "test"])
    with pytest.raises(TrainingDataError, match="records only"):
        load_training_data(repo, image_size=SIZE)


@pytest.mark.parametrize("held_out", ["validation", "valid"])
def test_without_test_the_probe_uses_validation_then_valid(hf_api, new_repo_id, held_out):
    repo, _ = _merged(hf_api, new_repo_id, "train", {held_out: 150})
    data = load_training_data(repo, image_size=SIZE)
    assert data.origin.eval_split == held_out
    assert data.test.images.shape[0] == ROWS


def test_no_evaluation_split_is_an_error_that_names_the_choices(hf_api, new_repo_id):
    repo, _ = _merged(hf_api, new_repo_id, "unlabeled", {"train": 50, "extra": 200})
    with pytest.raises(TrainingDataError, match="no split to evaluate") as err:
        load_training_data(repo, image_size=SIZE)
    assert "--eval-split" in err.value.hint
    assert "extra" in err.value.hint and "train" in err.value.hint
    chosen = load_training_data(repo, image_size=SIZE, eval_split="extra")
    assert int(chosen.test.images[0, 0, 0, 0]) == 200 + int(chosen.test.labels[0])
    unevaluated = load_training_data(repo, image_size=SIZE, need_eval=False)
    assert unevaluated.test is None
    assert unevaluated.origin.eval_split is None


def test_the_training_split_is_never_the_evaluation_split(hf_api, new_repo_id):
    repo, _ = _merged(hf_api, new_repo_id, "train", {"test": 150})
    with pytest.raises(ConfigError, match="is the training split"):
        load_training_data(repo, image_size=SIZE, eval_split="train")
    with pytest.raises(ConfigError, match="no split 'holdout'") as err:
        load_training_data(repo, image_size=SIZE, eval_split="holdout")
    assert "test" in err.value.hint


def test_an_unknown_revision_is_the_hubs_error(hf_api, new_repo_id):
    from huggingface_hub.errors import RevisionNotFoundError

    repo, _ = _merged(hf_api, new_repo_id, "train", {"test": 150})
    with pytest.raises(RevisionNotFoundError):
        load_training_data(repo, "v9", image_size=SIZE)


def test_choose_eval_split_rule():
    assert choose_eval_split(["train", "validation", "test"], "train", None) == "test"
    assert choose_eval_split(["train", "valid", "validation"], "train", None) == "validation"
    assert choose_eval_split(["unlabeled", "train"], "unlabeled", None) is None, "train is never a default"
    assert choose_eval_split(["unlabeled", "train"], "unlabeled", "train") == "train"
    assert choose_eval_split(["test"], "test", None) is None, "not even when the plan is on test"


def test_no_silent_holdout(hf_api, new_repo_id):
    repo, _ = _merged(hf_api, new_repo_id, "train", {"extra": 150})
    data = load_training_data(repo, image_size=SIZE, need_eval=False)
    with pytest.raises(ConfigError, match="evaluation split"):
        probe_splits(data)
    config = TrainConfig(arch="test_resnet", objective="supervised", epochs=1, batch_size=16, eval_points=1,
                         probe=ProbeConfig(epochs=1))
    with pytest.raises(ConfigError, match="never scored") as err:
        train(config, data)
    assert "--eval-split" in err.value.hint
    torch.set_num_threads(1)
    result = train(TrainConfig(arch="test_resnet", objective="supervised", epochs=1, batch_size=16, eval_points=0),
                   data)
    assert result.accuracy is None, "without an evaluation split there is no accuracy to report"


@pytest.mark.parametrize("recipe", ["train_from_hub.py", "compare.py"])
def test_both_recipes_take_the_split_options(recipe):
    done = subprocess.run([sys.executable, str(RECIPES / recipe), "--help"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--train-split" in done.stdout
    assert "--eval-split" in done.stdout
