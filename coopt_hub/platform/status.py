"""Where a collaboration stands: every shard of the plan, what was pushed for it, and whether it fits.

The headers of the shard files are read with two small range reads per shard; of the done shards,
the anchors files too (a few hundred KB each, never the targets): priors are judged by their stored
anchor outputs (common-space V, noise flag: participant/reference.rank_stored_anchors), never by
what a header says. A shard's results can be on its branch, in open pull requests (participants
who may not push branches) and in main's latest merge (hub.contributions): the newest that passes
is used, the others are listed with the reason. A shard is `done` when that holds a readable pair
of files made for this plan, this source commit and this shard, holding a row for every sample of
the shard but those it records as skipped (undecodable images); `missing` when nothing was pushed;
`stale` otherwise, with the reasons. A done shard can still be doubtful: its `concerns` say so,
judged by the alignment's held-out residual and the noise flag. `merge` re-checks done shards in
full before using them.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from huggingface_hub.errors import RemoteEntryNotFoundError

from coopt_hub.core.layout import remote_paths, shard_branch, shard_prefix
from coopt_hub.core.manifest import Manifest
from coopt_hub.core.plan import Plan
from coopt_hub.core.quality import PriorRanking, PriorScore
from coopt_hub.core.shardfile import AnchorOutputs, RemoteFile, ShardHeader, header_problems
from coopt_hub.errors import PlanError, ShardFileError
from coopt_hub.hub.client import Hub, open_remote
from coopt_hub.hub.contributions import Contribution, find_contributions
from coopt_hub.hub.repo import load_plan, read_manifest, read_remote_header, read_shard_anchors
from coopt_hub.participant.reference import rank_stored_anchors

DONE, MISSING, STALE = "done", "missing", "stale"
# A held-out residual above this means the alignment predicts little of the reference on anchors it
# was not fitted on (1.0: nothing; a map of pure noise scores ~1). Measured on the digits train split
# with three random-init open_clip priors (256, 384, 512 outputs), 3 shards, 150 anchors, dim 256,
# 3 plan seeds: honest shards 0.04-0.18 with the random W, 0.16-0.69 with the pca projection.
POOR_CV_RESIDUAL = 0.9


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
    score: PriorScore | None = None  # its prior judged by its stored anchor outputs, among the done shards
    found: Contribution | None = None  # where `commit` was found: the branch, a pull request, the last merge
    passed_over: tuple[PassedOver, ...] = ()  # the shard's other contributions, and why they are not used

    @property
    def pull_request(self) -> int | None:
        return self.found.pull_request if self.found else None

    @property
    def rows(self) -> int | None:
        return self.header.num_rows if self.header else None

    @property
    def cv_residual(self) -> float | None:
        """The alignment's held-out residual (None: its own reference, or a version 1 shard)."""
        return self.header.cv_residual if self.header else None

    @property
    def noise_like(self) -> bool | None:
        return self.score.noise_like if self.score else None

    @property
    def concerns(self) -> tuple[str, ...]:
        """What makes a done shard's targets doubtful, judged by held-out and recomputed figures."""
        concerns = []
        if self.noise_like:
            concerns.append(f"its anchor outputs look noise-like (at most {self.score.agreement:.2f} of their "
                            "neighbours shared with another prior)")
        if self.cv_residual is not None and self.cv_residual > POOR_CV_RESIDUAL:
            concerns.append(f"its alignment's held-out residual is {self.cv_residual:.2f}: it predicts little of "
                            "the reference")
        if self.passed_over:
            chosen = f"; {self.found.describe()} is used" if self.state == DONE else ""
            concerns.append(f"{len(self.passed_over) + 1} contributions: "
                            + "; ".join(f"{p.contribution.describe()}: {p.reason}" for p in self.passed_over) + chosen)
        return tuple(concerns)

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
            "uniformity_native": header.uniformity_native if header else None,
            "projection": header.projection if header else None,
            "schema_version": header.schema_version if header else None,
            "reference": header.reference if header else None,
            "residual": header.residual if header else None,
            "alignment": _alignment_summary(header.alignment) if header else None,
            "cv_residual": self.cv_residual,
            "noise_like": self.noise_like,
            "agreement": self.score.agreement if self.score else None,
            "common_uniformity": self.score.common_uniformity if self.score else None,
            "concerns": list(self.concerns),
            "problems": list(self.problems),
            "merged": self.merged,
            "found": self.found.to_dict() if self.found else None,
            "passed_over": [{**p.contribution.to_dict(), "reason": p.reason} for p in self.passed_over],
        }


