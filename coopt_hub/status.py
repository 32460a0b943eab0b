"""Where a collaboration stands: every shard of the plan, what its branch holds, and whether it fits.

Only the headers of the shard files are read (two small range reads per shard), so the status of a
large collaboration costs no downloads. A shard is `done` when its branch holds a readable pair of
files made for this plan, this source commit and this shard, holding a row for every sample of the
shard but those it records as skipped (undecodable images); `missing` when nothing was pushed;
`stale` otherwise, with the reasons. `merge` re-checks done shards in full before using them.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from coopt_hub.hub import Hub
from coopt_hub.plan import Plan
from coopt_hub.publish import load_plan
from coopt_hub.storage import HEADER_KEY, ShardHeader, remote_paths, shard_branch

DONE, MISSING, STALE = "done", "missing", "stale"
# A coopt header is a few KB; anything far larger is not a shard file.
_MAX_HEADER_BYTES = 1 << 24
# One range read normally covers the length prefix and the whole header.
_READ_BLOCK = 1 << 16


@dataclass(frozen=True)
class ShardStatus:
    shard: int
    branch: str
    state: str  # DONE | MISSING | STALE
    expected_rows: int
    commit: str | None = None
    header: ShardHeader | None = None
    problems: tuple[str, ...] = ()
    merged: bool = False  # main's latest merge holds this very commit of the shard

    @property
    def rows(self) -> int | None:
        return self.header.num_rows if self.header else None

    @property
    def skipped(self) -> int | None:
        """Samples of the shard left out as undecodable images."""
        return len(self.header.skipped_ids) if self.header else None

    def to_dict(self) -> dict[str, Any]:
        header = self.header
        return {
            "shard": self.shard,
            "branch": self.branch,
            "state": self.state,
            "commit": self.commit,
            "expected_rows": self.expected_rows,
            "rows": self.rows,
            "skipped": self.skipped,
            "prior": header.prior if header else None,
            "fingerprint": header.fingerprint if header else None,
            "output_dim": header.output_dim if header else None,
            "uniformity": header.uniformity if header else None,
            "reference": header.reference if header else None,
            "residual": header.residual if header else None,
            "problems": list(self.problems),
            "merged": self.merged,
        }


@dataclass(frozen=True)
class CollaborationStatus:
    repo: str
    main: str
    plan: Plan
    shards: tuple[ShardStatus, ...]
    merged_tag: str | None  # the version main holds now, if any

    def in_state(self, state: str) -> list[ShardStatus]:
        return [shard for shard in self.shards if shard.state == state]

    @property
    def best(self) -> ShardStatus | None:
        """The done shard with the lowest uniformity: the reference a merge would align to now."""
        done = self.in_state(DONE)
        return min(done, key=lambda s: (s.header.uniformity, s.shard)) if done else None

    @property
    def rows_done(self) -> int:
        return sum(shard.rows for shard in self.in_state(DONE))

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "repo": self.repo,
            "main": self.main,
            "plan_hash": self.plan.plan_hash,
            "source": {"repo": self.plan.source_repo, "revision": self.plan.source_revision, "split": self.plan.split},
            "num_rows": self.plan.num_rows,
            "rows_done": self.rows_done,
            "counts": {state: len(self.in_state(state)) for state in (DONE, MISSING, STALE)},
            "best_shard": best.shard if best else None,
            "merged_tag": self.merged_tag,
            "shards": [shard.to_dict() for shard in self.shards],
        }


def collaboration_status(hub: Hub, repo: str) -> CollaborationStatus:
    """Read the plan on main and the header of every shard branch."""
    from coopt_hub.merge import MANIFEST_PATH, Manifest  # merge builds on status, not the other way

    main = hub.head(repo, "main")
    plan = load_plan(hub, repo, main)
    branches, _ = hub.refs(repo)
    manifest_data = hub.read_json(repo, MANIFEST_PATH, main)
    manifest = Manifest.from_dict(manifest_data) if manifest_data else None
    merged = {(s.shard, s.commit) for s in manifest.shards} if manifest else set()
    shards = []
    for k in range(plan.num_shards):
        status = shard_status(hub, repo, plan, k, branches.get(shard_branch(k)))
        shards.append(replace(status, merged=(k, status.commit) in merged))
    return CollaborationStatus(
        repo=repo, main=main, plan=plan, shards=tuple(shards), merged_tag=manifest.tag if manifest else None
    )


def shard_status(hub: Hub, repo: str, plan: Plan, k: int, commit: str | None) -> ShardStatus:
    """The state of shard k's branch at `commit` (None: the branch does not exist)."""
    branch, expected = shard_branch(k), len(plan.shard_ids(k))
    if commit is None:
        return ShardStatus(k, branch, MISSING, expected)
    paths = remote_paths(k)
    try:
        header = read_remote_header(hub, repo, commit, paths.targets)
    except FileNotFoundError:
        return ShardStatus(k, branch, MISSING, expected, commit=commit, problems=("nothing pushed yet",))
    except ValueError as err:
        return ShardStatus(k, branch, STALE, expected, commit=commit, problems=(f"{paths.targets}: {err}",))
    problems = header_problems(plan, k, header)
    try:
        if read_remote_header(hub, repo, commit, paths.anchors).to_dict() != header.to_dict():
            problems.append(f"{paths.anchors} and {paths.targets} come from different runs")
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"{paths.anchors}: {err}")
    return ShardStatus(k, branch, STALE if problems else DONE, expected, commit, header, tuple(problems))


