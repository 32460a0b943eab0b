"""Publishing a participant's result: one commit to its shard branch, never over another prior's
result unless asked, and `coopt-hub push` for a result made without --push.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coopt_hub.core.layout import remote_paths, shard_branch, shard_prefix
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.core.shardfile import expected_ids, header_problems, read_shard
from coopt_hub.errors import ConflictError, PlanError, ShardFileError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_plan
from coopt_hub.participant.report import read_report
from coopt_hub.participant.workdir import OptimizeResult, latest_result


def check_branch_owner(hub: Hub, repo: str, shard: int, fingerprint: str, head: str | None = None) -> None:
    """ConflictError when shard/{k} (at `head`, default: now) holds a result of another prior."""
    head = head or hub.head(repo, shard_branch(shard))
    if head is None:
        return
    remote = hub.read_json(repo, remote_paths(shard).report, head)
    if remote is not None and remote.get("fingerprint") != fingerprint:
        who = remote.get("participant") or "another participant"
        model = (remote.get("prior") or {}).get("model", "another prior")
        raise ConflictError(
            f"Branch {shard_branch(shard)} of {repo} already holds shard {shard} labeled by {who} with {model} "
            f"(fingerprint {str(remote.get('fingerprint'))[:12]}), not this prior ({fingerprint[:12]}).",
            hint="Pick a shard nobody has pushed (`coopt-hub status REPO`), or pass --overwrite to replace it "
            "(the old result stays in the branch history).",
        )


def publish_result(
    hub: Hub, repo: str, shard: int, directory: Path, overwrite: bool = False, progress: Progress | None = None
) -> tuple[str, bool]:
    """Commit a result directory's three files to shard/{k} in one commit; (branch head, new commit made).

    No commit is made when the branch already holds the very same targets and anchors.
    """
    say = progress or LogProgress()
    paths = remote_paths(shard)
    local = Path(directory)
    report = read_report(local, shard)
    branch = shard_branch(shard)
    hub.ensure_branch(repo, branch, "main")
    outcome = {"unchanged": False}

    def build(head: str | None):
        from huggingface_hub import CommitOperationAdd

        remote = hub.read_json(repo, paths.report, head) if head else None
        if remote is not None and remote.get("files") == report["files"]:
            outcome["unchanged"] = True
            return None
        if not overwrite:
            check_branch_owner(hub, repo, shard, report["fingerprint"], head)
        outcome["unchanged"] = False
        return [CommitOperationAdd(path, str(local / path)) for path in paths]

    model = report["prior"]["model"]
    reference = report["reference"]
    aligned_to = "itself" if reference is None else f"{reference['branch']}@{reference['commit'][:8]}"
    # Reports of version 1 results (pushed later with `coopt-hub push`) have no alignment record.
    fit = report.get("alignment")
    residual = (f"held-out residual {fit['cv_residual']:.4f}, in-sample {report['residual']:.4f}" if fit
                else f"residual {report['residual']:.4f}")
    commit = hub.commit(
        repo,
        branch,
        build,
        message=f"coopt-hub: shard {shard} labeled with {model} ({report['counts']['rows']} rows)",
        description=(f"Prior fingerprint {report['fingerprint']}, uniformity {report['uniformity']:.4f}, "
                     f"aligned to {aligned_to} ({residual}); coopt-hub {report['tool_version']}."),
    )
    if outcome["unchanged"]:
        say.info(f"{branch} of {repo} already holds this result ({commit[:8]}); nothing to push.")
    else:
        say.info(f"Pushed shard {shard} to {branch} of {repo} ({commit[:8]}).")
    return commit, not outcome["unchanged"]


def push_shard(
    hub: Hub, repo: str, shard: int, *, workdir: Path, overwrite: bool = False, progress: Progress | None = None
) -> OptimizeResult:
    """Push the newest finished local result of shard `shard` (written by optimize without --push)."""
    workdir = Path(workdir).resolve()
    directory = latest_result(workdir, repo, shard)
    if directory is None:
        raise ShardFileError(
            f"No finished result of shard {shard} of {repo} under {workdir}.",
            hint=f"Run `coopt-hub optimize --repo {repo} --shard {shard}` first (with the same --workdir).",
        )
    result, _ = read_shard(directory / shard_prefix(shard), verify=True)
    report = read_report(directory, shard)
    plan = load_plan(hub, repo)
    if report["plan_hash"] != plan.plan_hash:
        raise PlanError(
            f"The local result of shard {shard} was made for plan {report['plan_hash'][:12]}, but {repo} now has "
            f"plan {plan.plan_hash[:12]}.",
            hint=f"Run `coopt-hub optimize --repo {repo} --shard {shard}` again for the current plan.",
        )
    # Intact files can still be the wrong ones (copied from another shard, edited by hand): check what they hold.
    problems = header_problems(plan, shard, result.header)
    if not problems and not np.array_equal(result.ids, expected_ids(plan, shard, result.header)):
        problems.append(f"its sample ids are not the plan's ids of shard {shard} less those it skipped")
    if problems:
        raise ShardFileError(
            f"The local result of shard {shard} does not fit the plan of {repo}: {'; '.join(problems)}.",
            hint=f"Run `coopt-hub optimize --repo {repo} --shard {shard}` again; nothing was pushed.",
        )
    commit, pushed = publish_result(hub, repo, shard, directory, overwrite, progress)
    return OptimizeResult(repo=repo, shard=shard, directory=directory, report=report, commit=commit, pushed=pushed)
