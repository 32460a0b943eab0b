"""`coopt-hub merge`: check every shard branch, align all targets to the best prior, publish vN on main.

Nothing reaches main until every check has passed. The work streams so that memory follows a range
of rows, not a shard or the dataset: each shard is downloaded, then read range by range, checked
and (re-)aligned, and its targets go straight into a safetensors file laid out up front in id order;
the parquet files are then written row group by row group from that file and the source's row
groups. With `verify`, each shard is also re-encoded in part with its declared prior
(coopt_hub.verify) and the merge is refused unless every shard passes. Main changes in one commit
pinned to the head the merge was computed against, and that commit is tagged.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from coopt_hub import __version__, faults
from coopt_hub.align import apply_alignment, fit_alignment
from coopt_hub.card import prior_label, render_card
from coopt_hub.errors import ConfigError, ConflictError, ShardFileError, SourceError, VerificationError
from coopt_hub.hub import Hub
from coopt_hub.plan import Plan
from coopt_hub.publish import load_plan
from coopt_hub.source import SourceLayout, iter_source_batches, repo_path, resolve_source
from coopt_hub.status import DONE, MISSING, CollaborationStatus, ShardStatus, collaboration_status, expected_ids
from coopt_hub.storage import (
    AnchorOutputs,
    ShardHeader,
    ShardReader,
    ShardResult,
    ShardRows,
    remote_paths,
    shard_prefix,
)

if TYPE_CHECKING:
    from coopt_hub.verify import ShardVerification

MANIFEST_PATH = "coopt/manifest.json"
TARGETS_PATH = "targets/train.safetensors"
DATA_DIR = "data"
MANIFEST_VERSION = 1
IMAGE_MODES = ("copy", "reference")
# Everything under these folders on main belongs to the merged version and is replaced as a whole;
# the plan and anchors under coopt/ stay.
MERGED_FOLDERS = ("data/", "targets/")
ADDED_COLUMNS = ("id", "target", "shard")
_TAG = re.compile(r"v(\d+)")
# A row group carries about this many bytes, and a data file is closed after about this many, so a
# streaming reader fetches reasonable ranges and no file grows past what the Hub handles comfortably.
ROW_GROUP_BYTES = 64 << 20
FILE_BYTES = 1 << 30
# Rows of a shard read, checked and re-aligned at a time: bounds what a shard costs in memory to
# about 16384 x dim x 14 bytes (fp16 raw and aligned as read, float32 product, fp16 result).
ALIGN_CHUNK_ROWS = 16384
# `verify` draws each shard's sample with this seed, as `coopt-hub verify` does by default.
VERIFY_SEED = 0


@dataclass(frozen=True)
class SourcePin:
    repo: str
    revision: str
    split: str
    image_column: str


@dataclass(frozen=True)
class Reference:
    shard: int
    branch: str
    commit: str
    prior: dict[str, Any]
    fingerprint: str
    uniformity: float


@dataclass(frozen=True)
class MergedShard:
    shard: int
    branch: str
    commit: str
    prior: dict[str, Any]
    fingerprint: str
    output_dim: int
    uniformity: float
    residual: float  # the participant's own alignment fit, as pushed
    realigned: bool  # aligned to another reference by the participant, re-aligned here
    realigned_residual: float | None  # the fit made here, when realigned
    rows: int
    checksums: dict[str, str]
    # Its samples left out as undecodable images: no target, so not in the merged split either.
    skipped_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class MergeVerification:
    """How every merged shard was verified against its declared prior before the merge."""

    sample: int  # images of each shard re-encoded (all anchors are re-encoded too)
    seed: int
    min_cosine: float
    tolerance: float


@dataclass(frozen=True)
class SplitRecord:
    files: tuple[str, ...]
    num_rows: int


@dataclass(frozen=True)
class Manifest:
    version: int
    tag: str
    images: str
    source: SourcePin
    dim: int
    label_column: str | None
    plan_hash: str
    reference: Reference
    shards: tuple[MergedShard, ...]
    partial: bool
    missing: tuple[int, ...]
    splits: dict[str, SplitRecord]
    tool_version: str
    verification: MergeVerification | None = None  # None: the shards were not verified at merge

    @property
    def content_key(self) -> tuple:
        """What makes two merges the same dataset: the plan, the image mode and each shard's commit."""
        return self.plan_hash, self.images, tuple((s.shard, s.commit) for s in self.shards)

    def satisfies(self, content_key: tuple, verification: MergeVerification | None) -> bool:
        """Whether this merge is the one asked for: the same dataset, verified the same way when that is asked.

        A merge without verification accepts a verified one; a verified merge of a dataset published
        unverified is a new version, so that its card says it was verified.
        """
        return self.content_key == content_key and (verification is None or verification == self.verification)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                **{
                    **data,
                    "source": SourcePin(**data["source"]),
                    "reference": Reference(**data["reference"]),
                    "shards": tuple(MergedShard(**{**shard, "skipped_ids": tuple(shard.get("skipped_ids", ()))})
                                    for shard in data["shards"]),
                    "missing": tuple(data["missing"]),
                    "splits": {name: SplitRecord(tuple(s["files"]), s["num_rows"])
                               for name, s in data["splits"].items()},
                    "verification": MergeVerification(**data["verification"]) if data.get("verification") else None,
                }
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise VerificationError(
                f"{MANIFEST_PATH} is not a manifest written by coopt-hub merge ({type(err).__name__}: {err}).",
                hint=f"It was edited by hand: commit back the {MANIFEST_PATH} of the last vN tag, then rerun.",
            ) from err


