"""The merged parquet files: the source's row groups joined with the merged targets, split by
split, row group by row group.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coopt_hub.core.layout import DATA_DIR
from coopt_hub.core.manifest import SplitRecord
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import TensorFile
from coopt_hub.errors import SourceError
from coopt_hub.hub.client import Hub, open_remote
from coopt_hub.hub.source import SourceLayout, iter_source_batches
from coopt_hub.platform.merge.targets import IdLayout

# A row group carries about this many bytes, and a data file is closed after about this many, so a
# streaming reader fetches reasonable ranges and no file grows past what the Hub handles comfortably.
ROW_GROUP_BYTES = 64 << 20


FILE_BYTES = 1 << 30


def read_source_features(layout: SourceLayout, token: str | None = None):
    """The source split's datasets Features: declared in its card, else read from a file's schema."""
    import datasets

    if layout.features:
        return datasets.Features.from_dict(layout.features)
    with open_remote(layout.repo, layout.revision, layout.files[0], token) as handle:
        return datasets.Features.from_arrow_schema(pq.ParquetFile(handle).schema_arrow)


def read_source_card(hub: Hub, layout: SourceLayout) -> dict[str, Any]:
    """The YAML of the source's README at the pinned commit (license and the like); empty without one."""
    from huggingface_hub import DatasetCard
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        text = hub.download(layout.repo, "README.md", layout.revision).read_text(encoding="utf-8")
    except RemoteEntryNotFoundError:  # not its parent EntryNotFoundError: an unreachable Hub is no missing card
        return {}
    return DatasetCard(text, ignore_metadata_errors=True).data.to_dict()


def merged_features(source_features, image_column: str, dim: int, images: str):
    """id, image (copy mode), target (fixed-length float32), shard, then the source's other columns."""
    import datasets

    columns: dict[str, Any] = {"id": datasets.Value("int64")}
    if images == "copy":
        columns[image_column] = source_features[image_column]
    columns["target"] = datasets.List(datasets.Value("float32"), length=dim)
    columns["shard"] = datasets.Value("int32")
    columns.update({name: feature for name, feature in source_features.items() if name != image_column})
    return datasets.Features(columns)


def label_column(features) -> str | None:
    """The column a linear probe evaluates: the first class label, else a column named `label`."""
    import datasets

    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    return "label" if "label" in features else None


class _SplitWriter:
    """Parquet files of one split, closed at about FILE_BYTES; named `-of-N` once N is known."""

    def __init__(self, workdir: Path, split: str, schema: pa.Schema):
        self.split, self.schema, self.workdir = split, schema, workdir
        self.files: list[Path] = []
        self.num_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._bytes = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.files.append(self.workdir / f"{self.split}-{len(self.files)}.parquet")
            self._writer = pq.ParquetWriter(self.files[-1], self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self.num_rows += table.num_rows
        self._bytes += table.nbytes
        if self._bytes >= FILE_BYTES:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._bytes = None, 0

    def finish(self) -> list[tuple[Path, str]]:
        """(local file, path in the repo) of every file written."""
        self._close_file()
        total = len(self.files)
        return [(path, f"{DATA_DIR}/{self.split}-{i:05d}-of-{total:05d}.parquet") for i, path in enumerate(self.files)]


class TargetJoin:
    """The merged split's targets and shard for a run of consecutive sample ids."""

    def __init__(self, plan: Plan, ids: IdLayout, targets: TensorFile):
        self.plan, self.ids, self.targets = plan, ids, targets

    def rows(self, sample_ids: np.ndarray) -> tuple[np.ndarray, pa.Array, pa.Array]:
        """(which ids were merged, their targets, their shards); ids of missing shards, and ids a shard
        skipped as undecodable, are dropped."""
        if sample_ids[-1] >= self.plan.num_rows:
            raise SourceError(
                f"Split {self.plan.split} of {self.plan.source_repo} has more rows than the plan's "
                f"{self.plan.num_rows}.",
                hint="The plan on main does not describe this source; check it was not edited by hand.",
            )
        shard = self.ids.shard_of[sample_ids]
        keep = shard >= 0
        # Merged rows are stored in id order, so a run of ids is one contiguous read.
        position = self.ids.position[sample_ids[keep]]
        values = self.targets.read_rows("targets", int(position[0]), int(position[-1]) + 1) if keep.any() else None
        flat = pa.array(np.zeros(0, np.float32) if values is None else values.astype(np.float32).reshape(-1))
        return keep, pa.FixedSizeListArray.from_arrays(flat, self.plan.dim), pa.array(shard[keep], pa.int32())


def write_splits(
    layout: SourceLayout, plan: Plan, features, join: TargetJoin, workdir: Path, token: str | None
) -> tuple[list[tuple[Path, str]], dict[str, SplitRecord]]:
    """The merged split with its targets, and every other split of the source with empty targets."""
    schema = features.arrow_schema
    source_columns = [name for name in features if name not in ADDED_COLUMNS]
    uploads: list[tuple[Path, str]] = []
    splits: dict[str, SplitRecord] = {}
    for split in [plan.split, *sorted(s for s in layout.splits if s != plan.split)]:
        writer = _SplitWriter(workdir, split, schema)
        split_join = join if split == plan.split else None
        for table in _split_tables(layout, layout.splits[split], source_columns, schema, split_join, token):
            writer.write(table)
        if split == plan.split and writer.num_rows != join.ids.num_rows:
            raise SourceError(
                f"Split {split} of {layout.repo}@{layout.revision[:12]} gave {writer.num_rows} merged rows, "
                f"the shards hold {join.ids.num_rows}.",
                hint="The pinned source reads differently than when the plan was made; report this.",
            )
        written = writer.finish()
        if written:
            uploads.extend(written)
            splits[split] = SplitRecord(tuple(path for _, path in written), writer.num_rows)
    return uploads, splits


def _split_tables(
    layout: SourceLayout,
    files: tuple[str, ...],
    source_columns: list[str],
    schema: pa.Schema,
    join: TargetJoin | None,
    token: str | None,
) -> Iterator[pa.Table]:
    """Row groups of one split in id order: the source's rows joined with their targets (`join`),
    or with empty targets."""
    target_type = schema.field("target").type
    target_bytes = 4 * target_type.list_size if join is not None else 0
    for first, batch in iter_source_batches(layout.repo, layout.revision, files, source_columns, token):
        row_bytes = batch.nbytes / max(batch.num_rows, 1) + target_bytes
        chunk = max(1, int(ROW_GROUP_BYTES // max(row_bytes, 1)))
        for offset in range(0, batch.num_rows, chunk):
            part = batch.slice(offset, chunk)
            sample_ids = np.arange(first + offset, first + offset + part.num_rows, dtype=np.int64)
            if join is None:
                target, shard = pa.nulls(part.num_rows, target_type), pa.nulls(part.num_rows, pa.int32())
            else:
                keep, target, shard = join.rows(sample_ids)
                if not keep.all():
                    part, sample_ids = part.filter(pa.array(keep)), sample_ids[keep]
            if part.num_rows == 0:
                continue
            columns = {"id": pa.array(sample_ids), "target": target, "shard": shard}
            columns.update({name: part.column(name) for name in source_columns})
            yield pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


ADDED_COLUMNS = ("id", "target", "shard")
