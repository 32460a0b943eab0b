"""Commits: regular and LFS files, deletions, parent checks, no-op commits and concurrent writers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


@pytest.fixture
def dataset(hf_api, repo_id) -> str:
    hf_api.create_repo(repo_id, repo_type="dataset")
    return repo_id


def _read(repo_id: str, path: str, revision: str | None = None) -> bytes:
    with open(hf_hub_download(repo_id, path, repo_type="dataset", revision=revision), "rb") as f:
        return f.read()


def test_one_commit_with_regular_and_lfs_files(hf_api, dataset):
    weights = os.urandom(4096)
    with pytest.warns(UserWarning, match="missing yaml metadata"):  # a README without metadata, as the Hub warns
        info = hf_api.create_commit(
            dataset,
            operations=[
                CommitOperationAdd("README.md", b"# hello\n"),
                CommitOperationAdd("data/train.parquet", weights),
                CommitOperationAdd("notes/a b#c.txt", b"odd name"),
            ],
            commit_message="add files",
            commit_description="the body",
            repo_type="dataset",
        )
    assert len(info.oid) == 40 and info.commit_url.endswith(info.oid)
    entries = {e.path: e for e in hf_api.list_repo_tree(dataset, repo_type="dataset", recursive=True)}
    assert entries["data/train.parquet"].lfs.sha256 == hashlib.sha256(weights).hexdigest()
    assert entries["data/train.parquet"].size == 4096
    assert entries["README.md"].lfs is None and entries["README.md"].size == 8
    assert _read(dataset, "data/train.parquet") == weights
    assert _read(dataset, "notes/a b#c.txt") == b"odd name"
    latest = hf_api.list_repo_commits(dataset, repo_type="dataset")[0]
    assert (latest.commit_id, latest.title, latest.message, latest.authors) == (info.oid, "add files", "the body",
                                                                                ["coopt"])


def test_large_text_file_goes_through_lfs(hf_api, dataset):
    big = b"x" * (10 * 1024 * 1024 + 1)
    hf_api.upload_file(path_or_fileobj=big, path_in_repo="big.txt", repo_id=dataset, repo_type="dataset")
    [entry] = hf_api.get_paths_info(dataset, ["big.txt"], repo_type="dataset")
    assert entry.lfs is not None and entry.size == len(big)
    assert _read(dataset, "big.txt") == big


def test_lfs_upload_is_stored_once(hf_api, dataset, hub_server):
    content = os.urandom(2048)
    hf_api.upload_file(path_or_fileobj=content, path_in_repo="a.bin", repo_id=dataset, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=content, path_in_repo="copy/b.bin", repo_id=dataset, repo_type="dataset")
    oid = hashlib.sha256(content).hexdigest()
    stored = list(hub_server.root.glob(f"repos/datasets/{dataset}.git/lfs/objects/*/*/{oid}"))
    assert len(stored) == 1 and stored[0].read_bytes() == content


def test_delete_file_and_folder(hf_api, dataset):
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="add", operations=[
        CommitOperationAdd("keep.txt", b"k"), CommitOperationAdd("dir/a.txt", b"a"),
        CommitOperationAdd("dir/sub/b.txt", b"b"), CommitOperationAdd("gone.txt", b"g"),
    ])
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="delete", operations=[
        CommitOperationDelete("gone.txt"), CommitOperationDelete("dir/"),
    ])
    assert sorted(hf_api.list_repo_files(dataset, repo_type="dataset")) == [".gitattributes", "keep.txt"]


def test_deleting_a_missing_file_fails_and_changes_nothing(hf_api, dataset):
    before = hf_api.dataset_info(dataset).sha
    with pytest.raises(RemoteEntryNotFoundError):
        hf_api.delete_file("nope.txt", dataset, repo_type="dataset")
    assert hf_api.dataset_info(dataset).sha == before


def test_copy_of_regular_and_lfs_files(hf_api, dataset):
    blob = os.urandom(1000)
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="add", operations=[
        CommitOperationAdd("src/a.txt", b"text"), CommitOperationAdd("src/w.safetensors", blob),
    ])
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="copy", operations=[
        CommitOperationCopy("src/a.txt", "dst/a.txt"), CommitOperationCopy("src/w.safetensors", "dst/w.safetensors"),
    ])
    assert _read(dataset, "dst/a.txt") == b"text" and _read(dataset, "dst/w.safetensors") == blob


def test_stale_parent_commit_is_412_and_main_is_unchanged(hf_api, dataset):
    old = hf_api.dataset_info(dataset).sha
    new = hf_api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=dataset, repo_type="dataset").oid
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.create_commit(dataset, repo_type="dataset", commit_message="late",
                             operations=[CommitOperationAdd("late.txt", b"2")], parent_commit=old)
    assert info.value.response.status_code == 412
    assert hf_api.dataset_info(dataset).sha == new
    fresh = hf_api.create_commit(dataset, repo_type="dataset", commit_message="on time",
                                 operations=[CommitOperationAdd("late.txt", b"2")], parent_commit=new)
    assert hf_api.dataset_info(dataset).sha == fresh.oid


def test_unchanged_files_make_no_commit(hf_api, dataset):
    hf_api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=dataset, repo_type="dataset")
    hf_api.upload_file(path_or_fileobj=b"\x00same", path_in_repo="b.bin", repo_id=dataset, repo_type="dataset")
    head = hf_api.dataset_info(dataset).sha
    info = hf_api.create_commit(dataset, repo_type="dataset", commit_message="again", parent_commit=head,
                                operations=[CommitOperationAdd("a.txt", b"same"),
                                            CommitOperationAdd("b.bin", b"\x00same")])
    assert info.oid == head
    assert hf_api.dataset_info(dataset).sha == head


def test_commit_to_a_missing_branch_is_revision_not_found(hf_api, dataset):
    with pytest.raises(RevisionNotFoundError):
        hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=dataset, repo_type="dataset",
                           revision="no-such-branch")


def test_file_cannot_replace_a_folder(hf_api, dataset):
    hf_api.upload_file(path_or_fileobj=b"x", path_in_repo="d/x.txt", repo_id=dataset, repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as info:
        hf_api.upload_file(path_or_fileobj=b"y", path_in_repo="d", repo_id=dataset, repo_type="dataset")
    assert info.value.response.status_code == 400


def test_concurrent_writers_lose_nothing(hf_api, dataset):
    errors = []

    def write(i: int) -> None:
        try:
            hf_api.upload_file(path_or_fileobj=f"{i}".encode(), path_in_repo=f"w/{i}.txt", repo_id=dataset,
                               repo_type="dataset", commit_message=f"writer {i}")
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    titles = {c.title for c in hf_api.list_repo_commits(dataset, repo_type="dataset")}
    assert {f"writer {i}" for i in range(8)} <= titles
    files = set(hf_api.list_repo_files(dataset, repo_type="dataset"))
    assert {f"w/{i}.txt" for i in range(8)} <= files


def test_upload_folder(hf_api, dataset, tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(5):
        (tmp_path / "sub" / f"{i}.txt").write_text(str(i))
    (tmp_path / "data.parquet").write_bytes(os.urandom(3000))
    hf_api.upload_folder(folder_path=tmp_path, repo_id=dataset, repo_type="dataset", path_in_repo="up")
    files = set(hf_api.list_repo_files(dataset, repo_type="dataset"))
    assert {"up/data.parquet", *(f"up/sub/{i}.txt" for i in range(5))} <= files


CRASH_MID_COMMIT = """
import os, sys
from coopt_hub.server.names import RepoId
from coopt_hub.server.storage import AddFile, GitRepo, HubStorage

