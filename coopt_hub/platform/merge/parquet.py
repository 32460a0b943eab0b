"""The merged parquet files: the source's row groups joined with the merged targets, split by
split, row group by row group.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from coopt_hub.core.ahead import ahead
from coopt_hub.core.layout import DATA_DIR
from coopt_hub.core.manifest import SplitRecord
from coopt_hub.core.memory import trim_heap
from coopt_hub.core.plan import Plan, Unit
from coopt_hub.core.progress import Bar, Progress
from coopt_hub.errors import SourceError
from coopt_hub.hub.client import Hub, open_remote
from coopt_hub.hub.source import SourceLayout, iter_unit_batches, parquet_units, resolve_source
from coopt_hub.platform.merge.targets import MergedTargets

if TYPE_CHECKING:
    import datasets

# A row group carries about this many bytes, and a data file is closed after about this many, so a
# streaming reader fetches reasonable ranges and no file grows past what the Hub handles comfortably.
# Up to three row groups are alive while the next is joined ahead of the encoder: the merge's peak
# RSS at 1M x 512 (benchmarks/merge.py) was 599 MiB with 64 MiB row groups, 451 MiB with 32.
# A closed file starts uploading while the next is written (`on_file`): at 256 MiB (in Arrow; ~115 MB
# of parquet at 512 dims) all but the last file of each part have left before the commit.
ROW_GROUP_BYTES = 32 << 20
FILE_BYTES = 256 << 20
# Parts of a split written side by side (_write_split): pyarrow's encoder, most of the parquet
# stage, runs on one core per row group; at 1M x 512 on 2 cores this stage took 16.5 s in one part.
# Only a split whose targets take PART_MIN_BYTES or more is cut (each part makes its own files):
# a small one stays one file.
PARTS = 2
PART_MIN_BYTES = 256 << 20
# The columns a merge adds in front of the source's own.
ADDED_COLUMNS = ("id", "target", "shard")


@dataclass(frozen=True)
class MergeSource:
    """The pinned source as a merge reads it: its layout, its card's YAML (license and the like), and
    the merged dataset's features (the added columns, then the source's)."""

    layout: SourceLayout
    card: dict[str, Any]
    features: datasets.Features

    @property
    def source_columns(self) -> list[str]:
        return [name for name in self.features if name not in ADDED_COLUMNS]

    @property
    def label_column(self) -> str | None:
        """The column a linear probe evaluates: the first class label, else a column named `label`."""
        import datasets

        for name, feature in self.features.items():
            if isinstance(feature, datasets.ClassLabel):
                return name
        return "label" if "label" in self.features else None


def read_merge_source(hub: Hub, plan: Plan, images: str) -> MergeSource:
    """The plan's pinned source, checked against the plan, with the features of its merge in `images` mode."""
    layout = resolve_source(plan.source_repo, plan.source_revision, plan.split, plan.image_column, hub.token)
    source_features = read_source_features(layout, hub.token)
    _check_source(plan, layout, source_features)
    features = merged_features(source_features, plan.image_column, plan.dim, images)
    return MergeSource(layout, read_source_card(hub, layout), features)


def _check_source(plan: Plan, layout: SourceLayout, source_features) -> None:
    if layout.units != plan.units:
        raise SourceError(
            f"The storage units of {plan.source_repo}@{plan.source_revision[:12]} no longer match the plan.",
            hint="The pinned source cannot have changed; check that the plan on main was not edited by hand.",
        )
    clash = [name for name in ADDED_COLUMNS if name in source_features]
    if clash:
        raise SourceError(
            f"The source already has column(s) {clash}, which the merged dataset adds itself.",
            hint="Rename those columns in a copy of the source and start the collaboration from that copy.",
        )


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


