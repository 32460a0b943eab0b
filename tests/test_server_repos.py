"""Repos, accounts and access control through the real huggingface_hub client."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError


def test_whoami_names_the_token_user(hf_api):
    assert hf_api.whoami()["name"] == "coopt"


def test_whoami_with_unknown_token_is_401(hub_server):
    with pytest.raises(HfHubHTTPError) as info:
        HfApi(token="not-a-known-token").whoami()
    assert info.value.response.status_code == 401
    assert "not-a-known-token" not in str(info.value)


def test_create_repo_returns_its_url_and_exist_ok_reads_the_409(hf_api, hub_server, repo_id):
    url = hf_api.create_repo(repo_id, repo_type="dataset")
    assert url == f"{hub_server.endpoint}/datasets/{repo_id}"
    assert url.repo_id == repo_id and url.repo_type == "dataset"
    assert hf_api.create_repo(repo_id, repo_type="dataset", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_repo(repo_id, repo_type="dataset")
    assert info.value.response.status_code == 409


def test_new_repo_has_an_initial_commit_on_main(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    info = hf_api.dataset_info(repo_id)
    assert len(info.sha) == 40 and [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert [c.title for c in hf_api.list_repo_commits(repo_id, repo_type="dataset")] == ["initial commit"]


def test_model_repo_round_trip(hf_api, repo_id):
    hf_api.create_repo(repo_id)
    hf_api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    assert hf_api.model_info(repo_id).id == repo_id
    with open(hf_hub_download(repo_id, "config.json")) as f:
        assert f.read() == "{}"


def test_delete_repo(hf_api, hub_server, repo_id):
    admin = HfApi(token=hub_server.new_token("admin"))
    hf_api.create_repo(repo_id, repo_type="dataset")
    admin.delete_repo(repo_id, repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        hf_api.dataset_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        admin.delete_repo(repo_id, repo_type="dataset")
    admin.delete_repo(repo_id, repo_type="dataset", missing_ok=True)
    hf_api.create_repo(repo_id, repo_type="dataset")  # the name is free again


def test_same_name_in_two_repo_types_are_two_repos(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.create_repo(repo_id, repo_type="model")
    hf_api.upload_file(path_or_fileobj=b"m", path_in_repo="only-model.txt", repo_id=repo_id)
    assert "only-model.txt" not in hf_api.list_repo_files(repo_id, repo_type="dataset")


def test_missing_repo_is_repository_not_found(hf_api, repo_id):
    with pytest.raises(RepositoryNotFoundError):
        hf_api.dataset_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "x.txt", repo_type="dataset")


def test_writes_need_a_known_token(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    before = hf_api.dataset_info(repo_id).sha
    for token in (False, "wrong-token"):
        api = HfApi(token=token)
        with pytest.raises(HfHubHTTPError) as info:
            api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, repo_type="dataset")
        assert info.value.response.status_code == 401
        assert info.value.response.headers["X-Error-Code"]
        with pytest.raises(HfHubHTTPError):
            api.create_repo(repo_id + "-other", repo_type="dataset")
        with pytest.raises(HfHubHTTPError):
            api.create_branch(repo_id, branch="b", repo_type="dataset")
    assert hf_api.dataset_info(repo_id).sha == before
    assert "x.txt" not in hf_api.list_repo_files(repo_id, repo_type="dataset")


def test_anonymous_reads_of_public_repos_work(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"public", path_in_repo="a.txt", repo_id=repo_id, repo_type="dataset")
    anonymous = HfApi(token=False)
    assert anonymous.dataset_info(repo_id).id == repo_id
    assert "a.txt" in anonymous.list_repo_files(repo_id, repo_type="dataset")


def test_private_repo_is_invisible_without_a_token(hf_api, repo_id, tmp_path):
    hf_api.create_repo(repo_id, repo_type="dataset", private=True)
    hf_api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_id, repo_type="dataset")
    assert hf_api.dataset_info(repo_id).private is True
    anonymous = HfApi(token=False)
    for call in (
        lambda: anonymous.dataset_info(repo_id),
        lambda: anonymous.list_repo_files(repo_id, repo_type="dataset"),
        lambda: anonymous.list_repo_refs(repo_id, repo_type="dataset"),
        lambda: anonymous.list_repo_commits(repo_id, repo_type="dataset"),
        lambda: hf_hub_download(repo_id, "s.txt", repo_type="dataset", token=False, cache_dir=tmp_path),
    ):
        with pytest.raises(RepositoryNotFoundError):
            call()


def test_visibility_can_be_changed(hf_api, hub_server, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset", private=True)
    HfApi(token=hub_server.new_token("admin")).update_repo_settings(repo_id, repo_type="dataset", private=False)
    assert HfApi(token=False).dataset_info(repo_id).private is False


def test_repo_info_with_file_metadata(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"\x00" * 100, path_in_repo="w.bin", repo_id=repo_id, repo_type="dataset")
    info = hf_api.dataset_info(repo_id, files_metadata=True)
    sibling = {s.rfilename: s for s in info.siblings}["w.bin"]
    assert sibling.size == 100 and sibling.lfs.size == 100 and len(sibling.lfs.sha256) == 64



def test_reserved_namespace_is_refused(hf_api):
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_repo("api/x", repo_type="dataset")
    assert info.value.response.status_code == 400


def test_card_data_comes_from_the_readme_metadata(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    readme = b"---\nlicense: mit\ntags:\n- coopt\n---\n# Title\n"
    hf_api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    card = hf_api.dataset_info(repo_id).card_data
    assert card.license == "mit" and card.tags == ["coopt"]


def test_readme_with_broken_metadata_is_refused(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    with pytest.raises(ValueError, match="YAML"):
        hf_api.upload_file(path_or_fileobj=b"---\nkey: [unclosed\n---\n", path_in_repo="README.md",
                           repo_id=repo_id, repo_type="dataset")


def test_existence_checks(hf_api, repo_id):
    assert not hf_api.repo_exists(repo_id, repo_type="dataset")
    hf_api.create_repo(repo_id, repo_type="dataset")
    assert hf_api.repo_exists(repo_id, repo_type="dataset")
    assert hf_api.revision_exists(repo_id, "main", repo_type="dataset")
    assert not hf_api.revision_exists(repo_id, "nope", repo_type="dataset")
    assert hf_api.file_exists(repo_id, ".gitattributes", repo_type="dataset")


def test_space_repos_are_plain_git_repos(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="space", space_sdk="static")
    hf_api.upload_file(path_or_fileobj=b"<html></html>", path_in_repo="index.html", repo_id=repo_id,
                       repo_type="space")
    assert "index.html" in hf_api.list_repo_files(repo_id, repo_type="space")
    assert hf_hub_download(repo_id, "index.html", repo_type="space")


def test_repo_deleted_while_a_request_reads_it_is_not_found(hf_api, repo_id, hub_server, monkeypatch):
    hf_api.create_repo(repo_id, repo_type="dataset")
    storage = hub_server.api.storage
    real_open = storage.open

    def open_then_lose_the_race(repo):
        opened = real_open(repo)
        monkeypatch.setattr(storage, "open", real_open)
        storage.delete(repo)
        return opened

    monkeypatch.setattr(storage, "open", open_then_lose_the_race)
    with pytest.raises(RepositoryNotFoundError):
        hf_api.dataset_info(repo_id)
