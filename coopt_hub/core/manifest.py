"""The manifest of a merged version (coopt/manifest.json on main): what was merged, from which
shard commits, aligned to which reference, and how it was verified.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from coopt_hub.core.layout import MANIFEST_PATH
from coopt_hub.errors import VerificationError

MANIFEST_VERSION = 1


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


def next_tag(tags: dict[str, str] | list[str]) -> str:
    """v1, or one above the highest vN among `tags`."""
    numbers = [int(match.group(1)) for name in tags if (match := _TAG.fullmatch(name))]
    return f"v{max(numbers, default=0) + 1}"