class _SplitWriter:
    """Parquet files of one part of a split (the row groups `part` numbers), closed at about FILE_BYTES."""

    def __init__(self, workdir: Path, split: str, part: int, schema: pa.Schema, on_file: Callable[[Path], None]):
        self.split, self.part, self.schema, self.workdir = split, part, schema, workdir
        self.on_file = on_file
        self._options = _column_options(schema)
        self.files: list[Path] = []
        self.num_rows = 0
        self.num_bytes = 0  # in memory (Arrow), as `datasets` counts a split's size
        self._writer: pq.ParquetWriter | None = None
        self._bytes = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self.files.append(self.workdir / f"{self.split}-{self.part}-{len(self.files)}.parquet")
            self._writer = pq.ParquetWriter(self.files[-1], self.schema, **self._options)
        self._writer.write_table(table, row_group_size=table.num_rows)
        # The encoder's buffers (levels, pages: about the row group's size again) go back to the
        # system now, not whenever the allocator decides, which would be after the next row group is built.
        _release_memory()
        self.num_rows += table.num_rows
        self.num_bytes += table.nbytes
        self._bytes += table.nbytes
        if self._bytes >= FILE_BYTES:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer, self._bytes = None, 0
            self.on_file(self.files[-1])

    def finish(self) -> list[Path]:
        """Every file written, in row order."""
        self._close_file()
        return self.files


def _column_options(schema: pa.Schema) -> dict[str, Any]:
    """The writer's options by column. The targets: byte-stream-split pages compressed with zstd
    at level 1, and no statistics. Their float32 values are widened float16s, so the lowest byte
    of every value is zero and the next holds 3 bits: split into one stream per byte, zstd all but
    removes those. Measured on 65,536 x 512 targets (unit vectors, and the same re-aligned by a
    random map): 0.70-0.86 s to encode and 56.4 MiB, where pyarrow's default dictionary encoding
    (every value hashed into a table of up to 65,536 float32s) took 1.30-1.37 s for 60.9 MiB;
    reading back takes the same time. A float vector column's min and max are of no use to a
    reader (~4% of its encoding time). Every other column keeps pyarrow's defaults: dictionary,
    snappy and statistics. pyarrow takes the options by the parquet paths of the leaf columns
    (target.list.element, image.bytes), read here from the parquet schema of an empty file."""
    empty = io.BytesIO()
    pq.write_table(schema.empty_table(), empty)
    leaves = pq.ParquetFile(io.BytesIO(empty.getvalue())).schema
    paths = [leaves.column(i).path for i in range(len(leaves))]
    targets = [path for path in paths if path.split(".")[0] == "target"]
    others = [path for path in paths if path not in targets]
    return {"compression": {path: "zstd" if path in targets else "snappy" for path in paths},
            "compression_level": dict.fromkeys(targets, 1),
            "use_dictionary": others, "use_byte_stream_split": targets, "write_statistics": others}


def _repo_paths(split: str, files: list[Path]) -> list[tuple[Path, str]]:
    """(local file, path in the repo) of a split's files in row order, named `-of-N` as `datasets` expects."""
    return [(path, f"{DATA_DIR}/{split}-{i:05d}-of-{len(files):05d}.parquet") for i, path in enumerate(files)]


def write_splits(
    source: MergeSource,
    targets: MergedTargets,
    workdir: Path,
    token: str | None,
    progress: Progress,
    on_file: Callable[[Path], None] = lambda path: None,
) -> tuple[list[tuple[Path, str]], dict[str, SplitRecord]]:
    """The merged split with its `targets`, and every other split of the source with empty targets.
    `on_file` is called with each file as soon as it is complete (from the thread that wrote it)."""
    merged_split = targets.plan.split
    trim_heap()
    uploads: list[tuple[Path, str]] = []
    splits: dict[str, SplitRecord] = {}
    for split in [merged_split, *sorted(s for s in source.layout.splits if s != merged_split)]:
        join = targets if split == merged_split else None
        writers = _write_split(source, split, join, workdir, token, progress, on_file)
        written = _repo_paths(split, [path for writer in writers for path in writer.finish()])
        if written:
            uploads.extend(written)
            splits[split] = SplitRecord(tuple(path for _, path in written), sum(w.num_rows for w in writers),
                                        sum(w.num_bytes for w in writers),
                                        sum(local.stat().st_size for local, _ in written))
    _release_memory()  # what the row groups left, before the evaluation's reads
    return uploads, splits


def _release_memory() -> None:
    """Freed memory back to the system: Arrow's pool, then the C heap."""
    pa.default_memory_pool().release_unused()
    trim_heap()


