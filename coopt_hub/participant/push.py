"""Publishing a participant's result: one commit to its shard branch, never over another prior's
result unless asked, or to a pull request where the token may not push branches; and `coopt-hub
push` for a result made without --push.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from coopt_hub.core.layout import remote_paths, shard_branch, shard_prefix
from coopt_hub.core.progress import LogProgress, Progress
from coopt_hub.core.shardfile import expected_ids, header_problems, read_shard
from coopt_hub.errors import ConflictError, PlanError, ShardFileError
from coopt_hub.hub.client import AccessDenied, Hub, is_transient
from coopt_hub.hub.contributions import Contribution, own_pull_request
from coopt_hub.hub.repo import load_plan
from coopt_hub.participant.report import read_report
from coopt_hub.participant.workdir import OptimizeResult, latest_result
from coopt_hub.priors.spec import prior_label


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
            hint="Pick a shard nobody has pushed (`coopt-hub status REPO`), pass --create-pr to offer yours as a "
            "pull request next to it, or --overwrite to replace it (the old result stays in the branch history).",
        )


def publish_result(
    hub: Hub, repo: str, shard: int, directory: Path, overwrite: bool = False, progress: Progress | None = None,
    create_pr: bool = False,
) -> tuple[str, bool]:
    """Commit a result directory's three files in one commit; (the commit holding them, new commit made).

    They go to shard/{k}, or to a pull request to main with `create_pr` or when the token may not
    push branches (on huggingface.co, anyone outside the repo's organisation): this participant's
    open pull request of the shard if there is one (a rerun), else a new one. No commit is made
    when the branch or pull request already holds the very same result.
    """
    say = progress or LogProgress()
    result = _LocalResult(repo, shard, Path(directory))
    if not create_pr:
        try:
            return _push_branch(hub, result, overwrite, say)
        except AccessDenied as err:
            say.info(f"{err} Opening a pull request with the result instead.")
    return _push_pull_request(hub, result, say)


class _LocalResult:
    """A finished local result and what its commit says about it."""

    def __init__(self, repo: str, shard: int, directory: Path):
        self.repo, self.shard, self.directory = repo, shard, directory
        self.paths = remote_paths(shard)
        self.report = read_report(directory, shard)

    def operations(self) -> list:
        from huggingface_hub import CommitOperationAdd

        return [CommitOperationAdd(path, str(self.directory / path)) for path in self.paths]

    def already_in(self, hub: Hub, head: str | None) -> bool:
        remote = hub.read_json(self.repo, self.paths.report, head) if head else None
        return remote is not None and remote.get("files") == self.report["files"]

    @property
    def title(self) -> str:
        report = self.report
        return (f"coopt-hub: shard {self.shard} labeled with {prior_label(report['prior'], report['fingerprint'])} "
                f"({report['counts']['rows']} rows)")

    @property
    def description(self) -> str:
        report = self.report
        reference = report["reference"]
        aligned_to = "itself" if reference is None else f"shard {reference['shard']} at {reference['commit'][:8]}"
        # Reports of version 1 results (pushed later with `coopt-hub push`) have no alignment record.
        fit = report.get("alignment")
        held_out = f"{fit['cv_residual']:.4f}" if fit else "not recorded (version 1 result)"
        return (f"Shard {self.shard}, labeled with {prior_label(report['prior'], report['fingerprint'])} (fingerprint "
                f"{report['fingerprint'][:16]}).\n\n"
                f"- uniformity V: {report['uniformity']:.4f}\n- aligned to: {aligned_to}\n"
                f"- residual: in-sample {report['residual']:.4f}, held-out {held_out}\n"
                f"- rows: {report['counts']['rows']}\n- coopt-hub {report['tool_version']}\n")


def _push_branch(hub: Hub, result: _LocalResult, overwrite: bool, say: Progress) -> tuple[str, bool]:
    repo, shard = result.repo, result.shard
    branch = shard_branch(shard)
    hub.ensure_branch(repo, branch, "main")
    outcome = {"unchanged": False}

    def build(head: str | None):
        outcome["unchanged"] = result.already_in(hub, head)
        if outcome["unchanged"]:
            return None
        if not overwrite:
            check_branch_owner(hub, repo, shard, result.report["fingerprint"], head)
        return result.operations()

    commit = hub.commit(repo, branch, build, message=result.title, description=result.description)
    if outcome["unchanged"]:
        say.info(f"{branch} of {repo} already holds this result ({commit[:8]}); nothing to push.")
    else:
        say.info(f"Pushed shard {shard} to {branch} of {repo} ({commit[:8]}).")
    return commit, not outcome["unchanged"]


def _push_pull_request(hub: Hub, result: _LocalResult, say: Progress) -> tuple[str, bool]:
    """To this participant's open pull request of the shard, or a new one. Opening one is not retried
    blindly: an answer lost on the way may hide a pull request that was opened, so every try first
    looks for it."""
    repo, shard, me = result.repo, result.shard, hub.user()
    for attempt in range(hub.retry.attempts):
        own = own_pull_request(hub, repo, shard, me)
        if own is not None:
            return _push_to(hub, result, own, say)
        try:
            number, commit = hub.open_pull_request(repo, result.operations(), result.title, result.description)
        except Exception as err:  # noqa: BLE001 - filtered by is_transient
            if not is_transient(err) or attempt == hub.retry.attempts - 1:
                raise
            time.sleep(hub.retry.delay(attempt))
            continue
        say.info(f"Opened pull request #{number} to {repo} with shard {shard} ({commit[:8]}): "
                 f"{hub.endpoint}/datasets/{repo}/discussions/{number}")
        return commit, True
    raise AssertionError("unreachable")


def _push_to(hub: Hub, result: _LocalResult, own: Contribution, say: Progress) -> tuple[str, bool]:
    revision = f"refs/pr/{own.pull_request}"
    outcome = {"unchanged": False}

    def build(head: str | None):
        outcome["unchanged"] = result.already_in(hub, head)
        return None if outcome["unchanged"] else result.operations()

    commit = hub.commit(result.repo, revision, build, message=result.title, description=result.description)
    if outcome["unchanged"]:
        say.info(f"Your pull request #{own.pull_request} to {result.repo} already holds this result "
                 f"({commit[:8]}); nothing to push.")
    else:
        say.info(f"Pushed shard {result.shard} to your open pull request #{own.pull_request} of {result.repo} "
                 f"({commit[:8]}).")
    return commit, not outcome["unchanged"]


def published_at(hub: Hub, repo: str, shard: int, commit: str) -> str:
    """Where `commit` is published: "pull request #N" when a pull request's head, else shard/{k}."""
    number = next((n for n, head in hub.pull_request_heads(repo).items() if head == commit), None)
    return shard_branch(shard) if number is None else f"pull request #{number}"


def push_shard(
    hub: Hub, repo: str, shard: int, *, workdir: Path, overwrite: bool = False, progress: Progress | None = None,
    create_pr: bool = False,
) -> OptimizeResult:
    """Push the newest finished local result of shard `shard` (written by optimize without --push),
    as publish_result does."""
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
    commit, pushed = publish_result(hub, repo, shard, directory, overwrite, progress, create_pr)
    return OptimizeResult(repo=repo, shard=shard, directory=directory, report=report, commit=commit, pushed=pushed)
