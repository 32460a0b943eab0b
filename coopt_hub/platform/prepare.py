"""`coopt-hub prepare-source`: republish a source dataset with row groups sized for the shards of a
collaboration, so that `init` splits it by row group and each participant downloads only its share.

datasets' `push_to_hub` aims at 100 MB row groups, so most image datasets arrive with one row group
per file: too few to give every shard its own (a plan splits by row group from 2 x shards non-empty
row groups on, core/plan.py). The copy holds the same rows, in the same order (so the same sample
ids) and the same splits, in one commit. It records what it was made from (source commit and sizes):
a rerun with the same inputs finds that record and makes no new commit.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperation, CommitOperationAdd, CommitOperationDelete, DatasetCard, DatasetCardData
from huggingface_hub.errors import RemoteEntryNotFoundError

from coopt_hub.core.layout import DATA_DIR
from coopt_hub.core.plan import Unit
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.errors import ConfigError
from coopt_hub.hub.client import Hub, open_remote
from coopt_hub.hub.source import parquet_units, pin_revision, split_files

# Twice the row groups a plan needs to split by row group: it still does for up to twice the shards
# planned, and a short last row group unbalances the shards less.
GROUPS_PER_SHARD = 4
FILE_BYTES = 500 * 2**20  # a new file from this size on, as push_to_hub's default max_shard_size
RECORD_PATH = "coopt/prepared-source.json"
RECORD_VERSION = 1


@dataclass(frozen=True)
class PreparedSplit:
    name: str
    rows: int
    rows_per_group: int
    files: tuple[str, ...]  # paths in the new repo, in id order


@dataclass(frozen=True)
class PrepareResult:
    source: str
    revision: str  # the source commit the rows were read at
    dest: str
    commit: str
    created: bool  # False: dest held this very copy already; nothing was committed
    splits: tuple[PreparedSplit, ...]


@dataclass(frozen=True)
class _Plan:
    """What the copy is made of: its inputs (the record) and the source's files of each split."""

    source: str
    revision: str
    card: str | None  # the source's README.md
    split_files: dict[str, tuple[str, ...]]
    units: dict[str, list[Unit]]
    rows_per_group: dict[str, int]

    def record(self, splits: tuple[PreparedSplit, ...]) -> dict:
        return {"version": RECORD_VERSION, "source": self.source, "revision": self.revision,
                "rows_per_group": self.rows_per_group, "splits": [asdict(split) for split in splits]}

    def made(self, record: dict | None) -> bool:
        """Whether `record` is that of a copy of these very inputs."""
        return record is not None and {key: record.get(key) for key in ("version", "source", "revision",
                                                                         "rows_per_group")} == {
            "version": RECORD_VERSION, "source": self.source, "revision": self.revision,
            "rows_per_group": self.rows_per_group}


def prepare_source(hub: Hub, source: str, dest: str, *, revision: str | None = None, rows_per_group: int | None = None,
                   shards: int | None = None, private: bool = False, progress: Progress | None = None) -> PrepareResult:
    """Publish the splits of `source` (at `revision`) to `dest` in row groups of `rows_per_group` rows, or
    sized for `shards` shards (GROUPS_PER_SHARD row groups each), in one commit on main."""
    progress = progress or LogProgress()
    if source == dest:
        raise ConfigError(f"prepare-source writes a copy: give it a new repo, not {source} itself.",
                          hint=f"e.g. `coopt-hub prepare-source {source} {source}-sharded --shards K`.")
    plan = _plan(hub, source, revision, rows_per_group, shards, progress)
    hub.ensure_repo(dest, private=private)
    head = hub.head(dest, "main")
    existing = _record(hub, dest, head)
    if plan.made(existing):  # before reading a single row: the copy is there already
        return _result(plan, dest, head, False, existing)
    with tempfile.TemporaryDirectory(prefix="coopt-prepare-") as scratch:
        splits = tuple(_write_split(hub, plan, name, Path(scratch), progress) for name in plan.split_files)
        build = _CopyCommit(hub, dest, plan, splits, Path(scratch))
        commit = hub.commit(dest, "main", build, message=_message(plan))
    return _result(plan, dest, commit, build.created, plan.record(splits))


def _plan(hub: Hub, source: str, revision: str | None, rows_per_group: int | None, shards: int | None,
          progress: Progress) -> _Plan:
    if (rows_per_group is None) == (shards is None):
        raise ConfigError("Give either the rows per row group or the number of shards planned, not both or neither.",
                          hint="Pass --shards K (the shards `coopt-hub init` will plan) or --rows-per-group N.")
    if (rows_per_group or shards) < 1:
        raise ConfigError(f"The rows per row group and the shards must be at least 1, got {rows_per_group or shards}.")
    sha, _ = pin_revision(source, revision, hub.token)
    split_paths, _ = split_files(source, sha, hub.token)
    units = {split: parquet_units(source, sha, files, hub.token) for split, files in split_paths.items()}
    sizes = {}
    for split, split_units in units.items():
        rows = sum(unit.num_rows for unit in split_units)
        sizes[split] = rows_per_group or max(1, math.ceil(rows / (GROUPS_PER_SHARD * shards)))
        if shards is not None and math.ceil(rows / sizes[split]) < 2 * shards:
            progress.warn(f"split {split} has {rows} rows: fewer than the {2 * shards} row groups of one row or "
                          f"more that {shards} shards need to be split by row group.")
    return _Plan(source=source, revision=sha, card=_text(hub, source, "README.md", sha), split_files=split_paths,
                 units=units, rows_per_group=sizes)


def _text(hub: Hub, repo: str, path: str, revision: str) -> str | None:
    try:
        return hub.download(repo, path, revision).read_text(encoding="utf-8")
    except RemoteEntryNotFoundError:
        return None


