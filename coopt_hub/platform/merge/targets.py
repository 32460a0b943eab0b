"""The merged targets: each shard downloaded, checked and (re-)aligned range by range into one
safetensors file laid out in id order.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from coopt_hub.core import faults
from coopt_hub.core.align import apply_alignment, fit_alignment
from coopt_hub.core.layout import remote_paths, shard_prefix
from coopt_hub.core.manifest import MergedShard
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import AnchorOutputs, ShardHeader, ShardReader, ShardRows, TensorFile, expected_ids
from coopt_hub.errors import ShardFileError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.platform.merge.verification import MergeVerifier
from coopt_hub.platform.status import ShardStatus

# Rows of a shard read, checked and re-aligned at a time: bounds what a shard costs in memory to
# about 16384 x dim x 14 bytes (fp16 raw and aligned as read, float32 product, fp16 result).
ALIGN_CHUNK_ROWS = 16384


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


class IdLayout:
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


def merge_targets(
    hub: Hub,
    repo: str,
    plan: Plan,
    done: list[ShardStatus],
    reference: ShardStatus,
    layout: IdLayout,
    targets: TensorFile,
    workdir: Path,
    verification: MergeVerifier | None,
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
    layout: IdLayout,
    targets: TensorFile,
    verification: MergeVerifier | None,
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
    layout: IdLayout,
    targets: TensorFile,
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
    status: ShardStatus, rows: ShardRows, transform: np.ndarray | None, layout: IdLayout, targets: TensorFile
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
