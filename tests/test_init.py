"""`coopt-hub init` and the source layer against the embedded hub, through the real clients."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from coopt_hub.cli import cli
from coopt_hub.core.layout import ANCHORS_PATH, PLAN_PATH
from coopt_hub.demo.sample_data import ROWS_PER_GROUP, digits_dataset, publish_digits
from coopt_hub.errors import PlanError, SourceError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import check_source_pin, load_anchors, load_plan
from coopt_hub.hub.source import read_plan_unit, resolve_source
from coopt_hub.platform.init import initialize
from coopt_hub.priors import decode_image


@pytest.fixture(scope="module")
def digits_source():
    from uuid import uuid4

    repo = f"org/digits-src-{uuid4().hex[:8]}"
    sha = publish_digits(repo)
    return repo, sha


def plan_args(source_repo, **overrides):
    args = dict(source=source_repo, source_revision=None, split="train", image_column="image", shards=3,
                anchors=64, dim=32, seed=0, temperature=2.0)
    args.update(overrides)
    return args


def test_resolve_source_pins_sha_and_lists_row_groups(digits_source):
    repo, sha = digits_source
    layout = resolve_source(repo, None, "train", "image")
    assert layout.revision == sha
    assert layout.num_rows == len(digits_dataset()["train"])
    assert all(unit.num_rows <= ROWS_PER_GROUP for unit in layout.units)
    assert len(layout.units) == -(-layout.num_rows // ROWS_PER_GROUP)
    assert [u.start for u in layout.units] == list(np.cumsum([0] + [u.num_rows for u in layout.units[:-1]]))
    assert set(layout.splits) == {"train", "test"}
    assert layout.card_data.get("license") == "cc-by-4.0"


def test_init_publishes_plan_and_anchor_rows_once(digits_source, new_repo_id):
    source, sha = digits_source
    repo = new_repo_id("coopt")
    hub = Hub()
    result = initialize(hub, repo, **plan_args(source))
    assert result.created and result.commit
    plan = load_plan(hub, repo)
    assert plan == result.plan and plan.source_revision == sha and plan.granularity == "row_group"
    # shards are disjoint and cover every row
    ids = np.concatenate([plan.shard_ids(k) for k in range(3)])
    assert np.array_equal(np.sort(ids), np.arange(plan.num_rows))
    # anchors.parquet holds exactly the anchor rows, with the same image bytes as the source
    anchors = load_anchors(hub, repo, plan)
    assert anchors.column("id").to_pylist() == list(plan.anchor_ids)
    train = digits_dataset()["train"]
    first = plan.anchor_ids[0]
    original = train.with_format("arrow")[first]["image"][0].as_py()["bytes"]
    assert anchors.column("image")[0].as_py()["bytes"] == original
    # one commit holds plan, anchors and README
    files = set(hub.list_files(repo, "main"))
    assert {PLAN_PATH, ANCHORS_PATH, "README.md"} <= files

    again = initialize(hub, repo, **plan_args(source))
    assert not again.created and again.commit is None
    assert len(hub.api.list_repo_commits(repo, repo_type="dataset")) == 2  # repo creation + init


def test_init_with_other_arguments_is_refused_and_leaves_main(digits_source, new_repo_id):
    source, _ = digits_source
    repo = new_repo_id("coopt")
    hub = Hub()
    initialize(hub, repo, **plan_args(source))
    head = hub.head(repo)
    with pytest.raises(PlanError, match="different plan.*num_shards"):
        initialize(hub, repo, **plan_args(source, shards=4))
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
def test_init_source_errors_are_clear(digits_source, new_repo_id, overrides, message):
    source, _ = digits_source
    with pytest.raises(SourceError, match=message) as info:
        initialize(Hub(), new_repo_id("coopt"), **plan_args(source, **overrides))
    assert info.value.hint


def test_read_unit_returns_exactly_that_row_group(digits_source):
    repo, _ = digits_source
    layout = resolve_source(repo, None, "train", "image")
    from coopt_hub.hub.source import read_unit

    unit = layout.units[3]
    table = read_unit(repo, layout.revision, unit, ["image", "label"])
    train = digits_dataset()["train"]
    assert table.column("label").to_pylist() == train["label"][unit.start : unit.stop]
    assert decode_image(table.column("image")[0].as_py(), unit.start).size == (32, 32)


def test_single_row_group_source_falls_back_to_rows(new_repo_id):
    from huggingface_hub import CommitOperationAdd, HfApi

    source = new_repo_id("one-group")
    buffer = io.BytesIO()
    digits_dataset()["train"].select(range(200)).to_parquet(buffer)
    api = HfApi()
    api.create_repo(source, repo_type="dataset")
    api.create_commit(source, [CommitOperationAdd("data/train-00000-of-00001.parquet", buffer.getvalue())],
                      commit_message="one row group", repo_type="dataset")
    repo = new_repo_id("coopt")
    plan = initialize(Hub(), repo, **plan_args(source, anchors=16)).plan
    assert plan.granularity == "row"
    ids = [set(plan.shard_ids(k).tolist()) for k in range(3)]
    assert set().union(*ids) == set(range(200)) and sum(map(len, ids)) == 200
    table = read_plan_unit(plan, plan.shard_units(0)[0], ["label"])
    assert table.num_rows == 200


def test_source_pin_moved_on_is_a_note_not_an_error(new_repo_id):
    from huggingface_hub import HfApi

    source = new_repo_id("moving")
    publish_digits(source)
    repo = new_repo_id("coopt")
    plan = initialize(Hub(), repo, **plan_args(source)).plan
    assert check_source_pin(plan) is None
    HfApi().upload_file(path_or_fileobj=b"more", path_in_repo="notes.txt", repo_id=source, repo_type="dataset")
    note = check_source_pin(plan)
    assert note and plan.source_revision[:8] in note


def test_no_plan_is_a_clear_error(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    with pytest.raises(PlanError, match="No CoOpt plan") as info:
        load_plan(Hub(), repo_id)
    assert "coopt-hub init" in info.value.hint


def test_cli_init_json_and_bad_anchor_value(digits_source, new_repo_id):
    source, _ = digits_source
    repo = new_repo_id("coopt")
    runner = CliRunner()
    result = runner.invoke(cli, ["init", repo, "--source", source, "--shards", "3", "--anchors", "48",
                                 "--dim", "32", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["created"] and summary["anchors"] == 48 and sum(summary["shards"]) == summary["rows"]
    bad = runner.invoke(cli, ["init", repo, "--source", source, "--shards", "3", "--anchors", "2.5"])
    assert bad.exit_code == 2 and "fraction between 0 and 1" in bad.output