@dataclass(frozen=True)
class MergeResult:
    repo: str
    tag: str
    commit: str
    created: bool  # False: main already held this merge
    manifest: Manifest


def _quiet(message: str) -> None:
    """Default progress sink: library callers see nothing unless they ask."""


def merge(
    hub: Hub,
    repo: str,
    *,
    tag: str | None = None,
    images: str = "copy",
    allow_partial: bool = False,
    verify: bool = False,
    verify_sample: int = 64,
    progress: Callable[[str], None] = _quiet,
) -> MergeResult:
    """Check every shard, align them to the lowest-V prior, and publish the dataset on main as a tag.

    `verify` also re-encodes `verify_sample` images of each shard and all anchors with the shard's
    declared prior (coopt_hub.verify.verify_shard) and refuses the merge unless every shard passes.
    """
    if images not in IMAGE_MODES:
        raise ConfigError(f"--images must be one of {IMAGE_MODES}, got {images!r}.")
    if verify_sample < 1:
        raise ConfigError(f"--verify-sample must be at least 1, got {verify_sample}.")
    status = collaboration_status(hub, repo)
    plan = status.plan
    _, tags = hub.refs(repo)
    if tag is not None:
        _check_tag_free(repo, tag, tags)
    done = _shards_to_merge(status, allow_partial)
    missing = tuple(s.shard for s in status.shards if s.state != DONE)

    previous = _read_manifest(hub, repo, status.main)
    wanted_key = (plan.plan_hash, images, tuple((s.shard, s.commit) for s in done))
    verification = _Verification(hub, repo, plan, verify_sample, progress) if verify else None
    record = verification.record if verification is not None else None
    if (
        previous is not None
        and previous.satisfies(wanted_key, record)
        and _claim_tag(hub, repo, previous.tag, status.main)
    ):
        return MergeResult(repo, previous.tag, status.main, created=False, manifest=previous)

    reference = min(done, key=lambda s: (s.header.uniformity, s.shard))
    progress(f"Reference prior: shard {reference.shard} (V = {reference.header.uniformity:.4f}).")
    layout = resolve_source(plan.source_repo, plan.source_revision, plan.split, plan.image_column, hub.token)
    source_features = read_source_features(layout, hub.token)
    _check_source(plan, layout, source_features)
    features = merged_features(source_features, plan.image_column, plan.dim, images)

    with tempfile.TemporaryDirectory(prefix="coopt-merge-") as scratch:
        workdir = Path(scratch)
        layout_ids = _IdLayout(plan, done)
        targets = _TensorFile(
            workdir / "targets.safetensors",
            {
                "ids": (np.dtype(np.int64), (layout_ids.num_rows,)),
                "targets": (np.dtype(np.float16), (layout_ids.num_rows, plan.dim)),
                "raw": (np.dtype(np.float16), (layout_ids.num_rows, plan.dim)),
            },
            metadata={
                "format": "coopt-merged-targets",
                "plan_hash": plan.plan_hash,
                "source": f"{plan.source_repo}@{plan.source_revision}",
                "reference_fingerprint": reference.header.fingerprint,
            },
        )
        with targets:
            targets.write_rows("ids", 0, layout_ids.present_ids)
            merged = _merge_targets(
                hub, repo, plan, done, reference, layout_ids, targets, workdir, verification, progress
            )
            progress("Writing parquet files.")
            data_files, splits = _write_splits(
                layout, plan, features, _TargetJoin(plan, layout_ids, targets), workdir, hub.token
            )

        def manifest_for(version: str) -> Manifest:
            return Manifest(
                version=MANIFEST_VERSION,
                tag=version,
                images=images,
                source=SourcePin(layout.repo, layout.revision, plan.split, plan.image_column),
                dim=plan.dim,
                label_column=label_column(features),
                plan_hash=plan.plan_hash,
                reference=Reference(
                    reference.shard,
                    reference.branch,
                    reference.commit,
                    reference.header.prior,
                    reference.header.fingerprint,
                    reference.header.uniformity,
                ),
                shards=merged,
                partial=bool(missing),
                missing=missing,
                splits=splits,
                tool_version=__version__,
                verification=record,
            )

        source_card = read_source_card(hub, layout)

        def card_for(manifest: Manifest) -> str:
            return render_card(manifest, plan, features, source_card, repo, hub.endpoint)

        uploads = [*data_files, (workdir / "targets.safetensors", TARGETS_PATH)]
        message = (
            f"coopt-hub merge: {len(merged)} shards aligned to {reference.branch} "
            f"({reference.header.prior.get('model')})"
        )
        return _publish(hub, repo, plan, uploads, manifest_for, card_for, tag, message, progress)


