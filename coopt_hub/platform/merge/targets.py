"""The merged targets: each shard downloaded, checked and (re-)aligned range by range into one
safetensors file laid out in id order.
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa

from coopt_hub.core import faults
from coopt_hub.core.ahead import ahead
from coopt_hub.core.align import AlignmentFit, select_alignment
from coopt_hub.core.files import consecutive_runs
from coopt_hub.core.halves import to_float16, to_float32
from coopt_hub.core.manifest import MergedShard
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import Progress
from coopt_hub.core.shardfile import (
    ExpectedIds,
    RemoteFile,
    ShardHeader,
    ShardReader,
    ShardRows,
    TensorFile,
    all_finite,
    expected_ids,
)
from coopt_hub.errors import ShardFileError, SourceError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.platform.merge.reference import ReferenceChoice
from coopt_hub.platform.merge.verification import MergeVerifier
from coopt_hub.platform.status import ShardStatus, download_shard, remote_targets
from coopt_hub.platform.verify import ALIGN_CHUNK_ROWS

# Below this many rows per run of consecutive positions on average, rows are written window by window
# (write_at) instead of with a write call per run.
SHORT_RUN_ROWS = 64
SCATTER_WINDOW_ROWS = 16384  # 16 MiB per fp16 tensor at 512 dimensions
_RERUN_HINT = "That participant must run `coopt-hub optimize --shard K --push` again."
_Item = TypeVar("_Item")


def _where(status: ShardStatus) -> str:
    return f"Shard {status.shard} ({status.branch}@{status.commit[:12]})"


def _check_shard(status: ShardStatus, header: ShardHeader) -> None:
    """The check beyond ShardReader's own that needs no target rows; `_check_rows` does the ids. With
    the header status read, the checksums pin the anchors the reference was chosen from, too."""
    if header.to_dict() != status.header.to_dict():
        raise VerificationError(f"{_where(status)}: the downloaded files differ from the header read before.",
                                hint=_RERUN_HINT)


def _check_rows(status: ShardStatus, rows: ShardRows, plan_ids: ExpectedIds) -> None:
    """The range's ids are `plan_ids` (the plan's less the shard's skipped ids) for those rows; status
    checked that the header's row count is theirs."""
    if not np.array_equal(rows.ids, plan_ids.rows(rows.start, rows.start + rows.ids.size)):
        raise VerificationError(
            f"{_where(status)}: its sample ids are not the plan's ids for shard {status.shard} less those it "
            "skipped (a sample is missing, duplicated or belongs to another shard).",
            hint=_RERUN_HINT,
        )


