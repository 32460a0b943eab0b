"""`coopt-hub init` and the source layer against the embedded hub, through the real clients."""

from __future__ import annotations

import io
import json
from uuid import uuid4

import helpers_hub
import numpy as np
import pytest
from click.testing import CliRunner

from coopt_hub.cli import cli
from coopt_hub.core.layout import ANCHORS_PATH, PLAN_PATH
from coopt_hub.demo.sample_data import ROWS_PER_GROUP, digits_dataset
from coopt_hub.errors import PlanError, SourceError
from coopt_hub.hub.repo import check_source_pin, load_anchors, load_plan
from coopt_hub.hub.source import read_plan_unit, resolve_source
from coopt_hub.platform.init import initialize
from coopt_hub.priors import decode_image

IMAGE_SIZE = 16  # that of conftest's digits_source


@pytest.fixture(scope="module")
def digits():
    """The rows the digits source was published from."""
    return digits_dataset(IMAGE_SIZE)


def plan_args(source_repo, **overrides):
    args = dict(source=source_repo, source_revision=None, split="train", image_column="image", shards=3,
                anchors=64, dim=32, seed=0, temperature=2.0)
    args.update(overrides)
    return args


def test_resolve_source_pins_sha_and_lists_row_groups(hub, digits_source, digits):
    layout = resolve_source(digits_source, None, "train", "image")
    assert layout.revision == hub.head(digits_source)
    assert layout.num_rows == len(digits["train"])
    assert all(unit.num_rows <= ROWS_PER_GROUP for unit in layout.units)
    assert len(layout.units) == -(-layout.num_rows // ROWS_PER_GROUP)
    assert [u.start for u in layout.units] == list(np.cumsum([0] + [u.num_rows for u in layout.units[:-1]]))
    assert set(layout.splits) == {"train", "test"}
    assert layout.card_data.get("license") == "cc-by-4.0"


@pytest.fixture(scope="module")
def initialized(hub, digits_source):
    """A collaboration just initialized over the digits source: (repo, the result of initialize)."""
    repo = f"org/coopt-{uuid4().hex[:12]}"
    return repo, initialize(hub, repo, **plan_args(digits_source))


def test_init_publishes_the_plan_pinned_to_the_source_commit(hub, digits_source, initialized):
    repo, result = initialized
    assert result.created, "nothing created"
    assert result.commit, "no commit"
    plan = load_plan(hub, repo)
    assert plan == result.plan, "the published plan is not the one returned"
    assert plan.source_revision == hub.head(digits_source), "the plan is not pinned to the source's commit"
    assert plan.granularity == "row_group"


def test_init_shards_are_disjoint_and_cover_every_row(hub, initialized):
    plan = initialized[1].plan
    ids = np.concatenate([plan.shard_ids(k) for k in range(3)])
    assert np.array_equal(np.sort(ids), np.arange(plan.num_rows))


def test_init_anchor_rows_hold_the_source_image_bytes(hub, digits, initialized):
    repo, result = initialized
    plan = result.plan
    anchors = load_anchors(hub, repo, plan)
    assert anchors.column("id").to_pylist() == list(plan.anchor_ids), "not exactly the anchor rows"
    first = plan.anchor_ids[0]
    original = digits["train"].with_format("arrow")[first]["image"][0].as_py()["bytes"]
    assert anchors.column("image")[0].as_py()["bytes"] == original, "other image bytes than the source's"


def test_init_commits_plan_anchors_and_card_once(hub, digits_source, initialized):
    repo, _ = initialized
    files = set(hub.list_files(repo, "main"))
    assert {PLAN_PATH, ANCHORS_PATH, "README.md"} <= files, "plan, anchors or card missing"

    again = initialize(hub, repo, **plan_args(digits_source))
    assert not again.created, "the same init again created something"
    assert again.commit is None, "the same init again made a commit"
    assert len(hub.api.list_repo_commits(repo, repo_type="dataset")) == 2, "not repo creation + one init commit"


def test_init_with_other_arguments_is_refused_and_leaves_main(hub, digits_source, initialized):
    repo, _ = initialized
    head = hub.head(repo)
    with pytest.raises(PlanError, match="different plan.*num_shards"):
        initialize(hub, repo, **plan_args(digits_source, shards=4))
    assert hub.head(repo) == head


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"source": "org/no-such-dataset"}, "not found"),
        ({"split": "validation"}, "no split 'validation'"),
        ({"image_column": "img"}, "no column 'img'"),
        ({"source_revision": "no-such-branch"}, "Revision 'no-such-branch' not found"),
    ],
)
def test_init_source_errors_are_clear(hub, digits_source, new_repo_id, overrides, message):
    with pytest.raises(SourceError, match=message) as info:
        initialize(hub, new_repo_id("coopt"), **plan_args(digits_source, **overrides))
    assert info.value.hint