# Checks -------------------------------------------------------------------------------------------


def _check_tag_free(repo: str, tag: str, tags: dict[str, str]) -> None:
    if tag in tags:
        raise ConflictError(
            f"Tag {tag} already exists in {repo} (commit {tags[tag][:12]}); nothing was written.",
            hint=f"Omit --tag to take the next free version ({next_tag(tags)}), or pass another name.",
        )


def next_tag(tags: dict[str, str] | list[str]) -> str:
    """v1, or one above the highest vN among `tags`."""
    numbers = [int(match.group(1)) for name in tags if (match := _TAG.fullmatch(name))]
    return f"v{max(numbers, default=0) + 1}"


def _shards_to_merge(status: CollaborationStatus, allow_partial: bool) -> list[ShardStatus]:
    stale = [s for s in status.shards if s.state not in (DONE, MISSING)]
    if stale:
        details = "; ".join(f"shard {s.shard} ({s.branch}@{s.commit[:12]}): {', '.join(s.problems)}" for s in stale)
        raise VerificationError(
            f"Cannot merge {status.repo}: {details}. Nothing was written.",
            hint="Those participants must run `coopt-hub optimize --shard K --push` again against the plan on main.",
        )
    done = status.in_state(DONE)
    missing = status.in_state(MISSING)
    if not done:
        raise VerificationError(
            f"No shard of {status.repo} has been pushed yet; nothing to merge.",
            hint="Participants push with `coopt-hub optimize --shard K --push`; `coopt-hub status` shows progress.",
        )
    if missing and not allow_partial:
        raise VerificationError(
            f"Shard(s) {', '.join(str(s.shard) for s in missing)} of {status.repo} have not been pushed "
            f"({len(done)} of {len(status.shards)} done). Nothing was written.",
            hint="Wait for them, or pass --allow-partial to publish the shards that are there (the card says so).",
        )
    return done


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