def _write_split(
    source: MergeSource,
    split: str,
    join: MergedTargets | None,
    workdir: Path,
    token: str | None,
    progress: Progress,
    on_file: Callable[[Path], None],
) -> list[_SplitWriter]:
    """One split's parquet files, joined with the merged targets (`join`) or with empty targets: in
    PARTS contiguous parts side by side, each read, joined and encoded on a thread of its own."""
    layout = source.layout
    units = parquet_units(layout.repo, layout.revision, layout.splits[split], token)
    target_bytes = join.ids.num_rows * 4 * join.plan.dim if join is not None else 0
    parts = _contiguous_parts(units, PARTS if target_bytes >= PART_MIN_BYTES else 1)
    writers = [_SplitWriter(workdir, split, k, source.features.arrow_schema, on_file) for k in range(len(parts))]

    def write_part(k: int) -> None:
        tables = _split_tables(source, parts[k], join, token, bar)
        if len(parts) == 1:  # one part: the next row group is joined ahead while this one is encoded
            tables = ahead(tables, name="coopt-merge-join")
        for table in tables:
            writers[k].write(table)
            del table  # a row group's targets are freed before the next row group is read

    with progress.bar(sum(unit.num_rows for unit in units), f"Writing split {split}", unit="rows") as bar:
        with ThreadPoolExecutor(len(parts), thread_name_prefix="coopt-merge-parquet") as pool:
            for done in [pool.submit(write_part, k) for k in range(len(parts))]:
                done.result()  # the first part's error first; the pool waits for the others
    rows = sum(writer.num_rows for writer in writers)
    if join is not None and rows != join.ids.num_rows:
        raise SourceError(
            f"Split {split} of {layout.repo}@{layout.revision[:12]} gave {rows} merged rows, "
            f"the shards hold {join.ids.num_rows}.",
            hint="The pinned source reads differently than when the plan was made; report this.",
        )
    return writers


def _contiguous_parts(units: list[Unit], parts: int) -> list[list[Unit]]:
    """`units` cut into at most `parts` runs of about equal rows, in order (never an empty run)."""
    total = sum(unit.num_rows for unit in units)
    cuts: list[list[Unit]] = [[] for _ in range(max(1, min(parts, len(units))))]
    for unit in units:
        cuts[min(len(cuts) - 1, unit.start * len(cuts) // max(total, 1))].append(unit)
    return [cut for cut in cuts if cut]


def _split_tables(
    source: MergeSource, units: list[Unit], join: MergedTargets | None, token: str | None, bar: Bar
) -> Iterator[pa.Table]:
    """Row groups of one split in id order: the source's rows joined with their targets (`join`),
    or with empty targets; `bar` counts the source rows read. No row group outlives its yield here:
    each is built in `_joined` and handed on without a name that would keep it while the next is built."""
    layout = source.layout
    target_bytes = 4 * source.features.arrow_schema.field("target").type.list_size if join is not None else 0
    for first, batch in iter_unit_batches(layout.repo, layout.revision, units, source.source_columns, token):
        row_bytes = batch.nbytes / max(batch.num_rows, 1) + target_bytes
        chunk = max(1, int(ROW_GROUP_BYTES // max(row_bytes, 1)))
        for offset in range(0, batch.num_rows, chunk):
            if (table := _joined(source, batch.slice(offset, chunk), first + offset, join)) is not None:
                yield table
                del table
        bar.update(batch.num_rows)


def _joined(source: MergeSource, part: pa.RecordBatch, first: int, join: MergedTargets | None) -> pa.Table | None:
    """The source rows `part`, whose first id is `first`, with their targets (`join`) or empty targets,
    in the merged schema; None when none of its rows was merged."""
    schema = source.features.arrow_schema
    target_type = schema.field("target").type
    sample_ids = np.arange(first, first + part.num_rows, dtype=np.int64)
    if join is None:
        target, shard = pa.nulls(part.num_rows, target_type), pa.nulls(part.num_rows, pa.int32())
    else:
        keep, target, shard = join.rows_for(sample_ids)
        if not keep.all():
            part, sample_ids = part.filter(pa.array(keep)), sample_ids[keep]
    if part.num_rows == 0:
        return None
    columns = {"id": pa.array(sample_ids), "target": target, "shard": shard}
    columns.update({name: part.column(name) for name in source.source_columns})
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)
