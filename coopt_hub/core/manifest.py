"""The manifest of a merged version (coopt/manifest.json on main): what was merged, from which
shard commits, aligned to which reference, how it was verified, and how good the targets measured.

Version 2 added, per merged shard, the alignment figures and the V and noise flag the merge
recomputed from the stored anchor outputs; and at the top the prior ranking and the quality
figures. Every earlier version still reads: the fields it lacks take the values that meant the
same thing then.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from coopt_hub.core.layout import MANIFEST_PATH
from coopt_hub.errors import VerificationError

MANIFEST_VERSION = 2


_TAG = re.compile(r"v(\d+)")


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
    uniformity: float  # v2: in the common space, recomputed by the merge from the anchor outputs


@dataclass(frozen=True)
class MergedShard:
    shard: int
    branch: str
    commit: str
    prior: dict[str, Any]
    fingerprint: str
    output_dim: int
    uniformity: float  # v2: V in the common space, recomputed by the merge from the anchor outputs
    residual: float  # the participant's own alignment fit (in-sample), as pushed
    realigned: bool  # aligned to another reference by the participant, re-aligned here
    realigned_residual: float | None  # the in-sample residual of the fit made here, when one was made
    rows: int
    checksums: dict[str, str]
    # Its samples left out as undecodable images: no target, so not in the merged split either.
    skipped_ids: tuple[int, ...] = ()
    # AlignmentFit.to_dict() of the map its targets went through: the merge's when it re-aligned
    # them, else the participant's; None for the reference's own targets and before version 2.
    alignment: dict[str, Any] | None = None
    uniformity_native: float | None = None  # V of the prior's own outputs (version 1: `uniformity`)
    noise_like: bool = False  # its anchor outputs agree with no other prior's beyond chance (core.quality)


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
    num_bytes: int | None = None  # of its rows in memory (Arrow), as `datasets` counts a split; None before v2
    file_bytes: int | None = None  # of its parquet files; None before v2


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
    ranking: dict[str, Any] | None = None  # core.quality.rank_priors(...).to_dict(); None before version 2
    quality: dict[str, Any] | None = None  # platform.evaluate's figures; None: not measured

    @property
    def content_key(self) -> tuple:
        """What makes two merges the same dataset and card: the plan, the image mode and each shard's
        content (content_key of a merge about to be made: merge_key)."""
        return merge_key(self.plan_hash, self.images, self.shards)

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
                    "shards": tuple(_merged_shard(shard) for shard in data["shards"]),
                    "missing": tuple(data["missing"]),
                    "splits": {name: SplitRecord(**{**s, "files": tuple(s["files"])})
                               for name, s in data["splits"].items()},
                    "verification": MergeVerification(**data["verification"]) if data.get("verification") else None,
                }
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise VerificationError(
                f"{MANIFEST_PATH} is not a manifest written by coopt-hub merge ({type(err).__name__}: {err}).",
                hint=f"It was edited by hand: commit back the {MANIFEST_PATH} of the last vN tag, then rerun.",
            ) from err


def merge_key(plan_hash: str, images: str, shards) -> tuple:
    """What a merge of `shards` (MergedShards, or anything with `shard` and `header`) publishes, as a
    key: the plan, the image mode and each shard's content (shard_content), not the commits that
    hold it, so that a commit that leaves a shard's files as they were makes no new version."""
    return plan_hash, images, tuple(shard_content(s.shard, getattr(s, "header", s)) for s in shards)


def shard_content(shard: int, record) -> str:
    """A shard's part of the merged content and card, from its header or its MergedShard: the
    checksums of its tensors and what is said of its prior and its skipped samples."""
    return json.dumps({"shard": shard, "checksums": record.checksums, "prior": record.prior,
                       "fingerprint": record.fingerprint, "skipped_ids": list(record.skipped_ids)}, sort_keys=True)


def _merged_shard(data: dict[str, Any]) -> MergedShard:
    # Before version 2 V was measured on the prior's own outputs only: its native V.
    return MergedShard(**{"uniformity_native": data["uniformity"], **data,
                          "skipped_ids": tuple(data.get("skipped_ids", ()))})


def next_tag(tags: dict[str, str] | list[str]) -> str:
    """v1, or one above the highest vN among `tags`."""
    numbers = [int(match.group(1)) for name in tags if (match := _TAG.fullmatch(name))]
    return f"v{max(numbers, default=0) + 1}"