_RERUN_HINT = "That participant must run `coopt-hub optimize --shard K --push` again."


def _where(status: ShardStatus) -> str:
    return f"Shard {status.shard} ({status.branch}@{status.commit[:12]})"


def _check_shard(status: ShardStatus, header: ShardHeader, anchors: AnchorOutputs, plan: Plan) -> None:
    """The checks beyond ShardReader's own that need no target rows; `_check_rows` does the ids."""
    if header.to_dict() != status.header.to_dict():
        raise VerificationError(f"{_where(status)}: the downloaded files differ from the header read before.",
                                hint=_RERUN_HINT)
    if not np.array_equal(anchors.ids, np.asarray(plan.anchor_ids, dtype=np.int64)):
        raise VerificationError(f"{_where(status)}: its anchor outputs are not for the plan's anchor ids.",
                                hint=_RERUN_HINT)


def _check_rows(status: ShardStatus, rows: ShardRows, plan_ids: np.ndarray) -> None:
    """The range's ids are `plan_ids` (the plan's less the shard's skipped ids) for those rows; status
    checked that the header's row count is theirs."""
    if not np.array_equal(rows.ids, plan_ids[rows.start : rows.start + rows.ids.size]):
        raise VerificationError(
            f"{_where(status)}: its sample ids are not the plan's ids for shard {status.shard} less those it "
            "skipped (a sample is missing, duplicated or belongs to another shard).",
            hint=_RERUN_HINT,
        )


# Targets ------------------------------------------------------------------------------------------


class _IdLayout:
    """Which shard each sample id comes from, and its row in the merged (id-ordered) targets; ids a
    shard skipped belong to none, like those of a missing shard."""

    def __init__(self, plan: Plan, shards: list[ShardStatus]):
        self.shard_of = np.full(plan.num_rows, -1, dtype=np.int32)
        for status in shards:
            self.shard_of[expected_ids(plan, status.shard, status.header)] = status.shard
        present = self.shard_of >= 0
        self.present_ids = np.flatnonzero(present).astype(np.int64)
        self.position = np.cumsum(present, dtype=np.int64) - 1
        self.num_rows = int(self.present_ids.size)


def _merge_targets(
    hub: Hub,
    repo: str,
    plan: Plan,
    done: list[ShardStatus],
    reference: ShardStatus,
    layout: _IdLayout,
    targets: _TensorFile,
    workdir: Path,
    verification: _Verification | None,
    progress: Callable[[str], None],
) -> tuple[MergedShard, ...]:
    """Download, check and align one shard at a time into `targets`; the reference goes first,
    so its anchors are at hand for the others. With `verification`, every shard is verified before
    the refusal that names each one that did not pass."""
    reference_space: np.ndarray | None = None
    merged = []
    for status in sorted(done, key=lambda s: (s.shard != reference.shard, s.shard)):
        progress(f"Shard {status.shard}: downloading and checking {status.branch}@{status.commit[:12]}.")
        directory = _download_shard(hub, repo, status, workdir)
        entry, projected = _merge_shard(
            plan, status, directory, reference, reference_space, layout, targets, verification, progress
        )
        reference_space = projected if reference_space is None else reference_space
        merged.append(entry)
        shutil.rmtree(directory)
        faults.reach("merge-shard")
    if verification is not None:
        verification.refuse_failures()
    return tuple(sorted(merged, key=lambda s: s.shard))


