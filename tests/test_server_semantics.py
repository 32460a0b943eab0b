"""Hub semantics beyond files and refs: listings, case-insensitive ids, short commit ids,
.gitignore in preupload, implicit folder deletes, and Hub-style errors."""

from __future__ import annotations

import uuid

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError


def test_repo_listings_by_author_search_and_limit(hf_api):
    author = f"lister{uuid.uuid4().hex[:8]}"
    for name in ("alpha-data", "beta-data", "gamma"):
        hf_api.create_repo(f"{author}/{name}", repo_type="dataset")
    hf_api.create_repo(f"{author}/hidden-data", repo_type="dataset", private=True)
    listed = [d.id for d in hf_api.list_datasets(author=author)]
    assert listed == [f"{author}/{n}" for n in ("alpha-data", "beta-data", "gamma", "hidden-data")]
    assert [d.id for d in hf_api.list_datasets(author=author, search="data", limit=2)] == [
        f"{author}/alpha-data", f"{author}/beta-data"]
    assert f"{author}/hidden-data" not in [d.id for d in HfApi(token=False).list_datasets(author=author)]
    assert [m.id for m in hf_api.list_models(author=author)] == []


def test_repo_ids_are_case_insensitive(hf_api, hub_server, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    shouted = repo_id.upper()
    assert hf_api.dataset_info(shouted).id == repo_id  # answered under its own spelling
    hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=shouted, repo_type="dataset")
    assert "x.txt" in hf_api.list_repo_files(repo_id, repo_type="dataset")
    with pytest.raises(Exception) as info:
        hf_api.create_repo(shouted, repo_type="dataset")
    assert info.value.response.status_code == 409
    HfApi(token=hub_server.new_token("admin")).delete_repo(shouted, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        hf_api.dataset_info(repo_id)


def test_short_commit_ids_resolve(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    first = hf_api.dataset_info(repo_id).sha
    hf_api.upload_file(path_or_fileobj=b"later", path_in_repo="later.txt", repo_id=repo_id, repo_type="dataset")
    hf_api.create_tag(repo_id, tag="start", revision=first[:7], repo_type="dataset")
    assert hf_api.dataset_info(repo_id, revision="start").sha == first
    assert hf_api.dataset_info(repo_id, revision=first[:10]).sha == first
    head = hf_api.dataset_info(repo_id).sha
    info = hf_api.create_commit(repo_id, repo_type="dataset", commit_message="on a short parent",
                                operations=[CommitOperationAdd("p.txt", b"p")], parent_commit=head[:7])
    assert hf_api.dataset_info(repo_id).sha == info.oid


def test_gitignore_is_honoured_in_preupload(hf_api, repo_id, tmp_path):
    hf_api.create_repo(repo_id, repo_type="dataset")
    (tmp_path / "keep.txt").write_text("keep")
    (tmp_path / "debug.log").write_text("noise")
    (tmp_path / ".gitignore").write_text("*.log\n")
    hf_api.upload_folder(folder_path=tmp_path, repo_id=repo_id, repo_type="dataset")
    files = set(hf_api.list_repo_files(repo_id, repo_type="dataset"))
    assert {"keep.txt", ".gitignore"} <= files and "debug.log" not in files
    (tmp_path / "again.log").write_text("more noise")  # now ignored by the .gitignore already on main
    hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="sub/again.log", repo_id=repo_id, repo_type="dataset")
    assert "sub/again.log" not in hf_api.list_repo_files(repo_id, repo_type="dataset")


def test_a_file_delete_naming_a_folder_deletes_it(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.create_commit(repo_id, repo_type="dataset", commit_message="add", operations=[
        CommitOperationAdd("dir/a.txt", b"a"), CommitOperationAdd("dir/sub/b.txt", b"b")])
    hf_api.create_commit(repo_id, repo_type="dataset", commit_message="rm",
                         operations=[CommitOperationDelete("dir", is_folder=False)])
    assert hf_api.list_repo_files(repo_id, repo_type="dataset") == [".gitattributes"]
    with pytest.raises(RemoteEntryNotFoundError, match="A file with this name doesn't exist"):
        hf_api.delete_file("missing.txt", repo_id, repo_type="dataset")


def test_errors_carry_a_request_id_and_the_hub_headers(hub_server):
    with httpx2.Client() as client:
        missing = client.get(f"{hub_server.endpoint}/api/datasets/org/no-such-repo-{uuid.uuid4().hex[:6]}")
        ok = client.get(f"{hub_server.endpoint}/api/datasets")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "RepoNotFound"
    assert missing.headers["X-Error-Message"] and missing.json()["error"]
    assert len(missing.headers["X-Request-Id"]) == 32 and ok.headers["X-Request-Id"] != missing.headers["X-Request-Id"]
    with pytest.raises(RepositoryNotFoundError, match="Request ID"):
        HfApi().dataset_info(f"org/no-such-repo-{uuid.uuid4().hex[:6]}")


def test_ids_without_a_namespace_are_repository_not_found(hf_api):
    assert not hf_api.repo_exists("gpt2")  # the Hub's legacy ids: there are none here
    assert not hf_api.revision_exists("gpt2", "main")
    assert not hf_api.file_exists("gpt2", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_api.auth_check("org/no-such-repo")


def test_a_moved_repo_keeps_its_content_and_frees_its_old_name(hf_api, hub_server, repo_id):
    admin = HfApi(token=hub_server.new_token("admin"))
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"kept", path_in_repo="a.txt", repo_id=repo_id, repo_type="dataset")
    moved = f"{repo_id}-moved"
    admin.move_repo(repo_id, moved, repo_type="dataset")
    assert "a.txt" in hf_api.list_repo_files(moved, repo_type="dataset")
    assert not hf_api.repo_exists(repo_id, repo_type="dataset")
    hf_api.create_repo(repo_id, repo_type="dataset")
    with pytest.raises(HfHubHTTPError, match="A dataset repository called .* already exists"):
        admin.move_repo(moved, repo_id, repo_type="dataset")


def test_super_squash_leaves_one_commit_and_every_pin_valid(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    first = hf_api.upload_file(path_or_fileobj=b"1", path_in_repo="a.txt", repo_id=repo_id, repo_type="dataset").oid
    hf_api.create_tag(repo_id, tag="v1", repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"2", path_in_repo="b.txt", repo_id=repo_id, repo_type="dataset")
    hf_api.super_squash_history(repo_id, repo_type="dataset", commit_message="squashed")
    [commit] = hf_api.list_repo_commits(repo_id, repo_type="dataset")
    assert commit.title == "squashed"
    assert set(hf_api.list_repo_files(repo_id, repo_type="dataset")) == {".gitattributes", "a.txt", "b.txt"}
    assert hf_api.dataset_info(repo_id, revision="v1").sha == first
    assert hf_api.list_repo_files(repo_id, repo_type="dataset", revision=first) == [".gitattributes", "a.txt"]


def test_comments_can_be_edited_and_hidden_and_open_includes_drafts(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    draft = hf_api.create_pull_request(repo_id, title="draft", description="first words", repo_type="dataset")
    assert [d.num for d in hf_api.get_repo_discussions(repo_id, repo_type="dataset", discussion_status="open")] == [
        draft.num]
    [comment] = [e for e in hf_api.get_discussion_details(repo_id, draft.num, repo_type="dataset").events
                 if e.type == "comment"]
    edited = hf_api.edit_discussion_comment(repo_id, draft.num, comment.id, "<b>better</b> words", repo_type="dataset")
    assert (edited.content, edited.edited, edited.id) == ("<b>better</b> words", True, comment.id)
    assert edited._event["data"]["latest"]["html"] == "&lt;b&gt;better&lt;/b&gt; words"  # no markup of theirs
    with pytest.warns(UserWarning, match="irreversible"):
        hidden = hf_api.hide_discussion_comment(repo_id, draft.num, comment.id, repo_type="dataset")
    details = hf_api.get_discussion_details(repo_id, draft.num, repo_type="dataset")
    assert hidden.hidden and hidden.content == "" and [e for e in details.events if e.type == "comment"] == [hidden]
    assert "better" not in str(details.events[0]._event)


def test_hub_extras_clients_read(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="space", space_sdk="gradio")
    readme = hf_api.hf_hub_download(repo_id, "README.md", repo_type="space")
    with open(readme) as f:
        assert "sdk: gradio" in f.read()  # a new Space's README names its SDK, as on the Hub
    hf_api.auth_check(repo_id, repo_type="space")
    with pytest.warns(UserWarning, match="empty or missing yaml metadata"):
        hf_api.upload_file(path_or_fileobj=b"# no metadata", path_in_repo="README.md", repo_id=repo_id,
                           repo_type="space")
    [commit, *_] = hf_api.list_repo_commits(repo_id, repo_type="space", formatted=True)
    assert commit.formatted_title == "Upload README.md with huggingface_hub"
