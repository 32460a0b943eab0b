"""Training data: images pre-decoded once into a uint8 tensor, targets joined on the sample id.

The datasets this trains on are small-image sets (digits, CIFAR, Tiny-ImageNet sizes), so the whole
split fits in memory (and on the GPU) as one [N, 3, S, S] uint8 tensor; a batch is then an index
into it, with no per-sample decoding or worker processes in the training loop.

Targets are read from `targets/train.safetensors` (ids, aligned, raw) and joined on `id`, never
by row position and never from the parquet `target` list column, which is two orders of
magnitude slower to materialise. The manifest and the targets file come through the Hub client
(coopt_hub.hub.client); the parquet splits are read by `datasets`, one split's columns at a time.

Which rows: the students train on the plan's split, which the manifest names (a source may have
other splits, even one called `train`, whose rows have no targets); the linear probe is scored on
an evaluation split that is never the training split (`choose_eval_split`), and never on a slice
of it. Everything is read at the one commit the revision named when loading started.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import RemoteEntryNotFoundError
from PIL import Image, ImageOps
from safetensors import safe_open

from coopt_hub.core.layout import MANIFEST_PATH, TARGETS_PATH
from coopt_hub.core.manifest import SourcePin
from coopt_hub.core.progress import Progress, Silent
from coopt_hub.errors import ConfigError, CoOptError
from coopt_hub.hub.client import REPO_TYPE, Hub

TARGET_KINDS = ("aligned", "raw")


class TrainingDataError(CoOptError):
    """The merged dataset lacks something training needs (manifest, targets, labels, images)."""


class MissingTargetsError(TrainingDataError):
    """Rows whose id has no target; `ids` names them."""

    def __init__(self, message: str, ids: list[int], hint: str | None = None):
        super().__init__(message, hint)
        self.ids = ids


@dataclass(frozen=True)
class TargetTable:
    """Targets keyed by sample id: row i of `aligned` (and `raw`) belongs to `ids[i]`."""

    ids: np.ndarray  # int64 [N]
    aligned: np.ndarray  # float16 [N, dim], aligned to the best prior
    raw: np.ndarray | None = None  # float16 [N, dim], W-projected but unaligned

    @property
    def dim(self) -> int:
        return int(self.aligned.shape[1])


def read_targets_file(path: str | Path) -> TargetTable:
    """Read `targets/train.safetensors` as numpy arrays (no torch round trip, no parquet)."""
    with safe_open(str(path), framework="np") as f:
        names = set(f.keys())
        missing = {"ids", "targets"} - names
        if missing:
            raise TrainingDataError(
                f"{path} has no tensor(s) {sorted(missing)}; it holds {sorted(names)}",
                hint="Point at the merged dataset's targets/train.safetensors, written by `coopt-hub merge`.",
            )
        ids = f.get_tensor("ids").astype(np.int64, copy=False)
        aligned = f.get_tensor("targets")
        raw = f.get_tensor("raw") if "raw" in names else None
    if aligned.ndim != 2 or aligned.shape[0] != ids.shape[0] or (raw is not None and raw.shape != aligned.shape):
        raise TrainingDataError(
            f"{path}: ids {ids.shape}, targets {aligned.shape}, raw {None if raw is None else raw.shape} "
            "do not line up",
            hint="The file is damaged or was not written by `coopt-hub merge`; rerun the merge.",
        )
    return TargetTable(ids=ids, aligned=aligned, raw=raw)


def join_on_id(row_ids: np.ndarray, table: TargetTable) -> TargetTable:
    """Reorder `table` so that its row i holds the targets of `row_ids[i]`.

    Raises MissingTargetsError naming the ids that have no target, rather than silently training
    on a neighbour's target (the failure mode of keying by row position).
    """
    row_ids = np.asarray(row_ids, dtype=np.int64)
    if np.array_equal(row_ids, table.ids):
        return table  # the common case: the merge wrote both in the same order
    order = np.argsort(table.ids, kind="stable")
    sorted_ids = table.ids[order]
    if sorted_ids.size > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
        duplicates = np.unique(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]])
        raise TrainingDataError(
            f"the targets file lists {duplicates.size} id(s) more than once, e.g. {duplicates[:5].tolist()}",
            hint="Rerun `coopt-hub merge`; a merged targets file holds each sample once.",
        )
    position = np.searchsorted(sorted_ids, row_ids)
    found = position < sorted_ids.size
    found[found] = sorted_ids[position[found]] == row_ids[found]
    if not found.all():
        missing = row_ids[~found]
        raise MissingTargetsError(
            f"{missing.size} of {row_ids.size} rows have no target, e.g. ids {missing[:10].tolist()}",
            ids=missing.tolist(),
            hint="The targets file and the train split come from different merges: load both at the "
            "same --revision (a vN tag), or rerun `coopt-hub merge`.",
        )
    rows = order[position]
    return TargetTable(
        ids=row_ids,
        aligned=table.aligned[rows],
        raw=None if table.raw is None else table.raw[rows],
    )


@dataclass
class LabeledImages:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]


@dataclass(frozen=True)
class DatasetOrigin:
    """Where training data came from: a merged repo read at one commit, and the splits used."""

    repo: str
    revision: str  # as asked, e.g. v1
    commit: str  # what it named when read
    train_split: str  # the plan's split
    eval_split: str | None  # the probe's; never the training split


@dataclass
class TrainingData:
    """Everything a training run reads, row-aligned: images[i], targets[k][i], labels[i] share ids[i]."""

    ids: torch.Tensor  # int64 [N]
    images: torch.Tensor  # uint8 [N, 3, S, S]
    targets: dict[str, torch.Tensor]  # "aligned" / "raw" -> float16 [N, dim]
    labels: torch.Tensor | None  # int64 [N]; None when the source has no label column
    test: LabeledImages | None  # the linear probe's evaluation split (never the training split)
    num_classes: int | None
    origin: DatasetOrigin | None = None  # None: built in memory

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])


def decode_images(
    images: Iterable[Image.Image], count: int, size: int, progress: Progress | None = None
) -> torch.Tensor:
    """Decode PIL images into one uint8 [count, 3, size, size] tensor (`progress`: a bar over them).

    Images of another size are resized on the shorter side and centre-cropped (antialiased PIL
    bicubic), once, here; the training loop then only indexes.
    """
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    n = 0
    with (progress or Silent()).bar(count, "decode images", unit="image") as bar:
        for image in images:
            if n == count:
                raise TrainingDataError(f"more than the expected {count} images", hint="Report this; it is a bug.")
            image = image.convert("RGB")
            if image.size != (size, size):
                image = ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)
            out[n] = np.asarray(image)
            n += 1
            bar.update(1)
    if n != count:
        raise TrainingDataError(f"expected {count} images, read {n}", hint="Report this; it is a bug.")
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _column_images(dataset, column: str, batch_size: int = 1024) -> Iterable[Image.Image]:
    if column not in dataset.column_names:
        raise TrainingDataError(
            f"no image column {column!r}; columns are {dataset.column_names}",
            hint="Check the manifest's source.image_column, or pass image_column=.",
        )
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        yield from batch[column]


def _labels(dataset, column: str) -> np.ndarray:
    if column not in dataset.column_names:
        raise TrainingDataError(
            f"no label column {column!r}; columns are {dataset.column_names}",
            hint="Pass the label column's name, or train without labels (coopt/byol without a probe).",
        )
    return np.asarray(dataset.select_columns([column]).with_format("numpy")[column], dtype=np.int64)


def _num_classes(dataset, column: str, labels: list[np.ndarray]) -> int:
    feature = dataset.features.get(column)
    if getattr(feature, "num_classes", None):
        return int(feature.num_classes)
    return int(max(int(x.max()) for x in labels if x.size) + 1)


def prepare_training_data(
    train,
    targets: TargetTable,
    test=None,
    *,
    image_column: str = "image",
    label_column: str | None = "label",
    image_source=None,
    image_size: int = 32,
    progress: Progress | None = None,
    origin: DatasetOrigin | None = None,
) -> TrainingData:
    """Build TrainingData from `datasets.Dataset` objects (in memory or loaded from the Hub).

    train: rows with an `id` column (and images in `image_column` unless `image_source` is given).
    targets: the targets file's table; joined to `train` on `id`.
    test: the labeled split the linear probe is scored on (never `train`), or None.
    image_source: with `--images reference` merges, the source split at its pinned revision;
        the image of sample `id` is its row `id`.
    progress: bars over the images decoded.
    origin: where the splits came from, recorded with the data.
    """
    if "id" not in train.column_names:
        raise TrainingDataError(
            f"the train split has no `id` column; columns are {train.column_names}",
            hint="Train on a dataset written by `coopt-hub merge` (its rows carry the source row id).",
        )
    ids = np.asarray(train.select_columns(["id"]).with_format("numpy")["id"], dtype=np.int64)
    joined = join_on_id(ids, targets)
    if image_source is not None:
        if ids.size and (ids.min() < 0 or ids.max() >= len(image_source)):
            raise TrainingDataError(
                f"ids reach {int(ids.max())} but the image source has {len(image_source)} rows",
                hint="The merge and the source revision disagree; check the manifest's source.revision.",
            )
        images = decode_images(_column_images(image_source.select(ids), image_column), ids.size, image_size, progress)
    else:
        images = decode_images(_column_images(train, image_column), ids.size, image_size, progress)

    labels = test_set = num_classes = None
    if label_column is not None:
        train_labels = _labels(train, label_column)
        if test is not None:
            test_labels = _labels(test, label_column)
            test_images = decode_images(_column_images(test, image_column), len(test), image_size, progress)
            test_set = LabeledImages(images=test_images, labels=torch.from_numpy(test_labels))
        seen = [train_labels] + ([test_set.labels.numpy()] if test_set else [])
        num_classes = _num_classes(train, label_column, seen)
        labels = torch.from_numpy(train_labels)
    tensors = {"aligned": torch.from_numpy(np.ascontiguousarray(joined.aligned))}
    if joined.raw is not None:
        tensors["raw"] = torch.from_numpy(np.ascontiguousarray(joined.raw))
    return TrainingData(
        ids=torch.from_numpy(ids), images=images, targets=tensors, labels=labels, test=test_set,
        num_classes=num_classes, origin=origin,
    )


def _split_files(repo: str, revision: str, token: str | None) -> dict[str, list[str]]:
    """The data files of each split, resolved (pinned to `revision`) without downloading them."""
    from datasets import load_dataset_builder

    builder = load_dataset_builder(repo, revision=revision, token=token)
    return {split: list(files) for split, files in (builder.config.data_files or {}).items()}


def _load_split(files: list[str], columns: list[str] | None, token: str | None):
    from datasets import load_dataset

    # Loading one split's files through the parquet builder reads only the listed columns, so the
    # `target` list column is never decoded and other splits are not prepared.
    return load_dataset("parquet", data_files={"split": files}, split="split", columns=columns, token=token)


EVAL_SPLIT_DEFAULTS = ("test", "validation", "valid")


@dataclass(frozen=True)
class _MergedVersion:
    """What training reads of a merged version on the Hub: its commit, its manifest's source pin,
    modes and split names, and the targets file (downloaded)."""

    commit: str
    source: SourcePin  # source.split is the plan's split: the only one with targets
    reference: bool  # images: reference (read from the source at its pinned revision), else copied
    label_column: str | None
    splits: tuple[str, ...] | None  # the splits the manifest records; None in hand-written manifests
    targets_file: Path


@dataclass
class _Splits:
    train: Any
    test: Any | None
    image_source: Any | None  # with reference merges: the source split the images come from
    eval_split: str | None


def load_training_data(
    repo: str,
    revision: str | None = None,
    *,
    image_size: int = 32,
    train_split: str | None = None,
    eval_split: str | None = None,
    need_eval: bool = True,
    token: str | None = None,
    progress: Progress | None = None,
) -> TrainingData:
    """Load a merged CoOpt dataset from the Hub (HF_ENDPOINT / HF_TOKEN) for training.

    Everything is read at one commit (the one `revision` names when called): `coopt/manifest.json`,
    the targets file, the id/label (and image) columns of the plan's split, and the probe's
    evaluation split; for `images: reference` merges the images (and the evaluation split) come
    from the source dataset at its pinned revision, joined on id (= row index in the source split).

    train_split: the split to train on; only the plan's split (recorded in the manifest) has
        targets, so any other is refused. Default: the plan's split.
    eval_split: the labeled split the linear probe is scored on; never the training split.
        Default: the first of test, validation, valid that exists. When there is none and the
        dataset has labels, a TrainingDataError names the splits to choose from (`need_eval=False`,
        for runs without probe evaluations, accepts that there is none).
    progress: bars over the images decoded.
    """
    revision = revision or "main"
    hub = Hub(token=token)
    merged = _read_merged_version(hub, repo, revision)
    split = _training_split(repo, revision, merged, train_split)
    splits = _load_splits(repo, merged, split, eval_split, need_eval, token)
    return prepare_training_data(
        splits.train,
        read_targets_file(merged.targets_file),
        splits.test,
        image_column=merged.source.image_column,
        label_column=merged.label_column,
        image_source=splits.image_source,
        image_size=image_size,
        progress=progress,
        origin=DatasetOrigin(repo, revision, merged.commit, split, splits.eval_split),
    )


def _read_merged_version(hub: Hub, repo: str, revision: str) -> _MergedVersion:
    """The manifest and targets file of the merged version at `revision`, pinned to its commit."""
    commit = hub.with_retries(f"read {repo}@{revision}",
                              lambda: hub.api.repo_info(repo, revision=revision, repo_type=REPO_TYPE)).sha
    try:
        manifest_file = hub.download(repo, MANIFEST_PATH, commit)
        targets_file = hub.download(repo, TARGETS_PATH, commit)
    except RemoteEntryNotFoundError as err:
        raise TrainingDataError(
            f"{repo}@{revision} is not a merged CoOpt dataset: {err.__class__.__name__}",
            hint="Train on a revision written by `coopt-hub merge` (e.g. --revision v1); "
            "`coopt-hub status REPO` shows what the repo holds.",
        ) from err
    manifest = json.loads(manifest_file.read_text())
    try:
        source = SourcePin(**manifest["source"])
    except (KeyError, TypeError) as err:
        raise TrainingDataError(
            f"{repo}@{revision}: {MANIFEST_PATH} has no valid source pin ({type(err).__name__}: {err})",
            hint="Train on a revision written by `coopt-hub merge` (e.g. --revision v1).",
        ) from err
    recorded = manifest.get("splits")
    return _MergedVersion(
        commit=commit,
        source=source,
        reference=manifest.get("images") == "reference",
        label_column=manifest.get("label_column"),
        splits=tuple(recorded) if isinstance(recorded, dict) else None,
        targets_file=targets_file,
    )


def _training_split(repo: str, revision: str, merged: _MergedVersion, asked: str | None) -> str:
    """The plan's split, which the manifest names; any other split asked for is refused, because its
    rows have no targets (labels and targets would come from different rows)."""
    planned = merged.source.split
    if asked is not None and asked != planned:
        raise ConfigError(
            f"{repo}@{revision} was planned on split {planned!r}: only its rows have targets, not {asked!r}'s",
            hint=f"Pass --train-split {planned} (or leave it out).",
        )
    if merged.splits is not None and planned not in merged.splits:
        raise TrainingDataError(
            f"{MANIFEST_PATH} of {repo}@{revision} names the plan's split {planned!r} but records only "
            f"{list(merged.splits)}",
            hint="The manifest was edited by hand or damaged; train on a vN tag written by `coopt-hub merge`.",
        )
    return planned


def choose_eval_split(available: Iterable[str], train_split: str, asked: str | None) -> str | None:
    """The probe's evaluation split among `available`: `asked`, else the first of test, validation,
    valid; never `train_split`. None when there is no default candidate; a ConfigError for a bad ask."""
    choices = sorted(name for name in available if name != train_split)
    if asked is not None:
        if asked == train_split:
            raise ConfigError(
                f"the evaluation split {asked!r} is the training split: the probe would score rows the student "
                "trained on",
                hint=f"Pass another --eval-split: {', '.join(choices) or 'this dataset has no other split'}.",
            )
        if asked not in choices:
            raise ConfigError(
                f"no split {asked!r} to evaluate on; the splits other than the training split are {choices}",
                hint=f"Pass --eval-split with one of: {', '.join(choices) or '(none)'}.",
            )
        return asked
    return next((name for name in EVAL_SPLIT_DEFAULTS if name in choices), None)


def _load_splits(
    repo: str, merged: _MergedVersion, split: str, eval_split: str | None, need_eval: bool, token: str | None
) -> _Splits:
    """The merged training split's columns, the probe's evaluation split, and the source images of a
    reference merge."""
    image_column, label_column = merged.source.image_column, merged.label_column
    merged_splits = _split_files(repo, merged.commit, token)
    if split not in merged_splits:
        raise TrainingDataError(
            f"{repo}@{merged.commit[:12]} has no split {split!r} (the plan's split); it has {sorted(merged_splits)}",
            hint="Rerun `coopt-hub merge`.",
        )
    columns = ["id"] + ([] if merged.reference else [image_column]) + ([label_column] if label_column else [])
    train = _load_split(merged_splits[split], columns, token)
    image_source = None
    labeled_splits = merged_splits  # where the probe's evaluation split is: with the images
    if merged.reference:
        labeled_splits = _split_files(merged.source.repo, merged.source.revision, token)
        image_source = _load_split(labeled_splits[merged.source.split], [image_column], token)
    if not label_column:
        if eval_split is not None:
            raise ConfigError("--eval-split needs labels, and this dataset has no label column",
                              hint="Leave --eval-split out: without labels there is no probe.")
        return _Splits(train, None, image_source, None)
    chosen = choose_eval_split(labeled_splits, split, eval_split)
    if chosen is None and need_eval:
        others = sorted(name for name in labeled_splits if name != split)
        raise TrainingDataError(
            f"no split to evaluate the probe on: none of {', '.join(EVAL_SPLIT_DEFAULTS)} among the splits other "
            f"than the training split {split!r}: {others}",
            hint=(f"Pass --eval-split with one of: {', '.join(others)}." if others else
                  "Publish a labeled test split with the source, or pass --eval-points 0 to train without a probe."),
        )
    test = None if chosen is None else _load_split(labeled_splits[chosen], [image_column, label_column], token)
    return _Splits(train, test, image_source, chosen)
