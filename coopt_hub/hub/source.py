"""The source dataset: pinned to a commit, split into storage units, read unit by unit.

A source split is a list of parquet files (what `push_to_hub` and the Hub's parquet conversion
write). Its storage units are the files' row groups: a participant fetches only the byte ranges of
its own units through HfFileSystem range reads, never the whole dataset. Sample ids are row
indices of the split at the pinned commit, in file order, so they never change.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

from coopt_hub.core.plan import Plan, Unit
from coopt_hub.errors import SourceError
from coopt_hub.hub.client import dataset_info, open_remote


@dataclass(frozen=True)
class SourceLayout:
    repo: str
    revision: str
    split: str
    image_column: str
    files: tuple[str, ...]
    units: tuple[Unit, ...]
    num_rows: int
    features: dict[str, Any]
    splits: dict[str, tuple[str, ...]] = field(default_factory=dict)
    card_data: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def _footer(repo: str, revision: str, file: str, token: str | None) -> pq.FileMetaData:
    """A file's parquet footer, read once per process: files at a commit sha never change, and a
    participant reads several row groups of the same file."""
    with open_remote(repo, revision, file, token) as handle:
        return pq.ParquetFile(handle).metadata


def pin_revision(repo: str, revision: str | None, token: str | None = None) -> tuple[str, dict[str, Any]]:
    """The commit sha `revision` points to now, and the repo's card data."""
    try:
        info = dataset_info(repo, revision or "main", token)
    except RepositoryNotFoundError as err:
        raise SourceError(
            f"Source dataset {repo} not found.",
            hint="Check the repo id and HF_ENDPOINT; a private source needs HF_TOKEN with read access.",
        ) from err
    except RevisionNotFoundError as err:
        raise SourceError(
            f"Revision {revision!r} not found in source dataset {repo}.",
            hint="Pass an existing branch, tag or commit with --source-revision.",
        ) from err
    card = info.card_data.to_dict() if info.card_data is not None else {}
    return info.sha, card


def split_files(repo: str, revision: str, token: str | None = None) -> tuple[dict[str, tuple[str, ...]], dict[str, Any]]:
    """Every split's parquet files (paths in the repo) at `revision`, resolved the way
    `load_dataset` resolves them, and the declared features (empty when not declared)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(repo, revision=revision, token=token)
    except Exception as err:  # datasets raises many types here; all mean "not loadable"
        raise SourceError(
            f"Cannot read source dataset {repo}@{revision}: {err}",
            hint="The source must load with `datasets.load_dataset`; check the repo id, revision and its files.",
        ) from err
    if builder.name != "parquet":
        raise SourceError(
            f"Source dataset {repo} is stored as {builder.name!r}, not parquet.",
            hint="Re-publish it as parquet (`Dataset.push_to_hub` does), or point --source at the Hub's "
            "parquet conversion (revision refs/convert/parquet).",
        )
    prefix = f"hf://datasets/{repo}@{revision}/"
    splits: dict[str, tuple[str, ...]] = {}
    for split, urls in (builder.config.data_files or {}).items():
        splits[str(split)] = tuple(url[len(prefix) :] if url.startswith(prefix) else url for url in urls)
    features = builder.info.features.to_dict() if builder.info.features is not None else {}
    return splits, features


def parquet_units(repo: str, revision: str, files: tuple[str, ...], token: str | None = None) -> list[Unit]:
    """One Unit per row group, in file order; reads only the files' footers."""
    units: list[Unit] = []
    start = 0
    for file in files:
        metadata = _footer(repo, revision, file, token)
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            if rows:
                units.append(Unit(file=file, row_group=group, start=start, num_rows=rows))
                start += rows
    return units


def resolve_source(
    repo: str, revision: str | None, split: str, image_column: str, token: str | None = None
) -> SourceLayout:
    """Pin the source to a commit and describe the split's storage units."""
    sha, card = pin_revision(repo, revision, token)
    splits, features = split_files(repo, sha, token)
    if split not in splits:
        raise SourceError(
            f"Source dataset {repo} has no split {split!r} (it has: {', '.join(sorted(splits)) or 'none'}).",
            hint="Pass one of those with --split.",
        )
    files = splits[split]
    schema = _schema(repo, sha, files[0], token)
    if image_column not in schema.names:
        raise SourceError(
            f"Split {split!r} of {repo} has no column {image_column!r} (columns: {', '.join(schema.names)}).",
            hint="Pass the column that holds the images with --image-column.",
        )
    units = parquet_units(repo, sha, files, token)
    return SourceLayout(
        repo=repo,
        revision=sha,
        split=split,
        image_column=image_column,
        files=files,
        units=tuple(units),
        num_rows=sum(unit.num_rows for unit in units),
        features=features,
        splits=splits,
        card_data=card,
    )


def _schema(repo: str, revision: str, file: str, token: str | None) -> pa.Schema:
    return _footer(repo, revision, file, token).schema.to_arrow_schema()


def read_unit(
    repo: str, revision: str, unit: Unit, columns: list[str] | None = None, token: str | None = None
) -> pa.Table:
    """The rows of one storage unit, fetched with range reads of that row group only."""
    metadata = _footer(repo, revision, unit.file, token)
    with open_remote(repo, revision, unit.file, token) as handle:
        parquet = pq.ParquetFile(handle, metadata=metadata)
        missing = [name for name in columns or () if name not in parquet.schema_arrow.names]
        if missing:
            raise SourceError(
                f"{unit.file} of {repo}@{revision[:12]} has no column(s) {missing}.",
                hint="The plan names a column the pinned source lacks: "
                "check that coopt/plan.json was not edited by hand.",
            )
        table = parquet.read_row_group(unit.row_group, columns=columns) if unit.row_group is not None else parquet.read(
            columns=columns
        )
    if table.num_rows != unit.num_rows:
        raise SourceError(
            f"{unit.file} row group {unit.row_group} has {table.num_rows} rows, the plan says {unit.num_rows}.",
            hint="The source changed under its pinned commit; re-run `coopt-hub init` on a new repo.",
        )
    return table


def read_plan_unit(plan: Plan, unit: Unit, columns: list[str] | None = None, token: str | None = None) -> pa.Table:
    return read_unit(plan.source_repo, plan.source_revision, unit, columns, token)


def iter_unit_batches(
    repo: str, revision: str, units: list[Unit], columns: list[str] | None = None, token: str | None = None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first id, batch) over consecutive row-group `units` (parquet_units), in id order, one row group
    at a time and each file opened once; any run of units, so that parts of a split can be read side by side."""
    for file, group in itertools.groupby(units, key=lambda unit: unit.file):
        with open_remote(repo, revision, file, token) as handle:
            parquet = pq.ParquetFile(handle)
            for unit in group:
                start = unit.start
                for batch in parquet.read_row_group(unit.row_group, columns=columns).to_batches():
                    if batch.num_rows:
                        yield start, batch
                        start += batch.num_rows


