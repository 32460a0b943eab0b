"""`coopt-hub merge`: check every shard branch, align all targets to the best prior, publish vN on main.

Nothing reaches main until every check has passed. The reference prior is chosen from every
shard's stored anchor outputs (merge.reference), never from what a header says of itself. The work
streams so that memory follows a range of rows, not a shard or the dataset: each shard is
downloaded, then read range by range, checked and (re-)aligned, and its targets go straight into a
safetensors file laid out up front in id order; the parquet files are then written row group by
row group from that file and the source's row groups. With `verify`, each shard is also
re-encoded in part with its declared prior (platform.verify) and the merge is refused unless
every shard passes. When the source has a label column the targets' quality is measured on a
seeded sample of that file (platform.evaluate) for the manifest and the card. Main changes in one
commit pinned to the head the merge was computed against, and that commit is tagged.
"""

from __future__ import annotations

import functools
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from coopt_hub import __version__
from coopt_hub.core.align import AlignmentFit
from coopt_hub.core.layout import DATA_DIR, TARGETS_PATH
from coopt_hub.core.manifest import (
    MANIFEST_VERSION,
    Manifest,
    MergedShard,
    MergeVerification,
    Reference,
    SourcePin,
    SplitRecord,
    merge_key,
)
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.errors import ConfigError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import read_manifest
from coopt_hub.platform.card import render_card
from coopt_hub.platform.contributions import report_failed_verification, settle_pull_requests
from coopt_hub.platform.evaluate import measure_quality, read_target_sample
from coopt_hub.platform.merge.commit import (
    EarlyUpload,
    MergeResult,
    Publication,
    check_tag_free,
    claim_tag,
    publish_merge,
)
from coopt_hub.platform.merge.parquet import MergeSource, read_merge_source, write_splits
from coopt_hub.platform.merge.reference import ReferenceChoice, choose_reference
from coopt_hub.platform.merge.targets import MergedTargets, merge_targets
from coopt_hub.platform.merge.verification import MergeVerifier
from coopt_hub.platform.status import DONE, MISSING, CollaborationStatus, ShardStatus, collaboration_status

IMAGE_MODES = ("copy", "reference")


