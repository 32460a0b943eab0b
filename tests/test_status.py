"""`status` against the embedded hub: done, missing and stale shards, as a library and on the command line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from click.testing import CliRunner
from helpers_hub import FakePrior, skipping

from coopt_hub.cli import cli
from coopt_hub.core.layout import TARGETS_FILE, remote_paths, shard_branch
from coopt_hub.errors import ShardFileError
from coopt_hub.platform.merge.run import merge
from coopt_hub.platform.status import DONE, MISSING, STALE, collaboration_status, remote_targets

GOOD = FakePrior("good-net", output_dim=40, rank=18)
WEAK = FakePrior("weak-net", output_dim=20, rank=6)


def _other_source_commit(result, anchors):
    result.header.source_revision = "f" * 40


def _truncate(directory):
    path = directory / TARGETS_FILE
    path.write_bytes(path.read_bytes()[:6])


@pytest.fixture(scope="module")
def mixed(hub, digits_source, new_collaboration):
    """Five shards: 0 and 1 done (1 aligned to 0), 2 made from another source commit, 3 truncated, 4 a bare branch."""
    collab = new_collaboration(digits_source, "digits-status", shards=5, anchors=96, dim=16)
    first = collab.push(0, GOOD)
    collab.push(1, WEAK, reference=(0, GOOD, first))
    collab.push(2, WEAK, edit=_other_source_commit)
    collab.push(3, WEAK, tamper=_truncate)
    hub.ensure_branch(collab.repo, shard_branch(4))  # a branch with nothing pushed yet
    return collab


def test_status_tells_done_missing_and_stale(hub, mixed):
    status = collaboration_status(hub, mixed.repo)
    states = {s.shard: s.state for s in status.shards}
    assert states == {0: DONE, 1: DONE, 2: STALE, 3: STALE, 4: MISSING}


def test_status_says_why_a_shard_is_stale_or_missing(hub, mixed):
    by_shard = {s.shard: s for s in collaboration_status(hub, mixed.repo).shards}
    assert "source commit ffffffffffff" in by_shard[2].problems[0], "shard 2: the other source commit"
    assert remote_paths(3).targets in by_shard[3].problems[0], "shard 3: the damaged file"
    assert by_shard[4].problems == ("nothing pushed yet",), "shard 4"


def test_status_counts_what_is_done(hub, mixed):
    plan = mixed.plan
    status = collaboration_status(hub, mixed.repo)
    by_shard = {s.shard: s for s in status.shards}
    assert by_shard[1].header.reference["shard"] == 0, "shard 1's reference"
    assert by_shard[1].rows == len(plan.shard_ids(1)), "shard 1's rows"
    assert status.best.shard == 0, "the best prior's shard"
    assert status.merged_tag is None, "a merge, though none was made"
    assert status.rows_done == len(plan.shard_ids(0)) + len(plan.shard_ids(1)), "rows done"


def test_status_without_ranking_reads_the_same_shards_and_scores_none(hub, mixed):
    """A merge asks for the status unranked (it ranks the shards it takes): the same states, headers
    and problems, no ranking and no scores."""
    ranked, unranked = collaboration_status(hub, mixed.repo), collaboration_status(hub, mixed.repo, rank=False)
    assert ranked.ranking is not None and ranked.shards[0].score is not None
    assert unranked.ranking is None and all(s.score is None for s in unranked.shards)
    assert [replace(s, score=None) for s in ranked.shards] == list(unranked.shards)


def test_a_missing_targets_file_read_where_it_lies_is_named_with_what_to_do(hub, mixed):
    """remote_targets (the merge's range reads) on a branch with nothing pushed: the shard's error,
    naming the file and the command its owner runs."""
    commit = hub.head(mixed.repo, shard_branch(4))
    remote = remote_targets(hub, mixed.repo, 4, commit)
    assert remote.name == f"{shard_branch(4)}@{commit[:12]}/{remote_paths(4).targets}"
    with pytest.raises(ShardFileError, match=r"is missing from .*") as caught:
        remote.open()
    assert "optimize --shard 4 --push" in caught.value.hint


def test_status_json(mixed):
    document = json.loads(CliRunner().invoke(cli, ["status", mixed.repo, "--json"]).stdout)
    assert document["counts"] == {"done": 2, "missing": 1, "stale": 2}
    assert [s["state"] for s in document["shards"]] == ["done", "done", "stale", "stale", "missing"]
    assert document["shards"][0]["prior"]["model"] == "good-net"
    assert document["shards"][0]["reference"] is None


def test_status_text(mixed):
    text = CliRunner().invoke(cli, ["status", mixed.repo]).output
    assert "2 done, 1 missing, 2 stale" in text, text
    assert "shard 2: made from source commit" in text, text
    assert "good-net (random init, seed 0)" in text, text


def test_status_after_merge_shows_what_main_holds(hub, digits_source, new_collaboration):
    collab = new_collaboration(digits_source, "digits-merged", shards=2, anchors=64, dim=8)
    first = collab.push(0, GOOD)
    assert [s.state for s in collaboration_status(hub, collab.repo).shards] == [DONE, MISSING], "before the merge"

    result = CliRunner().invoke(cli, ["merge", collab.repo, "--allow-partial", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tag"] == "v1", "partial merge: tag"
    assert summary["missing"] == [1], "partial merge: missing shards"
    assert summary["created"], "partial merge: nothing created"

    collab.push(1, WEAK, reference=(0, GOOD, first))
    status = collaboration_status(hub, collab.repo)
    assert status.merged_tag == "v1", "after the partial merge: merged tag"
    assert [(s.state, s.merged) for s in status.shards] == [(DONE, True), (DONE, False)], \
        "after the partial merge and a new push"
    merge(hub, collab.repo)
    assert all(s.merged for s in collaboration_status(hub, collab.repo).shards), "after the full merge"


def test_a_shard_that_skipped_undecodable_images_is_done(hub, digits_source, new_collaboration):
    collab = new_collaboration(digits_source, "digits-skipped", shards=3, anchors=64, dim=8)
    plan = collab.plan
    skipped = [int(i) for i in plan.shard_ids(0)[[3, 10, 11]]]
    collab.push(0, GOOD, edit=skipping(*skipped))
    not_its_own = int(plan.shard_ids(2)[0])  # a skipped id of another shard does not account for a row
    collab.push(1, WEAK, edit=skipping(int(plan.shard_ids(1)[0]), not_its_own))

    status = collaboration_status(hub, collab.repo)
    by_shard = {s.shard: s for s in status.shards}
    assert by_shard[0].state == DONE, "shard 0 (skipped its own ids): state"
    assert by_shard[0].skipped == 3, "shard 0: skipped count"
    assert by_shard[0].problems == (), "shard 0: problems"
    assert by_shard[0].rows == len(plan.shard_ids(0)) - 3, "shard 0: rows"
    assert status.rows_done == by_shard[0].rows, "rows done"
    assert by_shard[1].state == STALE, "shard 1 (skipped another shard's id): state"
    assert "skipped ids that are not shard 1's" in by_shard[1].problems[0], "shard 1: problem"
    assert by_shard[2].skipped is None, "shard 2 (not pushed): skipped count"

    document = json.loads(CliRunner().invoke(cli, ["status", collab.repo, "--json"]).stdout)
    assert [s["skipped"] for s in document["shards"]] == [3, 2, None], "--json: skipped counts"
    text = CliRunner().invoke(cli, ["status", collab.repo]).output
    assert "skipped" in text.splitlines()[3], text