def test_read_unit_returns_exactly_that_row_group(digits_source, digits):
    from coopt_hub.hub.source import read_unit

    layout = resolve_source(digits_source, None, "train", "image")
    unit = layout.units[3]
    table = read_unit(digits_source, layout.revision, unit, ["image", "label"])
    assert table.column("label").to_pylist() == digits["train"]["label"][unit.start : unit.stop], "labels"
    assert decode_image(table.column("image")[0].as_py(), unit.start).size == (IMAGE_SIZE, IMAGE_SIZE), "image"


def test_single_row_group_source_falls_back_to_rows(hub, digits, new_repo_id):
    from huggingface_hub import CommitOperationAdd, HfApi

    source = new_repo_id("one-group")
    buffer = io.BytesIO()
    digits["train"].select(range(200)).to_parquet(buffer)
    api = HfApi()
    api.create_repo(source, repo_type="dataset")
    api.create_commit(source, [CommitOperationAdd("data/train-00000-of-00001.parquet", buffer.getvalue())],
                      commit_message="one row group", repo_type="dataset")
    repo = new_repo_id("coopt")
    plan = initialize(hub, repo, **plan_args(source, anchors=16)).plan
    assert plan.granularity == "row"
    ids = [set(plan.shard_ids(k).tolist()) for k in range(3)]
    assert set().union(*ids) == set(range(200)), "the shards do not cover every row"
    assert sum(map(len, ids)) == 200, "the shards overlap"
    table = read_plan_unit(plan, plan.shard_units(0)[0], ["label"])
    assert table.num_rows == 200, "a row unit of the plan does not read the whole file"


def test_source_pin_moved_on_is_a_note_not_an_error(hub, new_repo_id):
    from huggingface_hub import HfApi

    source = helpers_hub.digits_source(new_repo_id("moving"))  # its own source: this test moves it on
    repo = new_repo_id("coopt")
    plan = initialize(hub, repo, **plan_args(source)).plan
    assert check_source_pin(plan) is None, "a note before the source moved"
    HfApi().upload_file(path_or_fileobj=b"more", path_in_repo="notes.txt", repo_id=source, repo_type="dataset")
    note = check_source_pin(plan)
    assert note, "no note once the source moved on"
    assert plan.source_revision[:8] in note, note


def test_no_plan_is_a_clear_error(hub, hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    with pytest.raises(PlanError, match="No CoOpt plan") as info:
        load_plan(hub, repo_id)
    assert "coopt-hub init" in info.value.hint


def test_cli_init_prints_a_json_summary(digits_source, new_repo_id):
    result = CliRunner().invoke(cli, ["init", new_repo_id("coopt"), "--source", digits_source, "--shards", "3",
                                      "--anchors", "48", "--dim", "32", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["created"]
    assert summary["anchors"] == 48
    assert sum(summary["shards"]) == summary["rows"]


def test_cli_init_refuses_an_anchor_value_that_is_no_count_or_fraction(digits_source, new_repo_id):
    bad = CliRunner().invoke(cli, ["init", new_repo_id("coopt"), "--source", digits_source, "--shards", "3",
                                   "--anchors", "2.5"])
    assert bad.exit_code == 2, bad.output
    assert "fraction between 0 and 1" in bad.output, bad.output