class IdLayout:
    """Which shard each sample id comes from, and its row in the merged (id-ordered) targets; ids a
    shard skipped belong to none, like those of a missing shard.

    Kept in the plan's terms rather than as a slot per id, so that a merge's memory does not grow
    with the rows: a plan by storage units gives each unit's shard, and the absent ids are runs (the
    units of shards not merged) and single ids (those the merged shards skipped). Arrays over every
    id (its shard, its row, the ids present: 20 bytes per id) took a merge's peak RSS with the
    evaluation from 499 MiB at 1M x 512 to 595 MiB at 4M; with this layout (and ExpectedIds), 492
    and 508. A plan that assigns single rows keeps one small integer per id, since its shards are a
    permutation of them, and the ids of a missing shard.
    """

    def __init__(self, plan: Plan, shards: list[ShardStatus]):
        self.plan = plan
        merged = {status.shard: status for status in shards}
        self._per_row: np.ndarray | None = None
        if plan.granularity == "row":
            self._per_row = np.full(plan.num_rows, -1, dtype=np.min_scalar_type(-plan.num_shards))
            for status in shards:
                self._per_row[expected_ids(plan, status.shard, status.header)] = status.shard
            singles = [np.flatnonzero(self._per_row < 0)]
            absent_units = np.zeros(0, dtype=bool)
        else:
            self._stops = np.array([unit.stop for unit in plan.units], dtype=np.int64)
            self._unit_shards = np.array([k if k in merged else -1 for k in plan.unit_shards], dtype=np.int32)
            absent_units = self._unit_shards < 0
            singles = [ExpectedIds(plan, k, status.header).skipped for k, status in merged.items()]
        # Absent ids: whole units (runs, in id order) and single ids (sorted; never inside those runs).
        self._run_starts = np.array([u.start for u, gone in zip(plan.units, absent_units) if gone], dtype=np.int64)
        run_rows = np.array([u.num_rows for u, gone in zip(plan.units, absent_units) if gone], dtype=np.int64)
        self._rows_before_run = np.concatenate([[0], np.cumsum(run_rows)])
        self._singles = np.sort(np.concatenate([np.zeros(0, np.int64), *singles]))
        self.num_rows = plan.num_rows - int(run_rows.sum()) - int(self._singles.size)

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard of each of `ids` (valid sample ids), -1 for an id no merged shard holds."""
        if self._per_row is not None:
            return self._per_row[ids].astype(np.int32)
        shard = self._unit_shards[np.searchsorted(self._stops, ids, side="right")]
        if self._singles.size:
            at = np.minimum(np.searchsorted(self._singles, ids), self._singles.size - 1)
            shard[self._singles[at] == ids] = -1
        return shard

    def position(self, ids: np.ndarray) -> np.ndarray:
        """The merged row of each of `ids`, which must be ids a merged shard holds: the id less the
        absent ids before it."""
        runs_before = np.searchsorted(self._run_starts, ids, side="right")
        return ids - self._rows_before_run[runs_before] - np.searchsorted(self._singles, ids)

    def present_ids(self, block: int = 1 << 20) -> Iterator[np.ndarray]:
        """The ids merged shards hold, in order, `block` ids of the plan at a time."""
        for start in range(0, self.plan.num_rows, block):
            ids = np.arange(start, min(start + block, self.plan.num_rows), dtype=np.int64)
            yield ids[self.shard_of(ids) >= 0]


class MergedTargets:
    """The merged targets file of the shards `done`, aligned to `reference`'s prior: `ids`, `targets`
    (aligned) and `raw`, laid out up front in id order, filled shard by shard (`merge_targets`, two
    shards at a time), then read back in runs of ids to join the source's rows. Open from
    construction to the end of its `with` block."""

    def __init__(self, path: Path, plan: Plan, done: list[ShardStatus], reference: ShardStatus):
        self.path, self.plan, self.done, self.reference = path, plan, done, reference
        self.ids = IdLayout(plan, done)
        rows = self.ids.num_rows
        self.file = TensorFile(
            path,
            {
                "ids": (np.dtype(np.int64), (rows,)),
                "targets": (np.dtype(np.float16), (rows, plan.dim)),
                "raw": (np.dtype(np.float16), (rows, plan.dim)),
            },
            metadata={
                "format": "coopt-merged-targets",
                "plan_hash": plan.plan_hash,
                "source": f"{plan.source_repo}@{plan.source_revision}",
                "reference_fingerprint": reference.header.fingerprint,
            },
        )
        written = 0
        for present in self.ids.present_ids():
            self.file.write_rows("ids", written, present)
            written += present.size
        self._widened = ReusedBuffers(np.float32)
        self._writing = threading.Lock()  # two shards merge side by side (merge_targets' lanes)

    def __enter__(self) -> MergedTargets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.__exit__(*exc)

    def rows_for(self, sample_ids: np.ndarray) -> tuple[np.ndarray, pa.Array, pa.Array]:
        """For a run of consecutive sample ids: (which of them were merged, their targets, their shards);
        ids of missing shards, and ids a shard skipped as undecodable, are dropped."""
        plan = self.plan
        if sample_ids[-1] >= plan.num_rows:
            raise SourceError(
                f"Split {plan.split} of {plan.source_repo} has more rows than the plan's {plan.num_rows}.",
                hint="The plan on main does not describe this source; check it was not edited by hand.",
            )
        shard = self.ids.shard_of(sample_ids)
        keep = shard >= 0
        # Merged rows are stored in id order, so a run of ids is one contiguous read.
        position = self.ids.position(sample_ids[keep])
        values = self.file.read_rows("targets", int(position[0]), int(position[-1]) + 1) if keep.any() else None
        if values is None:
            flat = np.zeros(0, np.float32)
        else:
            flat = self._widened.take(values.size).reshape(values.shape)
            to_float32(values, out=flat)
        return (keep, pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), plan.dim),
                pa.array(shard[keep], pa.int32()))

    def write(self, rows: ShardRows, aligned: np.ndarray) -> None:
        """One range of a shard: its raw rows and `aligned`, at its ids' places. Safe from several
        threads: the file's position is shared, and a scattered write reads and rewrites a window
        that another shard's rows may share."""
        positions = self.ids.position(rows.ids)
        with self._writing:
            for name, values in (("raw", rows.raw), ("targets", aligned)):
                write_at(self.file, name, positions, values)