def _merge_shard(
    plan: Plan,
    status: ShardStatus,
    directory: Path,
    reference: ShardStatus,
    reference_space: np.ndarray | None,
    layout: _IdLayout,
    targets: _TensorFile,
    verification: _Verification | None,
    progress: Callable[[str], None],
) -> tuple[MergedShard, np.ndarray]:
    """Check one downloaded shard and write its raw and aligned rows, a range at a time; return its
    manifest entry and projected anchors (`reference_space` is None for the reference itself)."""
    try:
        with ShardReader(directory / shard_prefix(status.shard), verify=True) as shard:
            header, anchors = shard.header, shard.anchors
            _check_shard(status, header, anchors, plan)
            aligned_to = header.reference["fingerprint"] if header.reference else header.fingerprint
            realigned = aligned_to != reference.header.fingerprint
            transform, realigned_residual = None, None
            if realigned:
                target_space = anchors.projected if reference_space is None else reference_space
                transform, realigned_residual = fit_alignment(anchors.projected, target_space)
                progress(f"Shard {status.shard}: re-aligning to shard {reference.shard} "
                         f"(residual {realigned_residual:.4f}).")
            _stream_rows(status, shard, plan, transform, layout, targets)
            if verification is not None:
                verification.check(status, shard.mapped(), anchors)
    except ShardFileError as err:
        raise VerificationError(f"{_where(status)}: {err} Nothing was written.", hint=err.hint) from err
    entry = MergedShard(
        shard=status.shard,
        branch=status.branch,
        commit=status.commit,
        prior=header.prior,
        fingerprint=header.fingerprint,
        output_dim=header.output_dim,
        uniformity=header.uniformity,
        residual=header.residual,
        realigned=realigned,
        realigned_residual=realigned_residual,
        rows=header.num_rows,
        checksums=header.checksums,
        skipped_ids=tuple(header.skipped_ids),
    )
    return entry, anchors.projected


def _stream_rows(
    status: ShardStatus,
    shard: ShardReader,
    plan: Plan,
    transform: np.ndarray | None,
    layout: _IdLayout,
    targets: _TensorFile,
) -> None:
    """Every range of `shard` into `targets`. A problem found in a range is raised only after the
    reader has compared the checksums (at the end of the ranges), so that bad ids or values that
    come from damage are reported as damage."""
    plan_ids = expected_ids(plan, status.shard, status.header)
    problem: VerificationError | None = None
    for rows in shard.chunks(ALIGN_CHUNK_ROWS):
        if problem is not None:
            continue
        try:
            _check_rows(status, rows, plan_ids)
            _write_rows(status, rows, transform, layout, targets)
        except VerificationError as err:
            problem = err
    if problem is not None:
        raise problem


def _write_rows(
    status: ShardStatus, rows: ShardRows, transform: np.ndarray | None, layout: _IdLayout, targets: _TensorFile
) -> None:
    """One range of a shard into the merged targets, re-aligned by `transform` unless that is None."""
    aligned = rows.aligned  # finite: the reader checked it
    if transform is not None:
        aligned = apply_alignment(rows.raw, transform).astype(np.float16)
        if not np.isfinite(aligned).all():
            raise VerificationError(
                f"Shard {status.shard}: re-aligned targets overflow float16 (NaN/inf). Nothing was written.",
                hint="Its targets are far off the reference's scale; that participant should run optimize again.",
            )
    positions = layout.position[rows.ids]
    # A shard's rows are runs of consecutive ids (its storage units), so a run is one write.
    for first, stop in _runs(positions):
        start = int(positions[first])
        targets.write_rows("raw", start, rows.raw[first:stop])
        targets.write_rows("targets", start, aligned[first:stop])


