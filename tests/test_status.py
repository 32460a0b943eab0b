"""`status` against the embedded hub: done, missing and stale shards, as a library and on the command line."""

from __future__ import annotations

import json
import uuid

import pytest
from click.testing import CliRunner
from helpers_hub import FakePrior, digits_source, skipping, start_collaboration

from coopt_hub.cli import cli
from coopt_hub.core.layout import TARGETS_FILE, remote_paths, shard_branch
from coopt_hub.hub.client import Hub
from coopt_hub.platform.merge.run import merge
from coopt_hub.platform.status import DONE, MISSING, STALE, collaboration_status

GOOD = FakePrior("good-net", output_dim=40, rank=18)
WEAK = FakePrior("weak-net", output_dim=20, rank=6)


@pytest.fixture(scope="module")
def hub(hub_server) -> Hub:
    return Hub(token=hub_server.token)


@pytest.fixture(scope="module")
def source(hub, hub_server) -> str:
    return digits_source(f"org/digits-{uuid.uuid4().hex[:8]}", hub_server.token)


def _other_source_commit(result, anchors):
    result.header.source_revision = "f" * 40


def _truncate(directory):
    path = directory / TARGETS_FILE
    path.write_bytes(path.read_bytes()[:6])


def test_status_tells_done_missing_and_stale(hub, source, new_repo_id):
    collab = start_collaboration(hub, new_repo_id("digits-status"), source, shards=5, anchors=96, dim=16)
    plan = collab.plan
    first = collab.push(0, GOOD)
    collab.push(1, WEAK, reference=(0, GOOD, first))
    collab.push(2, WEAK, edit=_other_source_commit)
    collab.push(3, WEAK, tamper=_truncate)
    hub.ensure_branch(collab.repo, shard_branch(4))  # a branch with nothing pushed yet

    status = collaboration_status(hub, collab.repo)
    states = {s.shard: s.state for s in status.shards}
    assert states == {0: DONE, 1: DONE, 2: STALE, 3: STALE, 4: MISSING}
    by_shard = {s.shard: s for s in status.shards}
    assert "source commit ffffffffffff" in by_shard[2].problems[0]
    assert remote_paths(3).targets in by_shard[3].problems[0]
    assert by_shard[4].problems == ("nothing pushed yet",)
    assert by_shard[1].header.reference["shard"] == 0 and by_shard[1].rows == len(plan.shard_ids(1))
    assert status.best.shard == 0 and status.merged_tag is None
    assert status.rows_done == len(plan.shard_ids(0)) + len(plan.shard_ids(1))

    document = json.loads(CliRunner().invoke(cli, ["status", collab.repo, "--json"]).stdout)
    assert document["counts"] == {"done": 2, "missing": 1, "stale": 2}
    assert [s["state"] for s in document["shards"]] == ["done", "done", "stale", "stale", "missing"]
    assert document["shards"][0]["prior"]["model"] == "good-net" and document["shards"][0]["reference"] is None

    text = CliRunner().invoke(cli, ["status", collab.repo]).output
    assert "2 done, 1 missing, 2 stale" in text and "shard 2: made from source commit" in text
    assert "good-net (random init, seed 0)" in text


def test_status_after_merge_shows_what_main_holds(hub, source, new_repo_id):
    collab = start_collaboration(hub, new_repo_id("digits-merged"), source, shards=2, anchors=64, dim=8)
    first = collab.push(0, GOOD)
    assert [s.state for s in collaboration_status(hub, collab.repo).shards] == [DONE, MISSING]

    result = CliRunner().invoke(cli, ["merge", collab.repo, "--allow-partial", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tag"] == "v1" and summary["missing"] == [1] and summary["created"]

    collab.push(1, WEAK, reference=(0, GOOD, first))
    status = collaboration_status(hub, collab.repo)
    assert status.merged_tag == "v1"
    assert [(s.state, s.merged) for s in status.shards] == [(DONE, True), (DONE, False)]
    merge(hub, collab.repo)
    assert all(s.merged for s in collaboration_status(hub, collab.repo).shards)


def test_a_shard_that_skipped_undecodable_images_is_done(hub, source, new_repo_id):
    collab = start_collaboration(hub, new_repo_id("digits-skipped"), source, shards=3, anchors=64, dim=8)
    plan = collab.plan
    skipped = [int(i) for i in plan.shard_ids(0)[[3, 10, 11]]]
    collab.push(0, GOOD, edit=skipping(*skipped))
    not_its_own = int(plan.shard_ids(2)[0])  # a skipped id of another shard does not account for a row
    collab.push(1, WEAK, edit=skipping(int(plan.shard_ids(1)[0]), not_its_own))

    status = collaboration_status(hub, collab.repo)
    by_shard = {s.shard: s for s in status.shards}
    assert by_shard[0].state == DONE and by_shard[0].skipped == 3 and by_shard[0].problems == ()
    assert by_shard[0].rows == len(plan.shard_ids(0)) - 3 and status.rows_done == by_shard[0].rows
    assert by_shard[1].state == STALE and "skipped ids that are not shard 1's" in by_shard[1].problems[0]
    assert by_shard[2].skipped is None

    document = json.loads(CliRunner().invoke(cli, ["status", collab.repo, "--json"]).stdout)
    assert [s["skipped"] for s in document["shards"]] == [3, 2, None]
    text = CliRunner().invoke(cli, ["status", collab.repo]).output
    assert "skipped" in text.splitlines()[3]
