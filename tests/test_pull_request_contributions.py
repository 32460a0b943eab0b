"""Contributions by pull request (issue 13): participants who hold only a `contribute` token, as
outsiders of an organisation on huggingface.co, optimize and push through pull requests; status,
the participants' reference and merge find their shards there; merge verifies them, closes the
pull requests it took with a link to the version, and leaves the others open with the reason.
Real clients (the command line in process, huggingface_hub) against the embedded hub; the pixel
prior of tests/fakes.py labels the shards."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from fakes import PIXEL_MODEL, FakePrior
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from coopt_hub.cli import cli, main
from coopt_hub.core.layout import remote_paths
from coopt_hub.core.progress import Silent
from coopt_hub.hub.client import Hub
from coopt_hub.participant.reference import pushed_shards
from coopt_hub.platform.verify import verify_repo
from coopt_hub.platform.status import DONE, STALE, collaboration_status
from coopt_hub.platform.verify import PASSED


@pytest.fixture(scope="module")
def people(hub_server):
    """Two participants with `contribute` tokens (user names unique to this module)."""
    suffix = uuid.uuid4().hex[:6]
    return {name: (f"{name}-{suffix}", hub_server.new_token("contribute", ["org/*"], user=f"{name}-{suffix}"))
            for name in ("alice", "bob")}


def _run(*args: str):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _main(*args: str) -> tuple[int, str]:
    """`coopt-hub ARGS` through the console script's error handling: (exit code, stderr)."""
    with CliRunner().isolation(env={"COOPT_HUB_DEBUG": None}) as (_, err, _):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit_:
            return (exit_.code if isinstance(exit_.code, int) else 1), err.getvalue().decode()
    return 0, err.getvalue().decode()


def _optimize(repo: str, shard: int, token: str, workdir, *extra: str) -> dict:
    done = _run("optimize", repo, "--shard", shard, "--model", PIXEL_MODEL, "--push", "--workdir", workdir,
                "--token", token, "--json", *extra)
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def _pull_requests(repo: str, author: str | None = None, status: str = "all") -> list:
    return list(HfApi().get_repo_discussions(repo, author=author, discussion_type="pull_request",
                                             discussion_status=status, repo_type="dataset"))


@pytest.mark.slow
def test_a_collaboration_of_contribute_tokens_completes_through_pull_requests(
        hub, small_source, new_collaboration, people, fake_backends, tmp_path):
    collab = new_collaboration(small_source, "by-prs", shards=2, anchors=32, dim=8)
    repo = collab.repo
    (alice, alice_token), (_, bob_token) = people["alice"], people["bob"]

    first = _optimize(repo, 0, alice_token, tmp_path / "alice")
    assert first["pushed"] and first["published_at"].startswith("pull request #"), first["published_at"]
    assert hub.head(repo, "shard/0") is None, "a contribute token made a branch"
    [opened] = _pull_requests(repo, alice)
    assert opened.title.startswith("coopt-hub: shard 0 labeled with pixel:net"), opened.title
    details = HfApi().get_discussion_details(repo, opened.num, repo_type="dataset")
    description = details.events[0].content
    assert "uniformity V:" in description and "in-sample" in description and "held-out" in description
    assert str(tmp_path) not in description + opened.title, "a local path left the participant"

    again = _optimize(repo, 0, alice_token, tmp_path / "alice")  # the rerun after a crash
    assert not again["pushed"] and again["commit"] == first["commit"]
    changed = _optimize(repo, 0, alice_token, tmp_path / "alice", "--image-size", "24")  # another header
    assert changed["pushed"] and changed["published_at"] == f"pull request #{opened.num}"
    assert [pr.num for pr in _pull_requests(repo, alice)] == [opened.num], "a second pull request was opened"
    assert HfApi().list_repo_refs(repo, repo_type="dataset", include_pull_requests=True).pull_requests[0] \
        .target_commit == changed["commit"]

    # Bob's participant finds alice's shard in her pull request when choosing its reference.
    bob_hub = Hub(token=bob_token)
    [seen] = pushed_shards(bob_hub, repo, collab.plan, 1, Silent())
    assert (seen.shard, seen.commit) == (0, changed["commit"])
    _optimize(repo, 1, bob_token, tmp_path / "bob", "--create-pr")

    status = collaboration_status(hub, repo)
    assert [(s.state, s.pull_request) for s in status.shards] == [(DONE, opened.num), (DONE, opened.num + 1)]
    checked = verify_repo(hub, repo, sample=8)
    assert [(r.commit, r.status) for r in checked] == [(s.commit, PASSED) for s in status.shards]

    _contribute_tokens_are_refused(repo, small_source, alice_token)

    merged = _run("merge", repo, "--json")
    assert merged.exit_code == 0, merged.output
    summary = json.loads(merged.stdout)
    assert summary["tag"] == "v1" and summary["verified"] and summary["shards"] == [0, 1]
    for pr in _pull_requests(repo):
        assert pr.status == "closed", f"#{pr.num} left {pr.status}"
        comments = [e.content for e in HfApi().get_discussion_details(repo, pr.num, repo_type="dataset").events
                    if e.type == "comment"]
        assert f"/datasets/{repo}/tree/v1" in comments[-1], comments
    # Closed, the pull requests still count: main's merge records where each shard came from.
    after = collaboration_status(hub, repo)
    assert [(s.state, s.merged) for s in after.shards] == [(DONE, True), (DONE, True)]
    alice_api = HfApi(token=alice_token)
    _refused(lambda: alice_api.delete_tag(repo, tag="v1", repo_type="dataset"), "delete tag")
    _refused(lambda: alice_api.create_tag(repo, tag="v1", revision=f"refs/pr/{opened.num}", repo_type="dataset"),
             "re-create tag")
    assert _run("merge", repo, "--json").exit_code == 0  # unchanged, nothing left to settle


