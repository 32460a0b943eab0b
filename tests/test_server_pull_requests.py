"""Pull requests and discussions, through the real huggingface_hub client (what issue 13 builds on)."""

from __future__ import annotations

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError


@pytest.fixture
def dataset(hf_api, repo_id) -> str:
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"base", path_in_repo="base.txt", repo_id=repo_id, repo_type="dataset")
    return repo_id


def _read(repo_id: str, path: str, revision: str, cache_dir) -> bytes:
    with open(hf_hub_download(repo_id, path, repo_type="dataset", revision=revision, cache_dir=cache_dir), "rb") as f:
        return f.read()


def test_a_contribution_by_pull_request_round_trip(hf_api, dataset, tmp_path):
    main_before = hf_api.dataset_info(dataset).sha
    info = hf_api.create_commit(dataset, repo_type="dataset", commit_message="shard 0", commit_description="labels",
                                operations=[CommitOperationAdd("shards/0.txt", b"zero")], create_pr=True)
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert hf_api.dataset_info(dataset).sha == main_before  # main untouched until the merge
    assert _read(dataset, "shards/0.txt", "refs/pr/1", tmp_path) == b"zero"

    follow_up = hf_api.create_commit(dataset, repo_type="dataset", commit_message="fix", revision="refs/pr/1",
                                     operations=[CommitOperationAdd("shards/0.txt", b"zero, fixed")])
    refs = hf_api.list_repo_refs(dataset, repo_type="dataset", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", follow_up.oid)]

    [listed] = list(hf_api.get_repo_discussions(dataset, repo_type="dataset"))
    assert (listed.num, listed.title, listed.is_pull_request, listed.status) == (1, "shard 0", True, "open")
    comment = hf_api.comment_discussion(dataset, 1, "looks good", repo_type="dataset")
    assert comment.content == "looks good"

    details = hf_api.get_discussion_details(dataset, 1, repo_type="dataset")
    assert details.target_branch == "refs/heads/main" and details.conflicting_files == []
    assert [e.type for e in details.events] == ["comment", "commit", "commit", "comment"]
    assert [e.summary for e in details.events if e.type == "commit"] == ["shard 0", "fix"]

    hf_api.merge_pull_request(dataset, 1, comment="thanks", repo_type="dataset")
    details = hf_api.get_discussion_details(dataset, 1, repo_type="dataset")
    assert details.status == "merged" and len(details.merge_commit_oid) == 40
    assert hf_api.dataset_info(dataset).sha == details.merge_commit_oid
    assert _read(dataset, "shards/0.txt", "main", tmp_path) == b"zero, fixed"
    assert _read(dataset, "base.txt", "main", tmp_path) == b"base"
    with pytest.raises(HfHubHTTPError) as error:
        hf_api.merge_pull_request(dataset, 1, repo_type="dataset")
    assert error.value.response.status_code == 409


def test_a_merge_keeps_what_main_gained_and_refuses_conflicts(hf_api, dataset):
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="pr one", create_pr=True,
                         operations=[CommitOperationAdd("a.txt", b"from pr"), CommitOperationDelete("base.txt")])
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="pr two", create_pr=True,
                         operations=[CommitOperationAdd("b.txt", b"from pr two")])
    hf_api.upload_file(path_or_fileobj=b"from main", path_in_repo="b.txt", repo_id=dataset, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"main only", path_in_repo="c.txt", repo_id=dataset, repo_type="dataset")

    assert hf_api.get_discussion_details(dataset, 2, repo_type="dataset").conflicting_files == ["b.txt"]
    with pytest.raises(HfHubHTTPError) as error:
        hf_api.merge_pull_request(dataset, 2, repo_type="dataset")
    assert error.value.response.status_code == 409 and "b.txt" in str(error.value)

    hf_api.merge_pull_request(dataset, 1, repo_type="dataset")
    files = set(hf_api.list_repo_files(dataset, repo_type="dataset"))
    assert {"a.txt", "b.txt", "c.txt"} <= files and "base.txt" not in files


def test_discussions_status_filters_and_pages(hf_api, dataset):
    for i in range(3):
        hf_api.create_discussion(dataset, title=f"question {i}", description="why?", repo_type="dataset")
    draft = hf_api.create_pull_request(dataset, title="empty draft", repo_type="dataset")
    assert draft.is_pull_request and draft.status == "draft"
    closed = hf_api.change_discussion_status(dataset, 2, "closed", comment="answered", repo_type="dataset")
    assert closed.new_status == "closed"
    hf_api.rename_discussion(dataset, 3, "question three", repo_type="dataset")

    everything = list(hf_api.get_repo_discussions(dataset, repo_type="dataset"))
    assert [d.num for d in everything] == [4, 3, 2, 1]
    assert [d.num for d in hf_api.get_repo_discussions(dataset, repo_type="dataset", discussion_type="pull_request")
            ] == [4]
    assert [d.num for d in hf_api.get_repo_discussions(dataset, repo_type="dataset", discussion_status="closed")
            ] == [2]
    assert hf_api.get_discussion_details(dataset, 3, repo_type="dataset").title == "question three"
    with pytest.raises(HfHubHTTPError) as error:
        hf_api.get_discussion_details(dataset, 99, repo_type="dataset")
    assert error.value.response.status_code == 404


def test_a_pull_request_from_a_parent_commit(hf_api, dataset):
    first = hf_api.list_repo_commits(dataset, repo_type="dataset")[-1].commit_id
    info = hf_api.create_commit(dataset, repo_type="dataset", commit_message="from the start", create_pr=True,
                                parent_commit=first, operations=[CommitOperationAdd("x.txt", b"x")])
    files = hf_api.list_repo_files(dataset, repo_type="dataset", revision=info.pr_revision)
    assert sorted(files) == [".gitattributes", "x.txt"]
