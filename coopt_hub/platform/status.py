"""Where a collaboration stands: every shard of the plan, what its branch holds, and whether it fits.

Only the headers of the shard files are read (two small range reads per shard), so the status of a
large collaboration costs no downloads. A shard is `done` when its branch holds a readable pair of
files made for this plan, this source commit and this shard, holding a row for every sample of the
shard but those it records as skipped (undecodable images); `missing` when nothing was pushed;
`stale` otherwise, with the reasons. `merge` re-checks done shards in full before using them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub.errors import RemoteEntryNotFoundError

from coopt_hub.core.layout import remote_paths, shard_branch, shard_prefix
from coopt_hub.core.plan import Plan
from coopt_hub.core.shardfile import ShardHeader, header_problems
from coopt_hub.errors import ShardFileError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_plan, read_manifest, read_remote_header

DONE, MISSING, STALE = "done", "missing", "stale"


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
    main = hub.head(repo, "main")
    plan = load_plan(hub, repo, main)
    branches, _ = hub.refs(repo)
    manifest = read_manifest(hub, repo, main)
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


def download_shard(hub: Hub, repo: str, shard: int, commit: str, directory: Path) -> Path:
    """Shard `shard`'s pair of files as pushed at `commit` (not its branch, which may move on), into
    `directory`; returns the folder a ShardReader opens.

    RemoteEntryNotFoundError when no targets were pushed; ShardFileError when the anchors are missing.
    """
    paths = remote_paths(shard)
    hub.download(repo, paths.targets, commit, local_dir=directory)
    try:
        hub.download(repo, paths.anchors, commit, local_dir=directory)
    except RemoteEntryNotFoundError as err:
        raise ShardFileError(
            f"{paths.anchors} is missing from {shard_branch(shard)}@{commit[:12]}.",
            hint=f"The owner of shard {shard} must run `coopt-hub optimize --shard {shard} --push` again.",
        ) from err
    return directory / shard_prefix(shard)