def _contribute_tokens_are_refused(repo: str, source: str, token: str) -> None:
    """A contribute token cannot push a branch, touch main or delete the repo (its tags: after the
    merge): 403s that say why, and from our command line a message, never a traceback."""
    api = HfApi(token=token)
    refusals = {
        "branch": lambda: api.create_branch(repo, branch="shard/0", repo_type="dataset"),
        "main": lambda: api.create_commit(repo, [CommitOperationAdd("x.txt", b"x")], commit_message="x",
                                          repo_type="dataset"),
        "repo": lambda: api.delete_repo(repo, repo_type="dataset"),
    }
    for what, call in refusals.items():
        _refused(call, what)
    for command in (("merge", repo), ("init", f"{repo}-mine", "--source", source, "--shards", 2, "--anchors", 32)):
        code, stderr = _main(*command, "--token", token)
        assert code != 0 and stderr.startswith("Error: ") and "Traceback" not in stderr, stderr
        assert "'contribute'" in stderr and "Next step: " in stderr, stderr


def _refused(call, what: str) -> None:
    with pytest.raises(HfHubHTTPError) as refused:
        call()
    assert refused.value.response.status_code == 403, (what, str(refused.value))
    assert "'contribute'" in str(refused.value), (what, str(refused.value))


def _pull_request_of_shard_1(repo: str, folder, token: str, title: str):
    paths = remote_paths(1)
    operations = [CommitOperationAdd(paths.targets, str(folder / "targets.safetensors")),
                  CommitOperationAdd(paths.anchors, str(folder / "anchors.safetensors"))]
    return HfApi(token=token).create_commit(repo, operations, commit_message=title, create_pr=True,
                                            repo_type="dataset")


def test_a_stale_pull_request_is_passed_over_and_told_why(hub, small_source, new_collaboration, people, tmp_path):
    collab = new_collaboration(small_source, "stale-pr", shards=2, anchors=32, dim=8)
    repo, prior = collab.repo, FakePrior("a", 12, seed=1)
    collab.push(0, prior)
    collab.push(1, prior)
    bob, bob_token = people["bob"]

    def wrong_plan(result, anchors):
        result.header.plan_hash = "0" * 64

    collab.shard_files(1, prior, tmp_path, edit=wrong_plan)
    pr = _pull_request_of_shard_1(repo, tmp_path, bob_token, "shard 1 again")

    status = collaboration_status(hub, repo)
    shard = status.shards[1]
    assert shard.state == DONE and shard.found.origin == "shard/1", "the newest valid contribution is not used"
    [passed] = shard.passed_over
    assert passed.contribution.pull_request == pr.pr_num and "plan" in passed.reason
    assert any("2 contributions" in concern for concern in shard.concerns), shard.concerns
    shown = _run("status", repo, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["shards"][1]["passed_over"][0]["pull_request"] == pr.pr_num

    merged = _run("merge", repo, "--json")
    assert merged.exit_code == 0, merged.output
    [open_pr] = _pull_requests(repo, bob, status="open")
    comments = [e.content for e in HfApi().get_discussion_details(repo, open_pr.num, repo_type="dataset").events
                if e.type == "comment"]
    assert "not used" in comments[-1] and "plan" in comments[-1], comments
    assert _run("merge", repo).exit_code == 0
    again = [e for e in HfApi().get_discussion_details(repo, open_pr.num, repo_type="dataset").events
             if e.type == "comment"]
    assert len(again) == len(comments), "the same reason was commented twice"
    assert collaboration_status(hub, repo).shards[1].state != STALE

    # A valid pull request is newer than the branch, so it is used, and verified: the fake prior it
    # declares is not one verify can load, so the merge is refused and the pull request told why.
    collab.shard_files(1, FakePrior("b", 10, seed=2), tmp_path)
    newer = _pull_request_of_shard_1(repo, tmp_path, bob_token, "shard 1, better")
    assert collaboration_status(hub, repo).shards[1].pull_request == newer.pr_num
    code, stderr = _main("merge", repo)
    assert code != 0 and "shard 1 fail (prior)" in stderr and "Nothing was written" in stderr, stderr
    told = HfApi().get_discussion_details(repo, newer.pr_num, repo_type="dataset").events[-1]
    assert told.type == "comment" and "shard 1" in told.content and "verification fail (prior" in told.content, told
