"""The training library on tiny real data: sklearn's digits rendered as 16 px RGB images.

The targets are synthetic but honest about what they carry: a fixed random projection of the
one-hot label plus Gaussian noise, i.e. what a good prior's embedding of a digit looks like up to a
linear map. The "raw" targets imitate an unaligned merge: half of the rows (one "participant")
have their targets rotated by a random orthogonal matrix. The Hub test writes the merged layout
by hand (docs/design.md, "Hub layout") to the suite's local server (tests/conftest.py), so it
checks this library's reading side independently of `coopt-hub merge`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save, save_file
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from coopt_hub.errors import ConfigError, CoOptError
from coopt_hub.training import (
    BackboneConfig,
    ByolConfig,
    MissingTargetsError,
    ProbeConfig,
    TargetTable,
    TrainConfig,
    build_backbone,
    compare_objectives,
    evaluate_probe,
    format_table,
    join_on_id,
    load_training_data,
    prepare_training_data,
    read_targets_file,
    train,
)
from coopt_hub.training.augment import AugmentConfig, two_views

SIZE = 16
TRAIN_ROWS = 480
TEST_ROWS = 300
DIM = 32
ARCH = "test_resnet"  # timm's 0.4M-parameter ResNet: real code path, CPU-fast
FEATURES = datasets.Features(
    {"id": datasets.Value("int64"), "image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
)


def _config(**changes) -> TrainConfig:
    base = TrainConfig(
        arch=ARCH, epochs=1, batch_size=64, eval_points=1, log_every=1000,
        byol=ByolConfig(hidden_dim=128, projection_dim=32), probe=ProbeConfig(epochs=30),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models here are tiny: a second intra-op thread gains little, and on a busy shared host
    # threads that wait on each other at every op make the runs many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    digits = load_digits()
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray((img * 15.9).astype(np.uint8)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        for img in digits.images[: TRAIN_ROWS + TEST_ROWS]
    ]
    labels = digits.target[: TRAIN_ROWS + TEST_ROWS]
    aligned = np.eye(10)[labels] @ rng.normal(size=(10, DIM)) + 0.3 * rng.normal(size=(labels.size, DIM))
    rotation, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    raw = aligned.copy()
    raw[1::2] = raw[1::2] @ rotation
    train_ids = np.arange(TRAIN_ROWS)
    return {
        "train": datasets.Dataset.from_dict(
            {"id": train_ids, "image": images[:TRAIN_ROWS], "label": labels[:TRAIN_ROWS]}, features=FEATURES
        ),
        "test": datasets.Dataset.from_dict(
            {"id": np.arange(TEST_ROWS), "image": images[TRAIN_ROWS:], "label": labels[TRAIN_ROWS:]}, features=FEATURES
        ),
        "table": TargetTable(
            ids=train_ids, aligned=aligned[:TRAIN_ROWS].astype(np.float16), raw=raw[:TRAIN_ROWS].astype(np.float16)
        ),
    }


@pytest.fixture(scope="module")
def data(digits):
    return prepare_training_data(digits["train"], digits["table"], digits["test"], image_size=SIZE)


def test_targets_join_on_id_when_rows_are_shuffled(digits, tmp_path):
    table = digits["table"]
    path = tmp_path / "train.safetensors"
    order = np.random.default_rng(1).permutation(TRAIN_ROWS)  # the file in a different row order
    save_file({"ids": table.ids[order], "targets": table.aligned[order], "raw": table.raw[order]}, str(path))
    shuffled = digits["train"].shuffle(seed=2)
    data = prepare_training_data(shuffled, read_targets_file(path), digits["test"], image_size=SIZE)
    ids = data.ids.numpy()
    assert not np.array_equal(ids, np.arange(TRAIN_ROWS))
    np.testing.assert_array_equal(data.targets["aligned"].numpy(), table.aligned[ids])
    np.testing.assert_array_equal(data.targets["raw"].numpy(), table.raw[ids])
    np.testing.assert_array_equal(data.labels.numpy(), np.asarray(digits["train"]["label"])[ids])
    first = np.asarray(shuffled[0]["image"].convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(data.images[0].numpy(), first)


def test_missing_id_is_a_clear_error(digits):
    table = digits["table"]
    keep = table.ids != 7
    partial = TargetTable(ids=table.ids[keep], aligned=table.aligned[keep], raw=None)
    with pytest.raises(MissingTargetsError) as err:
        join_on_id(np.arange(TRAIN_ROWS), partial)
    assert isinstance(err.value, CoOptError)
    assert err.value.ids == [7]
    assert "7" in str(err.value)
    assert "--revision" in err.value.hint


def test_two_views_are_seeded_normalised_and_distinct(data):
    batch = data.images[:8]
    a = two_views(batch, torch.Generator().manual_seed(3), AugmentConfig())
    b = two_views(batch, torch.Generator().manual_seed(3), AugmentConfig())
    assert a.shape == (16, 3, SIZE, SIZE)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[:8], a[8:])


def test_small_images_get_a_small_stem():
    resnet, width = build_backbone(BackboneConfig("resnet18", image_size=32))
    assert width == 512, "resnet18: width"
    assert resnet.conv1.stride == (1, 1), "resnet18: the stem still strides"
    assert isinstance(resnet.maxpool, torch.nn.Identity), "resnet18: the stem still pools"
    vit, width = build_backbone(BackboneConfig("vit_tiny_patch16_224", image_size=32))
    assert width == 192, "vit_tiny: width"
    assert vit.patch_embed.grid_size == (8, 8), "vit_tiny: patch grid"


def test_coopt_loss_decreases_and_probe_beats_untrained(data):
    torch.manual_seed(0)
    untrained, _ = build_backbone(BackboneConfig(ARCH, image_size=SIZE))
    probe = ProbeConfig(epochs=30)
    baseline = evaluate_probe(untrained, data, device=torch.device("cpu"), config=probe, augment=AugmentConfig())
    result = train(_config(epochs=3, eval_points=3), data)
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.05, f"the loss did not decrease: {result.epoch_losses}"
    assert [round(p.epoch) for p in result.evals] == [1, 2, 3], "not one probe evaluation per epoch"
    # Chance is 0.1; the random-init features already separate digits well, so require a clear gain.
    assert result.accuracy > baseline + 0.05, f"no clear gain over the untrained backbone: {result.accuracy, baseline}"
    assert result.seconds > 0, "no time measured"
    assert result.samples == 3 * (TRAIN_ROWS // 64) * 64, "samples counted"


@pytest.mark.slow
def test_compare_runs_every_objective_at_both_budgets(data):
    rows = compare_objectives(data, _config(epochs=1, time_budget=0.5))
    assert [(r.variant, r.budget) for r in rows] == [
        (v, b) for b in ("epochs", "time") for v in ("coopt", "coopt-raw", "byol", "supervised")
    ]
    for row in rows:
        assert row.accuracy is not None, (row.variant, row.budget)
        assert 0.0 <= row.accuracy <= 1.0, (row.variant, row.budget)
        assert np.isfinite(row.result.epoch_losses).all(), (row.variant, row.budget)
    for row in rows[:4]:
        assert row.epochs == 1.0, (row.variant, row.budget)
    for row in rows[4:]:
        assert row.seconds >= 0.5, (row.variant, row.budget)
        assert row.result.steps >= 1, (row.variant, row.budget)
    assert rows[1].result.targets == "raw"
    assert rows[2].result.targets is None
    assert "coopt-raw" in format_table(rows).splitlines()[2]


def test_resume_continues_from_the_saved_step(data, tmp_path):
    straight = train(_config(epochs=2, eval_points=0, output_dir=str(tmp_path / "straight")), data)
    first = train(_config(epochs=1, eval_points=0, output_dir=str(tmp_path / "split")), data)
    assert first.steps == TRAIN_ROWS // 64, "steps of one epoch"
    resumed = train(_config(epochs=2, eval_points=0, output_dir=str(tmp_path / "split"), resume=True), data)
    assert resumed.steps == straight.steps == 2 * first.steps, "steps after resuming"
    assert resumed.epoch_losses[0] == pytest.approx(first.epoch_losses[0]), "the first epoch's loss was not kept"
    assert resumed.epoch_losses == pytest.approx(straight.epoch_losses, rel=1e-5), "losses differ from a straight run"
    # accelerate's save_state: the model's weights in model.safetensors, the optimizer and RNGs beside them.
    a, b = (load_file(str(Path(run.checkpoint) / "model.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys(), "the checkpoints hold other tensors"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda message, name=name: f"{name}: {message}")

    # Resuming a run with other settings is refused.
    with pytest.raises(ConfigError, match="different run"):
        train(_config(epochs=3, eval_points=0, lr=5e-4, output_dir=str(tmp_path / "split"), resume=True), data)


def test_config_errors_say_what_to_do(data):
    with pytest.raises(ConfigError) as err:
        TrainConfig(arch=ARCH)
    assert "--epochs" in err.value.hint
    unlabeled = dataclasses.replace(data, labels=None, test=None, num_classes=None)
    with pytest.raises(ConfigError, match="needs labels"):
        train(_config(objective="supervised"), unlabeled)


def _parquet(dataset: datasets.Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.to_parquet(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("images", ["copy", "reference"])
def test_load_training_data_from_the_hub(digits, hf_api, new_repo_id, images):
    from huggingface_hub import CommitOperationAdd

    rows = 64
    source_train, source_test = digits["train"].select(range(rows)), digits["test"].select(range(32))
    source = new_repo_id("source")
    hf_api.create_repo(source, repo_type="dataset")
    pinned = hf_api.create_commit(
        source, [CommitOperationAdd("data/train-00000-of-00001.parquet", _parquet(source_train.remove_columns("id"))),
                 CommitOperationAdd("data/test-00000-of-00001.parquet", _parquet(source_test.remove_columns("id")))],
        commit_message="source", repo_type="dataset",
    ).oid

    # A partial merge (one shard missing: odd ids absent), with the targets file in reverse id order.
    ids = np.arange(0, rows, 2)
    merged_train = source_train.select(ids).add_column("target", [[0.0] * DIM] * ids.size).add_column("shard", [0] * ids.size)
    if images == "reference":
        merged_train = merged_train.remove_columns("image")
    table = digits["table"]
    manifest = {"images": images, "dim": DIM, "label_column": "label",
                "source": {"repo": source, "revision": pinned, "split": "train", "image_column": "image"}}
    operations = [
        CommitOperationAdd("data/train-00000-of-00001.parquet", _parquet(merged_train)),
        CommitOperationAdd("targets/train.safetensors", save(
            {"ids": ids[::-1].copy(), "targets": table.aligned[ids[::-1]], "raw": table.raw[ids[::-1]]})),
        CommitOperationAdd("coopt/manifest.json", json.dumps(manifest).encode()),
    ]
    if images == "copy":
        operations.append(CommitOperationAdd("data/test-00000-of-00001.parquet", _parquet(source_test)))
    repo = new_repo_id("merged")
    hf_api.create_repo(repo, repo_type="dataset")
    hf_api.create_commit(repo, operations, commit_message="merge", repo_type="dataset")
    hf_api.create_tag(repo, tag="v1", repo_type="dataset")

    data = load_training_data(repo, "v1", image_size=SIZE)
    np.testing.assert_array_equal(data.ids.numpy(), ids)
    np.testing.assert_array_equal(data.targets["aligned"].numpy(), table.aligned[ids])
    np.testing.assert_array_equal(data.labels.numpy(), np.asarray(source_train["label"])[ids])
    expected = np.stack([np.asarray(source_train[int(i)]["image"].convert("RGB")) for i in ids]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(data.images.numpy(), expected)
    assert data.test.images.shape == (32, 3, SIZE, SIZE)
    assert data.num_classes == 10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_training_on_gpu(data):
    result = train(_config(arch="resnet18", epochs=2, precision="bf16", eval_points=2), data)
    assert np.isfinite(result.epoch_losses).all()
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert result.accuracy > 0.5
    assert result.samples_per_s > 0
