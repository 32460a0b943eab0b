"""The server as a process: `coopt-hub hub serve`, the `hf` CLI against it, restarts, two processes on one root."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi

from coopt_hub.server import HubServer

BIN = Path(sys.executable).parent


def _run_hf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_COLOR": "1"}
    result = subprocess.run([str(BIN / "hf"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_hf_cli_upload_and_download(hf_api, repo_id, tmp_path):
    hf_api.create_repo(repo_id, repo_type="dataset")
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "hello.txt").write_text("hello from hf")
    (tmp_path / "up" / "blob.parquet").write_bytes(os.urandom(5000))
    _run_hf("upload", repo_id, "up", "remote", "--repo-type", "dataset", cwd=tmp_path)
    assert {"remote/hello.txt", "remote/blob.parquet"} <= set(hf_api.list_repo_files(repo_id, repo_type="dataset"))
    _run_hf("download", repo_id, "--repo-type", "dataset", "--local-dir", "down", cwd=tmp_path)
    assert (tmp_path / "down" / "remote" / "hello.txt").read_text() == "hello from hf"
    downloaded = tmp_path / "down" / "remote" / "blob.parquet"
    assert downloaded.read_bytes() == (tmp_path / "up" / "blob.parquet").read_bytes()


@pytest.fixture
def serve_process(tmp_path):
    """Start `coopt-hub hub serve` on a fresh root; yields (start function, root)."""
    root = tmp_path / "root"
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("# writers\nproc-token\n")
    processes: list[subprocess.Popen] = []

    def start() -> dict[str, str]:
        process = subprocess.Popen(
            [str(BIN / "coopt-hub"), "hub", "serve", "--root", str(root), "--port", "0", "--token-file",
             str(token_file)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        processes.append(process)
        lines = [process.stdout.readline() for _ in range(3)]
        env = dict(line.removeprefix("export ").strip().split("=", 1) for line in lines)
        return env

    yield start, root
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_serve_prints_the_environment_and_survives_a_restart(serve_process, new_repo_id):
    start, root = serve_process
    env = start()
    assert env["HF_TOKEN"] == "proc-token" and env["HF_HUB_DISABLE_XET"] == "1"
    api = HfApi(endpoint=env["HF_ENDPOINT"], token=env["HF_TOKEN"])
    repo = new_repo_id("restart")
    api.create_repo(repo, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"\x00kept", path_in_repo="a.bin", repo_id=repo, repo_type="dataset")
    api.create_branch(repo, branch="shard/1", repo_type="dataset")
    api.create_tag(repo, tag="v1", repo_type="dataset")
    sha = api.dataset_info(repo).sha

    with HubServer(root, tokens=["other"]) as again:  # a second start on the same root
        reopened = HfApi(endpoint=again.endpoint, token="other")
        assert reopened.dataset_info(repo, revision="v1").sha == sha
        refs = reopened.list_repo_refs(repo, repo_type="dataset")
        assert {b.name for b in refs.branches} == {"main", "shard/1"}
        path = reopened.hf_hub_download(repo, "a.bin", repo_type="dataset", local_dir=root.parent / "dl")
        assert Path(path).read_bytes() == b"\x00kept"


def test_two_processes_on_one_root_lose_no_commit(serve_process, new_repo_id):
    start, root = serve_process
    env = start()
    process_api = HfApi(endpoint=env["HF_ENDPOINT"], token=env["HF_TOKEN"])
    repo = new_repo_id("two-procs")
    process_api.create_repo(repo, repo_type="dataset")
    with HubServer(root, tokens=["local"]) as local:
        apis = [process_api, HfApi(endpoint=local.endpoint, token="local")]
        errors: list[Exception] = []

        def write(i: int) -> None:
            try:
                apis[i % 2].upload_file(path_or_fileobj=str(i).encode(), path_in_repo=f"{i}.txt", repo_id=repo,
                                        repo_type="dataset", commit_message=f"writer {i}")
            except Exception as err:  # noqa: BLE001 - collected and asserted below
                errors.append(err)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    titles = {c.title for c in process_api.list_repo_commits(repo, repo_type="dataset")}
    assert {f"writer {i}" for i in range(8)} <= titles


def test_stop_ends_keep_alive_connections(tmp_path):
    hub = HubServer(tmp_path / "root", tokens=["t"]).start()
    with httpx2.Client() as client:
        assert client.get(f"{hub.endpoint}/api/whoami-v2", headers={"Authorization": "Bearer t"}).status_code == 200
        hub.stop()
        with pytest.raises(httpx2.TransportError):
            client.get(f"{hub.endpoint}/api/whoami-v2", headers={"Authorization": "Bearer t"})


def test_tokens_added_from_the_command_line_carry_their_role_into_a_running_hub(serve_process, new_repo_id):
    """`hub token add` appends to the file a running `hub serve` reads: no restart, the role holds."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import HfHubHTTPError

    start, root = serve_process
    env = start()
    token_file = root.parent / "tokens.txt"
    added = subprocess.run([str(BIN / "coopt-hub"), "hub", "token", "add", "--token-file", str(token_file),
                            "--role", "contribute", "--repo", "org/*", "--user", "alice"],
                           capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    alice = added.stdout.strip()
    assert alice and alice not in token_file.read_text(), "the token file keeps the token in clear"
    owner = HfApi(endpoint=env["HF_ENDPOINT"], token=env["HF_TOKEN"])
    repo = new_repo_id("token-add")
    owner.create_repo(repo, repo_type="dataset")
    contributor = HfApi(endpoint=env["HF_ENDPOINT"], token=alice)
    change = [CommitOperationAdd("notes.txt", b"from alice")]
    with pytest.raises(HfHubHTTPError) as refused:
        contributor.create_commit(repo, change, commit_message="direct", repo_type="dataset")
    assert refused.value.response.status_code == 403, "a contribute token pushed to main"
    opened = contributor.create_commit(repo, change, commit_message="as a PR", repo_type="dataset", create_pr=True)
    assert opened.pr_num is not None, "the contribute token could not open a pull request"