class _Verification:
    """`merge --verify`: each shard checked against its declared prior (coopt_hub.verify) while its
    downloaded files are at hand; the refusal comes after the last shard, naming every failure."""

    def __init__(self, hub: Hub, repo: str, plan: Plan, sample: int, progress: Callable[[str], None]):
        from coopt_hub.verify import PriorLoader, Thresholds  # torch and open_clip: only when asked

        thresholds = Thresholds()
        self.record = MergeVerification(sample, VERIFY_SEED, thresholds.min_cosine, thresholds.tolerance)
        self.hub, self.repo, self.plan, self.progress = hub, repo, plan, progress
        self.thresholds = thresholds
        self.priors = PriorLoader()  # keeps the last prior loaded: shards often share one
        self.results: list[ShardVerification] = []

    def check(self, status: ShardStatus, result: ShardResult, anchors: AnchorOutputs) -> None:
        from coopt_hub.verify import verify_shard

        self.progress(f"Shard {status.shard}: verifying with its declared prior {prior_label(status.header.prior)} "
                      f"({self.record.sample} images and all anchors re-encoded).")
        report = verify_shard(
            self.hub, self.repo, self.plan, status.shard, self.record.sample, self.record.seed,
            thresholds=self.thresholds, commit=status.commit, files=(result, anchors), priors=self.priors,
        )
        self.progress(f"Shard {status.shard}: verification {report.status}.")
        for check in report.problems():
            self.progress(f"Shard {status.shard}: {check.name} ({check.status}): {check.message}")
        self.results.append(report)

    def refuse_failures(self) -> None:
        from coopt_hub.verify import FAILED, failure_error

        error = failure_error(self.results, self.repo)
        if error is None:
            return
        if any(report.status == FAILED for report in self.results):
            hint = error.hint
        else:
            hint = (f"The declared weights are not available here. `coopt-hub verify {self.repo} --checkpoint-dir DIR` "
                    "checks with local copies of them; merging without --verify publishes the shards unverified.")
        raise VerificationError(f"{error} Nothing was written.", hint=hint)


def _download_shard(hub: Hub, repo: str, status: ShardStatus, workdir: Path) -> Path:
    """Fetch the shard's files at the commit `status` read (not the branch, which may move on)."""
    local = workdir / f"shard-{status.shard}"
    paths = remote_paths(status.shard)
    for path in (paths.targets, paths.anchors):
        hub.download(repo, path, status.commit, local_dir=local)
    return local


def _runs(positions: np.ndarray) -> Iterator[tuple[int, int]]:
    """Index ranges [first, stop) of `positions` over which the values go up by exactly one."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    for first, stop in zip(np.r_[0, breaks], np.r_[breaks, positions.size]):
        if stop > first:
            yield int(first), int(stop)


class _TensorFile:
    """A safetensors file whose header is written first and whose tensors are filled in row ranges.

    Plain file I/O rather than a memory map: mapped pages count toward the process's resident memory
    until unmapped, page-cache pages do not, and the merged targets are the largest thing a merge holds.
    """

    _DTYPES = {np.dtype(np.int64): "I64", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}

    def __init__(self, path: Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata}
        self._tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            size = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": self._DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._tensors[name] = (dtype, shape, offset)
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header to 8-byte alignment
        self._data_start = 8 + len(encoded)
        self._file = open(path, "w+b")  # noqa: SIM115 - closed by __exit__
        self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._file.truncate(self._data_start + offset)

    def __enter__(self) -> _TensorFile:
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _seek(self, name: str, row: int) -> tuple[np.dtype, int]:
        dtype, shape, offset = self._tensors[name]
        row_items = int(np.prod(shape[1:]))
        self._file.seek(self._data_start + offset + row * row_items * dtype.itemsize)
        return dtype, row_items

    def write_rows(self, name: str, start: int, rows: np.ndarray) -> None:
        dtype, _ = self._seek(name, start)
        self._file.write(np.ascontiguousarray(rows, dtype=dtype).data)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype, row_items = self._seek(name, start)
        shape = self._tensors[name][1]
        out = np.empty((stop - start, *shape[1:]), dtype=dtype)
        self._file.readinto(out.data)
        return out


# Parquet ------------------------------------------------------------------------------------------


def read_source_features(layout: SourceLayout, token: str | None = None):
    """The source split's datasets Features: declared in its card, else read from a file's schema."""
    import datasets

    if layout.features:
        return datasets.Features.from_dict(layout.features)
    from huggingface_hub import HfFileSystem

    with HfFileSystem(token=token).open(repo_path(layout.repo, layout.revision, layout.files[0]), "rb") as handle:
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


class _TargetJoin:
    """The merged split's targets and shard for a run of consecutive sample ids."""

    def __init__(self, plan: Plan, ids: _IdLayout, targets: _TensorFile):
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