class ReusedBuffers:
    """Flat arrays of `dtype` handed out again once nothing refers to them: a row group's float32
    targets (32 MiB) go into a buffer that an earlier row group's Arrow arrays no longer hold,
    rather than into new memory, whose first touch costs page faults (microseconds each on a VM):
    a 1M x 512 merge (2 GB of float32 targets) took 1.12-1.25M faults, against 1.39-1.48M. A buffer that an
    array made from it still refers to (a row group queued or being encoded) is never handed out,
    whichever thread asks; at most `keep` buffers are kept, beyond them a request gets new memory."""

    def __init__(self, dtype: type, keep: int = 4):
        self.dtype, self.keep = np.dtype(dtype), keep
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> np.ndarray:
        """A flat array of `size` values (contents undefined), a view of a free buffer when there is one."""
        with self._lock:
            for buffer in self._buffers:
                # Any reference beyond those of an unused buffer seen the same way is a view or an
                # Arrow array made from it, still alive.
                if buffer.size >= size and sys.getrefcount(buffer) <= _UNUSED_REFERENCES:
                    return buffer[:size]
            fresh = np.empty(size, self.dtype)
            if len(self._buffers) < self.keep:
                self._buffers.append(fresh)
            return fresh


def _unused_references() -> int:
    """sys.getrefcount of an array held only by a list, read in a loop over it as ReusedBuffers.take
    reads it (the count the interpreter gives for the list, the loop name and the argument)."""
    for array in [np.empty(0)]:
        count = sys.getrefcount(array)
    return count


_UNUSED_REFERENCES = _unused_references()


def write_at(file: TensorFile, name: str, positions: np.ndarray, values: np.ndarray) -> None:
    """values[i] into row positions[i] of tensor `name`, for rising `positions`. A shard of a plan by
    storage units holds runs of consecutive ids: a write per run. A plan that assigns single rows
    scatters them: a window of the file at a time is read, its rows set in one numpy assignment
    and written back, rather than a write per row."""
    runs = list(consecutive_runs(positions))
    if len(runs) * SHORT_RUN_ROWS <= positions.size:
        for first, stop in runs:
            file.write_rows(name, int(positions[first]), values[first:stop])
        return
    first = 0
    while first < positions.size:
        start = int(positions[first])
        stop = int(np.searchsorted(positions, start + SCATTER_WINDOW_ROWS))
        window = file.read_rows(name, start, int(positions[stop - 1]) + 1)
        window[positions[first:stop] - start] = values[first:stop]
        file.write_rows(name, start, window)
        first = stop


@dataclass(frozen=True)
class _Realignment:
    """How a shard's aligned targets are made at merge: kept as pushed (`realigned` False) when its
    participant aligned them to the reference's prior; else `fit.apply(raw)`, or the raw outputs
    themselves (`fit` None) for the reference, whose raw outputs are the reference space."""

    realigned: bool
    fit: AlignmentFit | None = None


def merge_targets(
    hub: Hub,
    repo: str,
    targets: MergedTargets,
    choice: ReferenceChoice,
    workdir: Path,
    verification: MergeVerifier | None,
    progress: Progress,
) -> tuple[tuple[MergedShard, ...], dict[int, AlignmentFit]]:
    """Download, check and align the shards into `targets`, aligned to `choice.reference`, in two
    lanes side by side: the shards kept as pushed, whose merge waits on reading them, and those
    re-aligned here through a map, whose merge waits on the product (at 1M x 512: ~1.0-1.3 s and
    ~1.5 s a shard). In each lane the next shard downloads while one merges. The maps are fitted
    on a thread (_Maps) until the first is asked for. With `verification` (which fits maps of its
    own, under BLAS's process-wide thread limit), one shard at a time, the kept ones first, and
    every shard is verified before the refusal that names each one that did not pass; without it
    a problem stops the other lane at its next shard, and is raised (the kept lane's first, should
    both lanes fail).
    Returns the manifest's entries, in shard order, and the maps fitted for the shards re-aligned here."""

    # Verification re-encodes rows picked at random, so it needs the targets on disk; otherwise they
    # are read where they lie, range by range, and a re-aligned shard's aligned tensor is never fetched.
    on_disk = verification is not None
    by_shard = sorted(targets.done, key=lambda s: s.shard)
    mapped = [status for status in by_shard if _needs_map(status, choice)]
    kept = [status for status in by_shard if status not in mapped]
    lanes = [kept + mapped] if verification is not None else [lane for lane in (kept, mapped) if lane]

    def downloads(lane: list[ShardStatus], stop: threading.Event) -> Iterator[tuple[ShardStatus, Path, Path]]:
        for status in lane:
            if stop.is_set():
                return
            local = workdir / f"shard-{status.shard}"
            yield status, local, download_shard(hub, repo, status.shard, status.commit, local, targets=on_disk)

    merged, fits = [], {}
    with _Maps(choice, [status.shard for status in mapped], background=verification is None) as maps:

        def merge_lane(lane: list[ShardStatus], stop: threading.Event) -> None:
            for status, local, directory in ahead(downloads(lane, stop), name="coopt-merge-download"):
                if stop.is_set():
                    return
                progress.info(f"Shard {status.shard}: checking {status.branch}@{status.commit[:12]}.")
                remote = None if on_disk else remote_targets(hub, repo, status.shard, status.commit)
                entry, fit = _merge_shard(status, directory, remote, targets, choice, maps, verification, progress)
                merged.append(entry)
                if fit is not None:
                    fits[status.shard] = fit
                shutil.rmtree(local)
                faults.reach("merge-shard")

        _side_by_side(lanes, merge_lane, name="coopt-merge-lane")
    if verification is not None:
        verification.refuse_failures()
    return tuple(sorted(merged, key=lambda entry: entry.shard)), fits