def merge(
    hub: Hub,
    repo: str,
    *,
    tag: str | None = None,
    images: str = "copy",
    allow_partial: bool = False,
    verify: bool = False,
    verify_sample: int = 64,
    no_evaluate: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Check every shard, align them to the lowest-V prior that is not noise-like, and publish the
    dataset on main as a tag.

    `verify` also re-encodes `verify_sample` images of each shard and all anchors with the shard's
    declared prior (platform.verify.verify_shard) and refuses the merge unless every shard passes;
    that is done anyway when a shard arrived by pull request. Afterwards the pull requests merged
    are closed, and those passed over get the reason (platform.contributions).
    Unless `no_evaluate`, a source with a label column has the targets' quality measured
    (platform.evaluate) into the manifest and the card.
    """
    if images not in IMAGE_MODES:
        raise ConfigError(f"--images must be one of {IMAGE_MODES}, got {images!r}.")
    if verify_sample < 1:
        raise ConfigError(f"--verify-sample must be at least 1, got {verify_sample}.")
    progress = progress or LogProgress()
    _check_role(hub, repo)
    selection = _select(hub, repo, tag, allow_partial)
    verify = verify or _by_pull_request(selection, progress)
    verification = MergeVerifier(hub, repo, selection.plan, verify_sample, progress) if verify else None
    record = verification.record if verification is not None else None
    unchanged = _unchanged(hub, repo, selection, images, record)
    if unchanged is not None:
        settle_pull_requests(hub, repo, selection.status, unchanged.manifest, progress)
        return unchanged

    with tempfile.TemporaryDirectory(prefix="coopt-merge-") as scratch:
        source, choice = _source_and_reference(hub, repo, selection, images, Path(scratch), progress)
        files = _write_files(hub, repo, selection, choice, source, Path(scratch), verification, progress)
        quality = None if no_evaluate or source.label_column is None else _measure(files, choice, source, progress)
        reference = choice.reference
        publication = Publication(
            plan=selection.plan,
            uploads=files.uploads,
            draft=_draft_manifest(selection, choice, source, files, images, record, quality),
            card_for=functools.partial(render_card, plan=selection.plan, features=source.features,
                                       source_card=source.card, repo=repo),
            message=(f"coopt-hub merge: {len(files.shards)} shards aligned to {reference.branch} "
                     f"({reference.header.prior.get('model')})"),
            uploaded=files.early.operations(progress),
        )
        result = publish_merge(hub, repo, publication, tag, progress)
    settle_pull_requests(hub, repo, selection.status, result.manifest, progress)
    return result


def _source_and_reference(
    hub: Hub, repo: str, selection: _Selection, images: str, workdir: Path, progress: Progress
) -> tuple[MergeSource, ReferenceChoice]:
    """The pinned source (read on a thread: its listing and footers wait on the Hub) and the
    reference prior, chosen meanwhile (0.7-0.9 s each at 8 shards of 1M rows). A problem with
    the source is raised first, as when it was read before the choice."""
    with ThreadPoolExecutor(1, thread_name_prefix="coopt-merge-source") as pool:
        source = pool.submit(read_merge_source, hub, selection.plan, images)
        try:
            choice = choose_reference(hub, repo, selection.plan, selection.done, workdir, progress)
        finally:
            merge_source = source.result()
    return merge_source, choice


@dataclass(frozen=True)
class _Selection:
    """The shards a merge takes (`done`) and those it leaves out (`missing`)."""

    status: CollaborationStatus
    done: list[ShardStatus]
    missing: tuple[int, ...]

    @property
    def plan(self) -> Plan:
        return self.status.plan


@dataclass(frozen=True)
class _MergedFiles:
    """The merge's files in the scratch folder, and what the manifest records of them."""

    data_files: list[tuple[Path, str]]  # (local file, path in the repo) of the parquet files
    targets: Path  # the merged targets file
    shards: tuple[MergedShard, ...]
    splits: dict[str, SplitRecord]
    split: str  # the merged one
    early: EarlyUpload  # the targets file, then each parquet file, uploading since it was written
    fits: dict[int, AlignmentFit]  # the maps of the shards re-aligned by this merge

    @property
    def uploads(self) -> list[tuple[Path, str]]:
        return [*self.data_files, (self.targets, TARGETS_PATH)]

    @property
    def merged_parquet(self) -> list[Path]:
        """The merged split's parquet files, in row order."""
        paths = set(self.splits[self.split].files)
        return [local for local, path in self.data_files if path in paths]


def _select(hub: Hub, repo: str, tag: str | None, allow_partial: bool) -> _Selection:
    """What to merge, from the collaboration's status; refused when a shard cannot be merged or `tag` is taken."""
    status = collaboration_status(hub, repo, rank=False)  # choose_reference ranks the shards merged
    if tag is not None:
        _, tags = hub.refs(repo)
        check_tag_free(repo, tag, tags)
    done = _shards_to_merge(status, allow_partial)
    missing = tuple(s.shard for s in status.shards if s.state != DONE)
    return _Selection(status, done, missing)


def _check_role(hub: Hub, repo: str) -> None:
    """Refused before any work when the token cannot write main (a participant's, say)."""
    role = hub.token_role()
    if role in ("read", "contribute"):
        raise ConfigError(
            f"Your token's role is '{role}': it cannot write main of {repo}, so it cannot merge.",
            hint="The platform owner merges, with a token that can write the repo; participants push their shards "
                 "(`coopt-hub optimize --shard K --push`), which opens pull requests for a token like yours.",
        )


def _by_pull_request(selection: _Selection, progress: Progress) -> bool:
    """Whether a shard to merge arrived by pull request: anyone may open one, so its files are
    verified against its declared prior, as --verify does."""
    arrived = [f"{s.shard} (#{s.pull_request})" for s in selection.done if s.pull_request is not None]
    if arrived:
        progress.info(f"Shard(s) {', '.join(arrived)} arrived by pull request: every shard is verified against "
                      "its declared prior (as with --verify).")
    return bool(arrived)


def _unchanged(
    hub: Hub, repo: str, selection: _Selection, images: str, record: MergeVerification | None
) -> MergeResult | None:
    """The merge main holds already when it is this one (then tagged, if its tag was lost), else None."""
    main = selection.status.main
    previous = read_manifest(hub, repo, main)
    # By content, not commits: a commit that leaves the shard files as they were changes nothing merged.
    wanted_key = merge_key(selection.plan.plan_hash, images, selection.done)
    if previous is not None and previous.satisfies(wanted_key, record) and claim_tag(hub, repo, previous.tag, main):
        return MergeResult(repo, previous.tag, main, created=False, manifest=previous)
    return None


def _write_files(
    hub: Hub,
    repo: str,
    selection: _Selection,
    choice: ReferenceChoice,
    source: MergeSource,
    workdir: Path,
    verification: MergeVerifier | None,
    progress: Progress,
) -> _MergedFiles:
    """The merged targets file in `workdir`, then the parquet files joined with it; the targets file
    uploads meanwhile (the parquet stage only reads it), then each parquet file once it is written."""
    path = workdir / "targets.safetensors"
    with MergedTargets(path, selection.plan, selection.done, choice.reference) as targets:
        try:
            shards, fits = merge_targets(hub, repo, targets, choice, workdir, verification, progress)
        except VerificationError:
            if verification is not None:
                report_failed_verification(hub, repo, selection.status, verification.results, progress)
            raise
        targets.file.flush()
        early = EarlyUpload(hub, repo, [(path, TARGETS_PATH)])
        progress.info("Writing parquet files (the targets file, then each parquet file, upload meanwhile).")
        # Named `-of-N` only once all are written: uploaded under their local names, committed under the final ones.
        data_files, splits = write_splits(source, targets, workdir, hub.token, progress,
                                          on_file=lambda local: early.add(local, f"{DATA_DIR}/{local.name}"))
    return _MergedFiles(data_files, path, shards, splits, selection.plan.split, early, fits)


def _measure(files: _MergedFiles, choice: ReferenceChoice, source: MergeSource, progress: Progress) -> dict:
    """platform.evaluate's figures of the files just written, on a seeded sample of their rows."""
    label = source.label_column
    sample = read_target_sample(files.targets, [functools.partial(open, path, "rb") for path in files.merged_parquet],
                                label)
    anchors = {k: choice.projected(k) for k in choice.anchors}
    quality = measure_quality(sample, anchors, choice.reference.shard, label, progress, fits=files.fits)
    if quality.aligned is not None and quality.aligned.leave_one_shard_out is not None:
        aligned, raw = quality.aligned.leave_one_shard_out, quality.raw.leave_one_shard_out
        progress.info(f"Leave-one-shard-out probe accuracy: aligned {aligned.accuracy:.3f}, "
                      f"unaligned {raw.accuracy:.3f}.")
    return quality.to_dict()


def _draft_manifest(
    selection: _Selection,
    choice: ReferenceChoice,
    source: MergeSource,
    files: _MergedFiles,
    images: str,
    record: MergeVerification | None,
    quality: dict | None,
) -> Manifest:
    """The manifest of this merge, but for its tag (chosen when committing)."""
    plan, reference, layout = selection.plan, choice.reference, source.layout
    return Manifest(
        version=MANIFEST_VERSION,
        tag="",
        images=images,
        source=SourcePin(layout.repo, layout.revision, plan.split, plan.image_column),
        dim=plan.dim,
        label_column=source.label_column,
        plan_hash=plan.plan_hash,
        reference=Reference(
            reference.shard,
            reference.branch,
            reference.commit,
            reference.header.prior,
            reference.header.fingerprint,
            choice.score(reference.shard).common_uniformity,
        ),
        shards=files.shards,
        partial=bool(selection.missing),
        missing=selection.missing,
        splits=files.splits,
        tool_version=__version__,
        verification=record,
        ranking=choice.ranking.to_dict(),
        quality=quality,
    )


def _shards_to_merge(status: CollaborationStatus, allow_partial: bool) -> list[ShardStatus]:
    """The done shards; a stale or invalid one refuses the merge, naming it and why, unless
    `allow_partial` leaves it out like a missing one (the manifest and the card list it as missing)."""
    stale = [s for s in status.shards if s.state not in (DONE, MISSING)]
    if stale and not allow_partial:
        details = "; ".join(f"shard {s.shard} ({s.branch}@{s.commit[:12]}): {', '.join(s.problems)}" for s in stale)
        raise VerificationError(
            f"Cannot merge {status.repo}: {details}. Nothing was written.",
            hint="Those participants must run `coopt-hub optimize --shard K --push` again against the plan on main; "
                 "or pass --allow-partial to publish the other shards without them.",
        )
    done = status.in_state(DONE)
    missing = [s for s in status.shards if s.state != DONE]
    if not done:
        why = f"can be merged ({len(stale)} stale or invalid)" if stale else "has been pushed yet"
        raise VerificationError(
            f"No shard of {status.repo} {why}; nothing to merge.",
            hint="Participants push with `coopt-hub optimize --shard K --push`; `coopt-hub status` shows progress.",
        )
    if missing and not allow_partial:
        raise VerificationError(
            f"Shard(s) {', '.join(str(s.shard) for s in missing)} of {status.repo} have not been pushed "
            f"({len(done)} of {len(status.shards)} done). Nothing was written.",
            hint="Wait for them, or pass --allow-partial to publish the shards that are there (the card says so).",
        )
    return done
