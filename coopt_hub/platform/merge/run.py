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

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from coopt_hub import __version__
from coopt_hub.core.layout import TARGETS_PATH
from coopt_hub.core.manifest import MANIFEST_VERSION, Manifest, Reference, SourcePin
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import (
    TensorFile,
)
from coopt_hub.errors import ConfigError, SourceError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import read_manifest
from coopt_hub.hub.source import SourceLayout, resolve_source
from coopt_hub.platform.card import render_card
from coopt_hub.platform.merge.commit import MergeResult, check_tag_free, claim_tag, publish_merge
from coopt_hub.platform.merge.parquet import (
    ADDED_COLUMNS,
    TargetJoin,
    label_column,
    merged_features,
    read_source_card,
    read_source_features,
    write_splits,
)
from coopt_hub.platform.merge.targets import IdLayout, merge_targets
from coopt_hub.platform.merge.verification import MergeVerifier
from coopt_hub.platform.status import DONE, MISSING, CollaborationStatus, ShardStatus, collaboration_status

if TYPE_CHECKING:
    pass

IMAGE_MODES = ("copy", "reference")
















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
        check_tag_free(repo, tag, tags)
    done = _shards_to_merge(status, allow_partial)
    missing = tuple(s.shard for s in status.shards if s.state != DONE)

    previous = read_manifest(hub, repo, status.main)
    wanted_key = (plan.plan_hash, images, tuple((s.shard, s.commit) for s in done))
    verification = MergeVerifier(hub, repo, plan, verify_sample, progress) if verify else None
    record = verification.record if verification is not None else None
    if (
        previous is not None
        and previous.satisfies(wanted_key, record)
        and claim_tag(hub, repo, previous.tag, status.main)
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
        layout_ids = IdLayout(plan, done)
        targets = TensorFile(
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
            merged = merge_targets(
                hub, repo, plan, done, reference, layout_ids, targets, workdir, verification, progress
            )
            progress("Writing parquet files.")
            data_files, splits = write_splits(
                layout, plan, features, TargetJoin(plan, layout_ids, targets), workdir, hub.token
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
        return publish_merge(hub, repo, plan, uploads, manifest_for, card_for, tag, message, progress)


# Checks -------------------------------------------------------------------------------------------






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










# Targets ------------------------------------------------------------------------------------------




















# Parquet ------------------------------------------------------------------------------------------


















# Publishing ---------------------------------------------------------------------------------------






