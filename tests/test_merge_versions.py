"""`merge` publishes a new version only when the merged content would change: the shards' targets
and anchor outputs (their checksums) or what the card says of their priors. A commit on a shard
branch that leaves those as they were (a notes file, the same result pushed again) changes nothing,
and merge says which version already holds it."""

from __future__ import annotations

import pytest
from cli_run import run_main
from fakes import FakePrior

from coopt_hub.core.layout import shard_branch
from coopt_hub.platform.merge import merge
from coopt_hub.platform.status import collaboration_status

NET = FakePrior("net", output_dim=20, rank=16)


@pytest.fixture(scope="module")
def collab(new_collaboration, small_source):
    """2 shards of 120 digits with fake priors, merged once as v1."""
    collab = new_collaboration(small_source, "versions", shards=2, anchors=32, dim=8)
    first = collab.push(0, FakePrior("wide", output_dim=40))
    collab.push(1, NET, reference=(0, FakePrior("wide", output_dim=40), first))
    assert merge(collab.hub, collab.repo, images="reference", no_evaluate=True).tag == "v1"
    return collab


def merge_again(collab) -> tuple[str, bool]:
    result = merge(collab.hub, collab.repo, images="reference", no_evaluate=True)
    return result.tag, result.created


def tags(collab) -> set[str]:
    return set(collab.hub.refs(collab.repo)[1])


def test_an_unrelated_commit_on_a_shard_branch_publishes_no_new_version(collab):
    from huggingface_hub import CommitOperationAdd

    collab.hub.commit(collab.repo, shard_branch(0), lambda head: [CommitOperationAdd("notes.md", b"# notes\n")],
                      message="notes")
    assert merge_again(collab) == ("v1", False), "a notes file made a new version"
    outcome = run_main(["merge", collab.repo, "--images", "reference", "--no-evaluate"])
    assert outcome.code == 0 and "already holds this merge as v1" in outcome.stdout, outcome.output
    assert tags(collab) == {"v1"}, "a version tag was added"
    shard = collaboration_status(collab.hub, collab.repo).shards[0]
    assert shard.merged, "status shows a shard main's merge holds as not merged after a notes commit"


def test_the_same_result_pushed_again_publishes_no_new_version(collab):
    first = collab.hub.head(collab.repo, shard_branch(0))
    collab.push(1, NET, reference=(0, FakePrior("wide", output_dim=40), first))
    assert merge_again(collab) == ("v1", False), "the same targets pushed again made a new version"


def test_a_prior_the_card_would_name_differently_is_a_new_version(collab):
    """Same tensors (a fake prior's outputs do not depend on its name), another prior record."""
    first = collab.hub.head(collab.repo, shard_branch(0))
    collab.push(1, FakePrior("renamed-net", output_dim=20, rank=16), reference=(0, FakePrior("wide", output_dim=40),
                                                                                  first))
    assert merge_again(collab) == ("v2", True), "a changed card input published nothing"
    collab.push(1, FakePrior("renamed-net", output_dim=20, rank=8), reference=(0, FakePrior("wide", output_dim=40),
                                                                                 first))
    assert merge_again(collab) == ("v3", True), "changed targets published nothing"
    assert tags(collab) == {"v1", "v2", "v3"}


@pytest.mark.parametrize("tag", ["x/", "v1..2", "-v2", "a b", "0" * 40])
def test_a_tag_the_hub_would_refuse_is_refused_before_main_changes(collab, tag):
    main_before = collab.hub.head(collab.repo, "main")
    outcome = run_main(["merge", collab.repo, "--images", "reference", "--no-evaluate", "--tag", tag])
    assert outcome.code != 0 and "is not a usable version tag; nothing was written" in outcome.output, \
        outcome.output
    assert collab.hub.head(collab.repo, "main") == main_before, "main changed before the tag was refused"