def killed_while_moving_the_ref(self, ref, old, new):
    (self.path / (ref + ".lock")).write_text(new)
    os._exit(3)

GitRepo._move_ref = killed_while_moving_the_ref
namespace, name = sys.argv[2].split("/")
repo = HubStorage(sys.argv[1]).open(RepoId("dataset", namespace, name))
blob = repo.add_blob("half.txt", b"never visible")
repo.commit("main", [AddFile("half.txt", blob)], "crashing", "", None, "coopt")
"""


def test_a_writer_killed_mid_commit_leaves_no_trace(hf_api, dataset, hub_server):
    hf_api.upload_file(path_or_fileobj=b"before", path_in_repo="a.txt", repo_id=dataset, repo_type="dataset")
    before = [c.commit_id for c in hf_api.list_repo_commits(dataset, repo_type="dataset")]
    crashed = subprocess.run([sys.executable, "-c", CRASH_MID_COMMIT, str(hub_server.root), dataset], timeout=60)
    assert crashed.returncode == 3
    assert [c.commit_id for c in hf_api.list_repo_commits(dataset, repo_type="dataset")] == before
    assert "half.txt" not in hf_api.list_repo_files(dataset, repo_type="dataset")
    after = hf_api.upload_file(path_or_fileobj=b"after", path_in_repo="b.txt", repo_id=dataset, repo_type="dataset")
    assert hf_api.list_repo_commits(dataset, repo_type="dataset")[1].commit_id == before[0]
    assert hf_api.dataset_info(dataset).sha == after.oid


def test_unicode_and_special_paths(hf_api, dataset):
    names = ["données/été.txt", "with space/a+b=c.txt", "hash#and%percent.txt", "日本/語.json"]
    hf_api.create_commit(dataset, repo_type="dataset", commit_message="names",
                         operations=[CommitOperationAdd(name, name.encode()) for name in names])
    assert set(names) <= set(hf_api.list_repo_files(dataset, repo_type="dataset"))
    for name in names:
        assert _read(dataset, name) == name.encode()
    assert hf_api.file_exists(dataset, names[0], repo_type="dataset")
    assert not hf_api.file_exists(dataset, "données/absent.txt", repo_type="dataset")


def test_deleting_a_repo_under_concurrent_writers(hf_api, hub_server, dataset):
    failures: list[Exception] = []

    def write(i: int) -> None:
        for j in range(3):
            try:
                hf_api.upload_file(path_or_fileobj=b"x", path_in_repo=f"{i}-{j}.txt", repo_id=dataset,
                                   repo_type="dataset")
            except RepositoryNotFoundError:
                pass  # the repo was gone at that moment: the one acceptable failure
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                failures.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    HfApi(token=hub_server.new_token("admin")).delete_repo(dataset, repo_type="dataset")
    hf_api.create_repo(dataset, repo_type="dataset")
    for thread in threads:
        thread.join()
    assert failures == []
    assert hf_api.list_repo_commits(dataset, repo_type="dataset")[-1].title == "initial commit"