def header_problems(plan: Plan, k: int, header: ShardHeader) -> list[str]:
    """What makes a shard's header unusable with this plan; empty when it fits."""
    problems = []
    if header.plan_hash != plan.plan_hash:
        problems.append(f"made for plan {header.plan_hash[:12]}, the plan on main is {plan.plan_hash[:12]}")
    if header.source_revision != plan.source_revision:
        problems.append(
            f"made from source commit {header.source_revision[:12]}, the plan pins {plan.source_revision[:12]}"
        )
    if header.shard != k:
        problems.append(f"holds shard {header.shard}, not shard {k}")
    if header.dim != plan.dim:
        problems.append(f"targets have {header.dim} dimensions, the plan says {plan.dim}")
    shard_ids = plan.shard_ids(k)
    skipped = np.asarray(header.skipped_ids, dtype=np.int64)
    if not np.isin(skipped, shard_ids).all():
        problems.append(f"records skipped ids that are not shard {k}'s")
    elif header.num_rows != shard_ids.size - skipped.size:
        less = f" less the {skipped.size} it skipped" if skipped.size else ""
        problems.append(f"holds {header.num_rows} rows, the plan gives shard {k} {shard_ids.size}{less}")
    return problems


def expected_ids(plan: Plan, k: int, header: ShardHeader) -> np.ndarray:
    """The sample ids shard k's rows must have, sorted: the plan's, less those the header records as skipped."""
    return np.setdiff1d(plan.shard_ids(k), np.asarray(header.skipped_ids, dtype=np.int64))


def read_remote_header(hub: Hub, repo: str, commit: str, path: str) -> ShardHeader:
    """The coopt header of a safetensors file on the Hub, from two range reads of its start.

    Raises FileNotFoundError when the file is absent and ValueError when it is not a shard file.
    """
    from huggingface_hub import HfFileSystem

    fs = HfFileSystem(token=hub.token, endpoint=hub.endpoint)
    with fs.open(f"datasets/{repo}@{commit}/{path}", "rb", block_size=_READ_BLOCK) as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("truncated: no safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise ValueError(f"not a safetensors file (header length {length})")
        raw = handle.read(length)
    try:
        metadata = json.loads(raw)["__metadata__"]
        return ShardHeader.from_dict(json.loads(metadata[HEADER_KEY]))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"unreadable coopt header ({err})") from err