@dataclass(frozen=True)
class PassedOver:
    """A contribution of a shard that is not the one used, and why."""

    contribution: Contribution
    reason: str


def _alignment_summary(alignment: dict | None) -> dict | None:
    """The header's record of the fit without the other candidates compared."""
    return None if alignment is None else {k: v for k, v in alignment.items() if k != "candidates"}


@dataclass(frozen=True)
class CollaborationStatus:
    repo: str
    main: str
    plan: Plan
    shards: tuple[ShardStatus, ...]
    merged_tag: str | None  # the version main holds now, if any
    ranking: PriorRanking | None = None  # of the done shards' priors, by their stored anchor outputs

    def in_state(self, state: str) -> list[ShardStatus]:
        return [shard for shard in self.shards if shard.state == state]

    @property
    def best(self) -> ShardStatus | None:
        """The done shard whose prior ranks first (lowest common-space V, noise-like ones last): the
        reference a merge would align to now."""
        if self.ranking is None:
            return None
        first = self.ranking.reference or self.ranking.scores[0].name
        return next(s for s in self.shards if s.branch == first)

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
            "ranking": self.ranking.to_dict() if self.ranking else None,
            "merged_tag": self.merged_tag,
            "shards": [shard.to_dict() for shard in self.shards],
        }


def _is_merged(status: ShardStatus, merged: set[tuple[int, str]], manifest: Manifest | None) -> bool:
    """Main's latest merge holds this commit of the shard, or the same files from another commit (a
    later commit that only added, say, a notes file)."""
    if (status.shard, status.commit) in merged:
        return True
    held = {s.shard: s.checksums for s in manifest.shards} if manifest else {}
    return status.header is not None and held.get(status.shard) == status.header.checksums


STATUS_THREADS = 8


def collaboration_status(hub: Hub, repo: str, rank: bool = True) -> CollaborationStatus:
    """Read the plan on main and, of every shard, the headers of its contributions (branch, open pull
    requests, main's latest merge): the newest that is done counts, else the newest. Without `rank`,
    the done shards' priors are not ranked (no ranking, no scores): for a merge, which ranks those it
    takes itself (0.9 s for 8 priors on 1024 anchors)."""
    main = hub.head(repo, "main")
    plan = load_plan(hub, repo, main)
    manifest = read_manifest(hub, repo, main)
    merged = {(s.shard, s.commit) for s in manifest.shards} if manifest else set()
    branches, _ = hub.refs(repo)
    found = find_contributions(hub, repo, plan.num_shards, dict(merged), branches)
    shards, anchors = [], {}
    # Each shard's reads (two headers, its anchors) wait on the Hub: shards are read side by side
    # (8 shards of a 1M-row merge benchmark: 2.6 s one after another).
    with ThreadPoolExecutor(min(STATUS_THREADS, max(plan.num_shards, 1)), thread_name_prefix="coopt-status") as pool:
        chosen = pool.map(lambda k: _choose(hub, repo, plan, k, found.get(k, []), branches.get(shard_branch(k))),
                          range(plan.num_shards))
        for k, (status, outputs) in enumerate(chosen):
            anchors[k] = outputs
            shards.append(replace(status, merged=_is_merged(status, merged, manifest)))
    ranking = _rank(plan, {k: outputs for k, outputs in anchors.items() if outputs is not None}) if rank else None
    if ranking is not None:
        scores = {score.name: score for score in ranking.scores}
        shards = [replace(s, score=scores.get(s.branch)) for s in shards]
    return CollaborationStatus(repo=repo, main=main, plan=plan, shards=tuple(shards),
                               merged_tag=manifest.tag if manifest else None, ranking=ranking)