def _write_splits(
    layout: SourceLayout, plan: Plan, features, join: _TargetJoin, workdir: Path, token: str | None
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
    join: _TargetJoin | None,
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


# Publishing ---------------------------------------------------------------------------------------


def _read_manifest(hub: Hub, repo: str, revision: str) -> Manifest | None:
    data = hub.read_json(repo, MANIFEST_PATH, revision)
    return Manifest.from_dict(data) if data else None


def _claim_tag(hub: Hub, repo: str, tag: str, commit: str) -> bool:
    """Point `tag` at `commit`; False when another commit already holds that tag."""
    try:
        hub.create_tag(repo, tag, commit, f"coopt-hub merge {tag}")
    except ConflictError:
        _, tags = hub.refs(repo)
        return tags.get(tag) == commit
    return True


def _publish(
    hub: Hub,
    repo: str,
    plan: Plan,
    uploads: list[tuple[Path, str]],
    manifest_for: Callable[[str], Manifest],
    card_for: Callable[[Manifest], str],
    tag: str | None,
    message: str,
    progress: Callable[[str], None],
) -> MergeResult:
    """One commit on main with everything, then the tag; safe against concurrent merges.

    The small files (manifest, card) carry the version name, so they are rebuilt on every try from
    the tags that exist then; the big files are uploaded once and reused.
    """
    uploaded_paths = {path for _, path in uploads}
    wanted = manifest_for("")
    for _ in range(hub.retry.attempts):
        state: dict[str, Any] = {"manifest": None, "committed": False}

        def build(head: str | None):
            state["committed"] = False
            _, tags = hub.refs(repo)
            current = _read_manifest(hub, repo, head)
            there = current is not None and current.satisfies(wanted.content_key, wanted.verification)
            if there and tags.get(current.tag, head) == head:
                # This merge is already there (an earlier try, or a concurrent merge of the same
                # shards) and its version name is still its own.
                state["manifest"] = current
                return None
            manifest = manifest_for(tag or next_tag(tags))
            state["manifest"] = manifest
            if tag is not None:
                _check_tag_free(repo, tag, tags)
            if load_plan(hub, repo, head).plan_hash != plan.plan_hash:
                raise ConflictError(
                    f"The plan on {repo}'s main changed during the merge; nothing was written.",
                    hint="Check `coopt-hub status`, then run the merge again.",
                )
            card = card_for(manifest)
            stale = [path for path in hub.list_files(repo, head) if path.startswith(MERGED_FOLDERS)]
            state["committed"] = True
            return [
                *(CommitOperationDelete(path) for path in stale if path not in uploaded_paths),
                *(CommitOperationAdd(path, str(local)) for local, path in uploads),
                CommitOperationAdd(MANIFEST_PATH, manifest.to_json().encode()),
                CommitOperationAdd("README.md", card.encode()),
            ]

        progress(f"Committing {len(uploads)} data files to main.")
        commit = hub.commit(repo, "main", build, message=message)
        faults.reach("merge-tag")
        manifest = state["manifest"]
        if _claim_tag(hub, repo, manifest.tag, commit):
            return MergeResult(repo, manifest.tag, commit, created=state["committed"], manifest=manifest)
        if tag is not None:
            raise ConflictError(
                f"Tag {tag} was taken by a concurrent merge; main holds this merge untagged at {commit[:12]}.",
                hint="Run the merge again with another --tag (or none): it tags the commit without re-uploading.",
            )
        # Another merge tagged this version between our commit and our tag: the next try renames
        # ours in a small follow-up commit (the data files are already there).
    raise ConflictError(
        f"Could not claim a version tag on {repo} after {hub.retry.attempts} tries: other merges keep taking them.",
        hint="Run the merge again when the other merges have finished.",
    )