def _record(hub: Hub, dest: str, head: str | None) -> dict | None:
    return hub.read_json(dest, RECORD_PATH, head) if head else None


def _result(plan: _Plan, dest: str, commit: str, created: bool, record: dict) -> PrepareResult:
    splits = tuple(PreparedSplit(name=split["name"], rows=split["rows"], rows_per_group=split["rows_per_group"],
                                 files=tuple(split["files"])) for split in record["splits"])
    return PrepareResult(source=plan.source, revision=plan.revision, dest=dest, commit=commit, created=created,
                         splits=splits)


def _message(plan: _Plan) -> str:
    sizes = ", ".join(f"{split} {rows}" for split, rows in plan.rows_per_group.items())
    return f"coopt-hub prepare-source: {plan.source}@{plan.revision[:8]} in row groups of {sizes} rows"


def _write_split(hub: Hub, plan: _Plan, split: str, scratch: Path, progress: Progress) -> PreparedSplit:
    """Stream the split's rows into files of row groups of the planned size, in id order."""
    rows_per_group = plan.rows_per_group[split]
    total = sum(unit.num_rows for unit in plan.units[split])
    writer = _SplitWriter(scratch / DATA_DIR, split)
    with progress.bar(total, f"Rewriting {plan.source} ({split})", unit="row") as bar:
        for group in _row_groups(hub, plan, split, rows_per_group):
            writer.write(group)
            bar.update(group.num_rows)
    files = writer.close()
    if writer.rows != total:
        raise AssertionError(f"Wrote {writer.rows} rows of split {split}, the source's footers say {total}.")
    return PreparedSplit(name=split, rows=total, rows_per_group=rows_per_group,
                         files=tuple(f"{DATA_DIR}/{file.name}" for file in files))


def _row_groups(hub: Hub, plan: _Plan, split: str, rows: int) -> Iterator[pa.Table]:
    """The split's rows in id order as tables of `rows` rows (the last may be shorter), holding at most
    one such table and one batch in memory."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for file in plan.split_files[split]:
        with open_remote(plan.source, plan.revision, file, hub.token) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=rows):
                pending.append(batch)
                held += batch.num_rows
                while held >= rows:
                    table = pa.Table.from_batches(pending)
                    yield table.slice(0, rows)
                    rest = table.slice(rows)
                    pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


class _SplitWriter:
    """Row groups in files of up to about FILE_BYTES, named as push_to_hub names them (split-NNNNN-of-NNNNN)."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[Path] = []
        self.rows = 0
        self._sink: pa.NativeFile | None = None
        self._writer: pq.ParquetWriter | None = None

    def write(self, group: pa.Table) -> None:
        if self._writer is None:
            self.parts.append(self.folder / f".{self.split}-{len(self.parts):05d}.parquet")
            self._sink = pa.OSFile(str(self.parts[-1]), "wb")
            self._writer = pq.ParquetWriter(self._sink, group.schema)
        self._writer.write_table(group, row_group_size=group.num_rows)
        self.rows += group.num_rows
        if self._sink.tell() >= FILE_BYTES:
            self._close_file()

    def close(self) -> list[Path]:
        self._close_file()
        named = [self.folder / f"{self.split}-{i:05d}-of-{len(self.parts):05d}.parquet" for i in range(len(self.parts))]
        for part, name in zip(self.parts, named):
            part.rename(name)
        return named

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


class _CopyCommit:
    """The commit of the copy, built from the head Hub.commit gives it on each try: nothing when that head
    holds this copy already (a try whose commit went through before the connection dropped)."""

    def __init__(self, hub: Hub, dest: str, plan: _Plan, splits: tuple[PreparedSplit, ...], scratch: Path):
        self.hub, self.dest, self.plan, self.splits, self.scratch = hub, dest, plan, splits, scratch
        self.created = False

    def __call__(self, head: str | None) -> list[CommitOperation] | None:
        if self.plan.made(_record(self.hub, self.dest, head)):
            return None
        self.created = True
        files = [path for split in self.splits for path in split.files]
        # A copy made from other inputs before: its data files go, so the card's patterns match these alone.
        held = self.hub.list_files(self.dest, head) if head else []
        stale = [path for path in held if path.startswith(f"{DATA_DIR}/") and path not in files]
        return [
            *(CommitOperationDelete(path) for path in stale),
            *(CommitOperationAdd(path, str(self.scratch / path)) for path in files),
            CommitOperationAdd("README.md", _card(self.plan, self.splits).encode()),
            CommitOperationAdd(RECORD_PATH, (json.dumps(self.plan.record(self.splits), indent=1) + "\n").encode()),
        ]


def _card(plan: _Plan, splits: tuple[PreparedSplit, ...]) -> str:
    """The source's card, its data files pointed at the copy's, with a note of where the copy comes from."""
    card = DatasetCard(plan.card or "")
    data = card.data.to_dict()
    data_files = [{"split": split.name, "path": f"{DATA_DIR}/{split.name}-*"} for split in splits]
    data["configs"] = [{"config_name": "default", "data_files": data_files}]
    if not isinstance(data.get("dataset_info"), dict):
        data.pop("dataset_info", None)  # one entry per config of the source: only its default config is copied
    card.data = DatasetCardData(**data)
    groups = "; ".join(f"{split.name}: {split.rows} rows in row groups of {split.rows_per_group}" for split in splits)
    card.text = (card.text.rstrip() + "\n\n" if card.text.strip() else "") + (
        f"Republished with `coopt-hub prepare-source` from {plan.source} at commit {plan.revision}: the same "
        f"rows in the same order (the same sample ids) and splits, in row groups sized for sharding ({groups}).\n"
    )
    return str(card)