def _choose(hub: Hub, repo: str, plan: Plan, k: int, candidates: list[Contribution],
            branch: str | None) -> tuple[ShardStatus, AnchorOutputs | None]:
    """Shard k's status from its newest contribution that is done (with its anchor outputs), or from
    the newest when none is; the others are passed over with the reason. Without any, what its
    branch (head `branch`, if it exists) says."""
    if not candidates:
        return shard_status(hub, repo, plan, k, branch), None
    failed: list[tuple[ShardStatus, Contribution]] = []
    for index, candidate in enumerate(candidates):
        status = replace(shard_status(hub, repo, plan, k, candidate.commit), found=candidate)
        outputs = None
        if status.state == DONE:
            status, outputs = _with_anchors(hub, repo, plan, status)
        if status.state == DONE:
            older = [PassedOver(c, f"older than {candidate.origin}") for c in candidates[index + 1:]]
            return replace(status, passed_over=(*_rejected(failed), *older)), outputs
        failed.append((status, candidate))
    newest = failed[0][0]
    return replace(newest, passed_over=_rejected(failed[1:])), None


def _rejected(failed: list[tuple[ShardStatus, Contribution]]) -> tuple[PassedOver, ...]:
    return tuple(PassedOver(candidate, "; ".join(status.problems) or status.state) for status, candidate in failed)


def _with_anchors(hub: Hub, repo: str, plan: Plan, status: ShardStatus) -> tuple[ShardStatus, AnchorOutputs | None]:
    """A done shard and its stored anchor outputs; stale instead when they do not read or fit."""
    try:
        _, anchors = read_shard_anchors(hub, repo, plan, status.shard, status.commit)
    except ShardFileError as err:
        return replace(status, state=STALE, problems=(*status.problems, str(err))), None
    return status, anchors


def _rank(plan: Plan, anchors: dict[int, AnchorOutputs]) -> PriorRanking | None:
    """None without done shards, or when they share fewer than two decoded anchors (then no
    comparison is possible; merge says so)."""
    if not anchors:
        return None
    try:
        return rank_stored_anchors(plan, {shard_branch(k): outputs for k, outputs in anchors.items()})
    except PlanError:
        return None


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
        return ShardStatus(k, branch, STALE, expected, commit=commit, problems=(f"invalid: {err} ({paths.targets})",))
    problems = header_problems(plan, k, header)
    try:
        if read_remote_header(hub, repo, commit, paths.anchors).to_dict() != header.to_dict():
            problems.append(f"{paths.anchors} and {paths.targets} come from different runs")
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"{paths.anchors}: {err}")
    return ShardStatus(k, branch, STALE if problems else DONE, expected, commit, header, tuple(problems))


def download_shard(hub: Hub, repo: str, shard: int, commit: str, directory: Path, targets: bool = True) -> Path:
    """Shard `shard`'s pair of files as pushed at `commit` (not its branch, which may move on), into
    `directory`; returns the folder a ShardReader opens. Without `targets`, only the anchors file:
    for a reader given the targets as a RemoteFile (remote_targets).

    RemoteEntryNotFoundError when no targets were pushed; ShardFileError when the anchors are missing.
    """
    paths = remote_paths(shard)
    if targets:
        hub.download(repo, paths.targets, commit, local_dir=directory)
    try:
        hub.download(repo, paths.anchors, commit, local_dir=directory)
    except RemoteEntryNotFoundError as err:
        raise _missing(paths.anchors, shard, commit) from err
    return directory / shard_prefix(shard)


def _missing(path: str, shard: int, commit: str) -> ShardFileError:
    return ShardFileError(
        f"{path} is missing from {shard_branch(shard)}@{commit[:12]}.",
        hint=f"The owner of shard {shard} must run `coopt-hub optimize --shard {shard} --push` again.",
    )


def remote_targets(hub: Hub, repo: str, shard: int, commit: str) -> RemoteFile:
    """Shard `shard`'s targets file as pushed at `commit`, to be read where it lies by range requests
    (ShardReader's `targets`): only the ranges read are fetched, and nothing lands on disk."""
    path = remote_paths(shard).targets

    def opened() -> BinaryIO:
        try:
            return open_remote(repo, commit, path, hub.token, hub.endpoint)
        except FileNotFoundError as err:
            raise _missing(path, shard, commit) from err

    return RemoteFile(f"{shard_branch(shard)}@{commit[:12]}/{path}", opened)
