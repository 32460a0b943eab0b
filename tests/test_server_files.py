"""Reading files: tree listings, paths-info, resolve (with Range), downloads and HfFileSystem."""

from __future__ import annotations

import os

import httpx2
import pytest
from huggingface_hub import CommitOperationAdd, HfFileSystem, hf_hub_download, snapshot_download
from huggingface_hub.errors import RemoteEntryNotFoundError

WEIGHTS = os.urandom(300_000)


@pytest.fixture
def dataset(hf_api, repo_id) -> str:
    hf_api.create_repo(repo_id, repo_type="dataset")
    hf_api.create_commit(repo_id, repo_type="dataset", commit_message="files", operations=[
        CommitOperationAdd("README.md", b"---\nlicense: mit\n---\n# ds\n"),
        CommitOperationAdd("data/train-00000.parquet", WEIGHTS),
        CommitOperationAdd("data/sub/deep.txt", b"deep"),
        CommitOperationAdd("data/notes.txt", b"notes"),
    ])
    return repo_id


def test_tree_listing_recursive_and_not(hf_api, dataset):
    top = {e.path: type(e).__name__ for e in hf_api.list_repo_tree(dataset, repo_type="dataset")}
    assert top == {".gitattributes": "RepoFile", "README.md": "RepoFile", "data": "RepoFolder"}
    sub = [e.path for e in hf_api.list_repo_tree(dataset, "data", repo_type="dataset")]
    assert sorted(sub) == ["data/notes.txt", "data/sub", "data/train-00000.parquet"]
    deep = [e.path for e in hf_api.list_repo_tree(dataset, "data/sub", repo_type="dataset")]
    assert deep == ["data/sub/deep.txt"]
    everything = {e.path for e in hf_api.list_repo_tree(dataset, repo_type="dataset", recursive=True)}
    assert {"data", "data/sub", "data/sub/deep.txt", "data/train-00000.parquet"} <= everything
    with pytest.raises(RemoteEntryNotFoundError):
        list(hf_api.list_repo_tree(dataset, "missing", repo_type="dataset"))


def test_tree_expand_gives_last_commit(hf_api, dataset):
    hf_api.upload_file(path_or_fileobj=b"later", path_in_repo="later.txt", repo_id=dataset, repo_type="dataset")
    entries = {e.path: e for e in hf_api.list_repo_tree(dataset, repo_type="dataset", expand=True)}
    assert entries["later.txt"].last_commit.title == "Upload later.txt with huggingface_hub"
    assert entries["README.md"].last_commit.title == "files"


def test_paths_info_omits_missing_paths(hf_api, dataset):
    infos = hf_api.get_paths_info(dataset, ["data/notes.txt", "data", "missing.txt", "data/train-00000.parquet"],
                                  repo_type="dataset")
    by_path = {i.path: i for i in infos}
    assert set(by_path) == {"data/notes.txt", "data", "data/train-00000.parquet"}
    assert by_path["data/notes.txt"].size == 5
    assert by_path["data/train-00000.parquet"].lfs.size == len(WEIGHTS)


def test_resolve_headers_and_ranges(hf_api, dataset, hub_server):
    head = hf_api.dataset_info(dataset).sha
    url = f"{hub_server.endpoint}/datasets/{dataset}/resolve/main/data/train-00000.parquet"
    with httpx2.Client() as client:
        meta = client.head(url)
        assert meta.status_code == 200
        assert meta.headers["X-Repo-Commit"] == head
        assert meta.headers["Content-Length"] == str(len(WEIGHTS))
        assert meta.headers["ETag"].strip('"') == hf_api.get_paths_info(
            dataset, ["data/train-00000.parquet"], repo_type="dataset")[0].lfs.sha256
        part = client.get(url, headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == WEIGHTS[10:20]
        assert part.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
        assert client.get(url, headers={"Range": "bytes=-5"}).content == WEIGHTS[-5:]
        assert client.get(url, headers={"Range": f"bytes={len(WEIGHTS) - 3}-"}).content == WEIGHTS[-3:]
        assert client.get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416
        small = client.get(f"{hub_server.endpoint}/datasets/{dataset}/resolve/{head}/data/notes.txt",
                           headers={"Range": "bytes=1-2"})
        assert small.status_code == 206 and small.content == b"ot"
        missing = client.head(f"{hub_server.endpoint}/datasets/{dataset}/resolve/main/nope.txt")
        assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"
        assert missing.headers["X-Repo-Commit"] == head
        assert "xet" not in " ".join(meta.headers.keys()).lower()


def test_hf_hub_download_and_snapshot_download(dataset, tmp_path):
    path = hf_hub_download(dataset, "data/train-00000.parquet", repo_type="dataset", cache_dir=tmp_path)
    with open(path, "rb") as f:
        assert f.read() == WEIGHTS
    local = snapshot_download(dataset, repo_type="dataset", local_dir=tmp_path / "snap")
    files = sorted(str(p.relative_to(local)) for p in (tmp_path / "snap").rglob("*")
                   if p.is_file() and ".cache" not in p.parts)
    assert files == [".gitattributes", "README.md", "data/notes.txt", "data/sub/deep.txt",
                     "data/train-00000.parquet"]
    assert (tmp_path / "snap" / "data" / "sub" / "deep.txt").read_bytes() == b"deep"
    only = snapshot_download(dataset, repo_type="dataset", allow_patterns=["*.txt"], cache_dir=tmp_path / "c")
    assert sorted(os.listdir(os.path.join(only, "data"))) == ["notes.txt", "sub"]


def test_hf_file_system(dataset):
    fs = HfFileSystem()
    root = f"datasets/{dataset}"
    assert sorted(fs.ls(f"{root}/data", detail=False)) == [
        f"{root}/data/notes.txt", f"{root}/data/sub", f"{root}/data/train-00000.parquet"
    ]
    info = fs.info(f"{root}/data/train-00000.parquet")
    assert info["size"] == len(WEIGHTS) and info["type"] == "file"
    assert fs.info(f"{root}/data")["type"] == "directory"
    with fs.open(f"{root}/data/train-00000.parquet", "rb", block_size=1024) as f:
        f.seek(200_000)
        assert f.read(5000) == WEIGHTS[200_000:205_000]
    assert sorted(fs.glob(f"{root}/**/*.txt")) == [f"{root}/data/notes.txt", f"{root}/data/sub/deep.txt"]
    assert fs.exists(f"{root}/README.md") and not fs.exists(f"{root}/nope.md")


def test_nothing_mentions_xet(dataset, hub_server):
    with httpx2.Client(base_url=hub_server.endpoint) as client:
        bodies = [
            client.get(f"/api/datasets/{dataset}/tree/main", params={"recursive": "true", "expand": "true"}),
            client.post(f"/api/datasets/{dataset}/paths-info/main", data={"paths": ["data/train-00000.parquet"]}),
            client.get(f"/api/datasets/{dataset}", params={"blobs": "true"}),
            client.head(f"/datasets/{dataset}/resolve/main/data/train-00000.parquet"),
        ]
    for response in bodies:
        assert response.status_code == 200
        assert "xet" not in response.text.lower() and "xet" not in str(response.headers).lower()