def _side_by_side(lanes: list[list[_Item]], run: Callable[[list[_Item], threading.Event], None], name: str) -> None:
    """run(lane, stop) for each of `lanes`, each on its own thread (the only lane on this one). When
    one raises, or this thread is interrupted, `stop` is set, which `run` checks between items;
    once every lane has returned, the error of the first lane that failed, in lane order, is raised
    (a second lane's error is dropped: a merge refused names one shard, as one lane's would)."""
    stop = threading.Event()

    def guarded(lane: list[_Item]) -> None:
        try:
            run(lane, stop)
        except BaseException:
            stop.set()
            raise

    if len(lanes) <= 1:
        for lane in lanes:
            guarded(lane)
        return
    pool = ThreadPoolExecutor(len(lanes), thread_name_prefix=name)
    try:
        running = [pool.submit(guarded, lane) for lane in lanes]
        wait(running)
    except BaseException:  # an interrupt (Ctrl-C) here: the lanes stop at their next item too
        stop.set()
        raise
    finally:
        # Returns only once the lanes have: the caller's files are theirs until then, however many
        # interrupts come meanwhile.
        while True:
            try:
                pool.shutdown(wait=True)
                break
            except KeyboardInterrupt:
                stop.set()
    errors = [error for error in (future.exception() for future in running) if error is not None]
    if errors:
        raise errors[0]


class _Maps:
    """The alignment maps of the shards re-aligned here (select_alignment, ~0.5-1 s each at 1024
    anchors x 512 dims), fitted in turn on a thread (`background`) from the start, while the first
    shards download. The first shard that asks for its map stops the thread (the fit under way
    finishes, the rest are fitted when asked for: in merge_targets' lane of the re-aligned shards,
    beside the other lane, which only reads, hashes and writes), so no fit runs beside a product:
    that kept more BLAS buffers resident (a 1M x 512 merge with its evaluation peaked at
    592-608 MiB, against 569). Not in the `background` when the merge verifies shards: verification
    fits maps too, and BLAS's thread limit (align.one_blas_thread) is process-wide, so contexts
    entered on two threads could restore it out of order."""

    def __init__(self, choice: ReferenceChoice, shards: list[int], background: bool):
        self._choice = choice
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="coopt-merge-fit")
        self._fits = {shard: self._pool.submit(self._fit, shard) for shard in shards} if background else {}

    def __enter__(self) -> _Maps:
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _fit(self, shard: int) -> AlignmentFit:
        return select_alignment(*self._choice.paired_anchors(shard))

    def fit(self, shard: int) -> AlignmentFit:
        """`shard`'s map from its projected anchors to the reference's, as select_alignment chooses it."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        future = self._fits.get(shard)
        return self._fit(shard) if future is None or future.cancelled() else future.result()


def _merge_shard(
    status: ShardStatus,
    directory: Path,
    remote: RemoteFile | None,
    targets: MergedTargets,
    choice: ReferenceChoice,
    maps: _Maps,
    verification: MergeVerifier | None,
    progress: Progress,
) -> tuple[MergedShard, AlignmentFit | None]:
    """Check one shard (its anchors in `directory`, its targets there too or `remote`) and write its
    raw and aligned rows, a range at a time; return its manifest entry and the map it was re-aligned by."""
    try:
        with ShardReader(directory, verify=True, targets=remote) as shard:
            _check_shard(status, shard.header)
            realignment = _realignment(status, shard.header, choice, maps, progress)
            _stream_rows(status, shard, realignment, targets, progress)
            if verification is not None:
                verification.check(status, shard.mapped(), shard.anchors)
    except ShardFileError as err:
        raise VerificationError(f"{_where(status)}: {err} Nothing was written.", hint=err.hint) from err
    return _manifest_entry(status, shard.header, realignment, choice), realignment.fit


def _needs_map(status: ShardStatus, choice: ReferenceChoice) -> bool:
    """Whether the shard is re-aligned here through a map: aligned by its participant to another
    prior than the reference's, and not the reference itself (whose raw outputs are its targets)."""
    return _realigned(status.header, choice) and status.shard != choice.reference.shard


