"""Branches (including `shard/3`), tags and history."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, HfFileSystem, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError


@pytest.fixture
def dataset(hf_api, repo_id) -> str:
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"v1 data", path_in_repo="data.txt", repo_id=repo_id, repo_type="dataset")
    return repo_id


def test_branch_with_a_slash_round_trip(hf_api, dataset):
    hf_api.create_branch(dataset, branch="shard/3", repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"shard three", path_in_repo="shards/3/report.json", repo_id=dataset,
                       repo_type="dataset", revision="shard/3")
    with open(hf_hub_download(dataset, "shards/3/report.json", repo_type="dataset", revision="shard/3"), "rb") as f:
        assert f.read() == b"shard three"
    assert "shards/3/report.json" not in hf_api.list_repo_files(dataset, repo_type="dataset")

    fs = HfFileSystem()
    assert fs.ls(f"datasets/{dataset}@shard%2F3/shards/3", detail=False) == [
        f"datasets/{dataset}@shard%2F3/shards/3/report.json"
    ]
    assert fs.cat(f"datasets/{dataset}@shard%2F3/shards/3/report.json") == b"shard three"

    branches = {b.name for b in hf_api.list_repo_refs(dataset, repo_type="dataset").branches}
    assert branches == {"main", "shard/3"}
    assert [c.title for c in hf_api.list_repo_commits(dataset, repo_type="dataset", revision="shard/3")][0] == (
        "Upload shards/3/report.json with huggingface_hub"
    )
    hf_api.delete_branch(dataset, branch="shard/3", repo_type="dataset")
    assert {b.name for b in hf_api.list_repo_refs(dataset, repo_type="dataset").branches} == {"main"}
    with pytest.raises(RevisionNotFoundError):
        hf_api.list_repo_files(dataset, repo_type="dataset", revision="shard/3")
    hf_api.create_branch(dataset, branch="shard", repo_type="dataset")  # its folder was cleaned up


def test_branch_from_a_revision_and_exist_ok(hf_api, dataset):
    first = hf_api.list_repo_commits(dataset, repo_type="dataset")[-1].commit_id
    hf_api.create_branch(dataset, branch="old", revision=first, repo_type="dataset")
    assert hf_api.dataset_info(dataset, revision="old").sha == first
    hf_api.create_branch(dataset, branch="old", repo_type="dataset", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_branch(dataset, branch="old", repo_type="dataset")
    assert info.value.response.status_code == 409
    with pytest.raises(RevisionNotFoundError):
        hf_api.create_branch(dataset, branch="new", revision="no-such-rev", repo_type="dataset")


def test_branch_and_nested_branch_conflict_cleanly(hf_api, dataset):
    hf_api.create_branch(dataset, branch="shard", repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_branch(dataset, branch="shard/1", repo_type="dataset")
    assert info.value.response.status_code == 409


def test_deleting_missing_refs_and_main(hf_api, hub_server, dataset):
    with pytest.raises(RevisionNotFoundError):
        hf_api.delete_branch(dataset, branch="nope", repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        HfApi(token=hub_server.new_token("admin")).delete_tag(dataset, tag="nope", repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.delete_branch(dataset, branch="main", repo_type="dataset")
    assert info.value.response.status_code == 403


def test_tag_keeps_serving_old_data_after_main_moves(hf_api, hub_server, dataset, tmp_path):
    hf_api.create_tag(dataset, tag="v1", tag_message="first release", repo_type="dataset")
    tagged = hf_api.dataset_info(dataset, revision="v1").sha
    hf_api.upload_file(path_or_fileobj=b"v2 data", path_in_repo="data.txt", repo_id=dataset, repo_type="dataset")
    with open(hf_hub_download(dataset, "data.txt", repo_type="dataset", revision="v1", cache_dir=tmp_path)) as f:
        assert f.read() == "v1 data"
    with open(hf_hub_download(dataset, "data.txt", repo_type="dataset", cache_dir=tmp_path)) as f:
        assert f.read() == "v2 data"
    refs = hf_api.list_repo_refs(dataset, repo_type="dataset")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", tagged)]
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_tag(dataset, tag="v1", repo_type="dataset")
    assert info.value.response.status_code == 409
    hf_api.create_tag(dataset, tag="v1", repo_type="dataset", exist_ok=True)
    HfApi(token=hub_server.new_token("admin")).delete_tag(dataset, tag="v1", repo_type="dataset")
    assert hf_api.list_repo_refs(dataset, repo_type="dataset").tags == []


def test_tag_of_a_branch_revision(hf_api, dataset):
    hf_api.create_branch(dataset, branch="shard/0", repo_type="dataset")
    head = hf_api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id=dataset, repo_type="dataset",
                              revision="shard/0").oid
    hf_api.create_tag(dataset, tag="shard-0-done", revision="shard/0", repo_type="dataset")
    assert hf_api.dataset_info(dataset, revision="shard-0-done").sha == head


def test_refs_and_commit_listing_shapes(hf_api, dataset):
    refs = hf_api.list_repo_refs(dataset, repo_type="dataset", include_pull_requests=True)
    assert refs.converts == [] and refs.pull_requests == []
    [main] = refs.branches
    commits = hf_api.list_repo_commits(dataset, repo_type="dataset")
    assert main.target_commit == commits[0].commit_id
    assert [c.title for c in commits] == ["Upload data.txt with huggingface_hub", "initial commit"]
    assert commits[0].created_at >= commits[1].created_at
    assert hf_api.list_repo_commits(dataset, repo_type="dataset", revision=commits[1].commit_id)[0].title == (
        "initial commit"
    )


def test_unknown_revision_is_revision_not_found(hf_api, dataset):
    with pytest.raises(RevisionNotFoundError):
        hf_api.dataset_info(dataset, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(dataset, "data.txt", repo_type="dataset", revision="0" * 40)