def _realigned(header: ShardHeader, choice: ReferenceChoice) -> bool:
    aligned_to = header.reference["fingerprint"] if header.reference else header.fingerprint
    return aligned_to != choice.reference.header.fingerprint


def _realignment(
    status: ShardStatus, header: ShardHeader, choice: ReferenceChoice, maps: _Maps, progress: Progress
) -> _Realignment:
    """Kept as pushed when the participant aligned to the reference's prior; the raw outputs for the
    reference itself; otherwise the map select_alignment chooses on held-out anchors, from the
    shard's projected anchors to the reference's (fitted by `maps`)."""
    reference = choice.reference
    if not _realigned(header, choice):
        return _Realignment(realigned=False)
    if status.shard == reference.shard:
        progress.info(f"Shard {status.shard}: the reference, aligned by its participant to another prior; "
                      "its own raw outputs are its targets.")
        return _Realignment(realigned=True)
    fit = maps.fit(status.shard)
    progress.info(f"Shard {status.shard}: re-aligning to shard {reference.shard} ({fit.method}; residual "
                  f"{fit.cv_residual:.4f} held out, {fit.residual:.4f} in-sample).")
    return _Realignment(realigned=True, fit=fit)


def _manifest_entry(
    status: ShardStatus, header: ShardHeader, realignment: _Realignment, choice: ReferenceChoice
) -> MergedShard:
    score = choice.score(status.shard)
    if realignment.realigned:
        alignment = realignment.fit.to_dict() if realignment.fit is not None else None
    else:
        alignment = header.alignment  # None in headers before schema version 2
    return MergedShard(
        shard=status.shard,
        branch=status.branch,
        commit=status.commit,
        prior=header.prior,
        fingerprint=header.fingerprint,
        output_dim=header.output_dim,
        uniformity=score.common_uniformity,
        residual=header.residual,
        realigned=realignment.realigned,
        realigned_residual=realignment.fit.residual if realignment.fit is not None else None,
        rows=header.num_rows,
        checksums=header.checksums,
        skipped_ids=tuple(header.skipped_ids),
        alignment=alignment,
        uniformity_native=score.native_uniformity,
        noise_like=score.noise_like,
    )


def _stream_rows(
    status: ShardStatus, shard: ShardReader, realignment: _Realignment, targets: MergedTargets, progress: Progress
) -> None:
    """Every range of `shard` into `targets`. A problem found in a range is raised only after the
    reader has compared the checksums (at the end of the ranges), so that bad ids or values that
    come from damage are reported as damage."""
    plan_ids = ExpectedIds(targets.plan, status.shard, status.header)
    problem: VerificationError | None = None
    with progress.bar(shard.num_rows, f"Shard {status.shard}: merging", unit="rows") as bar:
        # The next range is read, hashed and checked while this one is aligned and written. A shard
        # re-aligned here has its pushed aligned targets left unread: nothing of them is merged.
        ranges = shard.chunks(ALIGN_CHUNK_ROWS, aligned=not realignment.realigned)
        for rows in ahead(ranges, name="coopt-merge-read"):
            bar.update(rows.ids.size)
            if problem is not None:
                continue
            try:
                _check_rows(status, rows, plan_ids)
                targets.write(rows, _aligned(status, rows, realignment))
            except VerificationError as err:
                problem = err
    if problem is not None:
        raise problem


def _aligned(status: ShardStatus, rows: ShardRows, realignment: _Realignment) -> np.ndarray:
    """The range's aligned targets: as pushed or raw (finite: the reader checked them), or re-aligned here."""
    if not realignment.realigned:
        return rows.aligned
    if realignment.fit is None:
        return rows.raw
    # A product from 65520 up rounds to infinity in float16, and NaN stays NaN: checked on the
    # float16 values, half the bytes of the product.
    aligned = to_float16(realignment.fit.apply(rows.raw))
    if not all_finite(aligned):
        raise VerificationError(
            f"Shard {status.shard}: re-aligned targets overflow float16 (NaN/inf). Nothing was written.",
            hint="Its targets are far off the reference's scale; that participant should run optimize again.",
        )
    return aligned

