"""The attacks of issue 12, by class: each gets a 4xx JSON answer (or is harmless), the server's
memory stays within a stated bound, and a normal request succeeds right after.

Memory is measured on `coopt-hub hub serve` as a process of its own (peak RSS from /proc), so what
the test itself allocates does not count.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi

from coopt_hub.server import HubServer
from coopt_hub.server.asgi import HubProtocol
from coopt_hub.server.names import RepoId
from coopt_hub.server.storage import AddFile
from tests.conftest import HUB_TOKEN

BIN = Path(sys.executable).parent
TOKEN = "attack-token"
MiB = 1024 * 1024


@dataclass
class Served:
    endpoint: str
    port: int
    root: Path
    pid: int

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024

    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=TOKEN)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`coopt-hub hub serve` in its own process, with one dataset holding a regular and an LFS file."""
    root = tmp_path_factory.mktemp("attacked") / "root"
    process = subprocess.Popen([str(BIN / "coopt-hub"), "hub", "serve", "--root", str(root), "--port", "0",
                                "--token", TOKEN, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    env = dict(process.stdout.readline().removeprefix("export ").strip().split("=", 1) for _ in range(3))
    endpoint = env["HF_ENDPOINT"]
    server = Served(endpoint, int(endpoint.rsplit(":", 1)[1]), root, process.pid)
    api = server.api()
    api.create_repo("org/target", repo_type="dataset")
    api.upload_file(path_or_fileobj=os.urandom(5 * MiB), path_in_repo="regular.txt", repo_id="org/target",
                    repo_type="dataset")
    api.upload_file(path_or_fileobj=os.urandom(64 * MiB), path_in_repo="big.bin", repo_id="org/target",
                    repo_type="dataset")
    yield server
    process.terminate()
    process.wait(timeout=10)


def exchange(port: int, raw: bytes, timeout: float = 30) -> tuple[int | None, dict[str, str], bytes]:
    """Send raw bytes, read the answer until the server closes or a full answer arrived."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            connection.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while block := connection.recv(65536):
                received += block
                head, sep, body = received.partition(b"\r\n\r\n")
                length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
                if sep and length and len(body) >= int(length[0].split(b":")[1]):
                    break
        except (ConnectionResetError, socket.timeout):
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.1") else None
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def assert_json_error(answer: tuple[int | None, dict[str, str], bytes], status: int) -> dict:
    code, headers, body = answer
    assert code == status, body[:300]
    assert headers["content-type"] == "application/json" and headers["x-error-message"]
    error = json.loads(body)
    assert error["error"] and "Traceback" not in error["error"]
    return error


def assert_still_serves(endpoint: str) -> None:
    with httpx2.Client() as client:
        response = client.get(f"{endpoint}/api/datasets/org/target")
    assert response.status_code == 200 and response.json()["id"] == "org/target"


def post(path: str, extra_headers: str, body: bytes, token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra_headers}\r\n".encode() + body


# Framing -----------------------------------------------------------------------------------------------

FRAMING = {
    "negative chunk size": post("/api/validate-yaml", "Transfer-Encoding: chunked\r\n", b"-1\r\n" + b"x" * 1000),
    "0x chunk size": post("/api/validate-yaml", "Transfer-Encoding: chunked\r\n", b"0x10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"),
    "underscore chunk size": post("/api/validate-yaml", "Transfer-Encoding: chunked\r\n", b"1_0\r\n" + b"x" * 16),
    "bytes after a chunk": post("/api/validate-yaml", "Transfer-Encoding: chunked\r\n", b"2\r\n{}junk\r\n0\r\n\r\n"),
    "xchunked with Content-Length": post("/api/validate-yaml", "Transfer-Encoding: xchunked\r\nContent-Length: 2\r\n",
                                         b"{}"),
    "chunked with Content-Length": post("/api/validate-yaml", "Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",
                                        b"2\r\n{}\r\n0\r\n\r\n"),
    "two Content-Lengths": post("/api/validate-yaml", "Content-Length: 2\r\nContent-Length: 3\r\n", b"{}"),
    "superscript Content-Length": post("/api/validate-yaml", "Content-Length: \u00b2\r\n".encode("utf-8").decode("latin-1"),
                                       b"{}"),
    "header without a colon": b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n",
    "300 KiB header": b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (300 * 1024) + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", FRAMING)
def test_framing_attacks_are_refused_and_the_connection_closed(served, name):
    status, headers, body = exchange(served.port, FRAMING[name])
    assert_json_error((status, headers, body), 400)
    assert headers.get("connection") == "close"
    assert_still_serves(served.endpoint)


# Limits ------------------------------------------------------------------------------------------------


def _stream_body(port: int, head: bytes, total: int) -> tuple[int | None, float]:
    """Send `total` bytes of body after `head`, stopping as soon as the server answers; the status and
    how many MiB went out before the answer."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(head)
        connection.settimeout(0.001)
        block = b"a" * MiB
        answer = b""
        while sent < total:
            try:
                answer += connection.recv(4096)
                if answer:
                    break
            except (socket.timeout, BlockingIOError):
                pass
            try:
                connection.sendall(block)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
        connection.settimeout(30)
        try:
            answer += connection.recv(65536)
        except (ConnectionResetError, socket.timeout):
            pass
    status = int(answer.split(b" ")[1]) if answer.startswith(b"HTTP/1.1") else None
    return status, sent / MiB


def test_a_body_without_a_token_is_refused_past_1_mib(served):
    before = served.peak_rss_mib()
    head = post("/api/validate-yaml", "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n", b"",
                token=None)
    chunked = b"".join([b"%x\r\n" % MiB, b"a" * MiB, b"\r\n"])
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as connection:
        connection.sendall(head)
        sent = 0
        try:
            for _ in range(300):  # 300 MiB offered
                connection.sendall(chunked)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 300  # the server stopped reading long before
    assert served.peak_rss_mib() < before + 30
    status, _, _ = exchange(served.port, post("/api/validate-yaml", "Content-Length: 15\r\n", b'{"content": ""}',
                                              token=None))
    assert status == 200


def test_a_declared_body_over_the_limit_is_413_before_it_is_sent(served):
    head = post("/api/validate-yaml", f"Content-Length: {2 << 30}\r\n", b"")
    assert_json_error(exchange(served.port, head, timeout=10), 413)
    assert_still_serves(served.endpoint)


def test_a_commit_of_newlines_is_refused_cheaply(served):
    """100 MiB of newlines cost 1 GB and 10 s when the body was split in memory."""
    before = served.peak_rss_mib()
    body = b'{"key": "header", "value": {"summary": "s"}}\n' + b"\n" * (100 * MiB)
    started = time.monotonic()
    with httpx2.Client(timeout=120) as client:
        response = client.post(f"{served.endpoint}/api/datasets/org/target/commit/main", content=body,
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and "at most" in response.json()["error"]
    assert time.monotonic() - started < 20
    assert served.peak_rss_mib() < before + 30  # spooled to disk, read a line at a time
    assert_still_serves(served.endpoint)


def test_a_regular_file_above_the_lfs_threshold_is_refused(served):
    content = base64.b64encode(b"x" * (10 * MiB + 1)).decode()
    body = (b'{"key": "header", "value": {"summary": "s"}}\n'
            + json.dumps({"key": "file", "value": {"path": "huge.txt", "content": content}}).encode() + b"\n")
    with httpx2.Client(timeout=60) as client:
        response = client.post(f"{served.endpoint}/api/datasets/org/target/commit/main", content=body,
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and "LFS" in response.json()["error"]


# Ranges ------------------------------------------------------------------------------------------------


def test_ranges_are_exact_and_unsatisfiable_ones_416(served, tmp_path):
    url = f"{served.endpoint}/datasets/org/target/resolve/main"
    regular = Path(served.api().hf_hub_download("org/target", "regular.txt", repo_type="dataset",
                                                cache_dir=tmp_path)).read_bytes()
    with httpx2.Client() as client:
        one = client.get(f"{url}/regular.txt", headers={"Range": "bytes=4000000-4000000"})
        assert one.status_code == 206 and one.content == regular[4000000:4000001]
        assert one.headers["Content-Range"] == f"bytes 4000000-4000000/{len(regular)}"
        for header in ("bytes=-0", f"bytes={len(regular)}-", f"bytes={len(regular)}-{len(regular) + 5}"):
            refused = client.get(f"{url}/regular.txt", headers={"Range": header})
            assert refused.status_code == 416, header
            assert refused.headers["Content-Range"] == f"bytes */{len(regular)}"
            assert refused.json()["error"]
        assert client.get(f"{url}/regular.txt", headers={"Range": "bytes=5-2"}).status_code == 200  # ignored
        assert client.get(f"{url}/regular.txt", headers={"Range": "bytes=0-1,4-5"}).status_code == 200
    assert_still_serves(served.endpoint)


def test_parallel_range_reads_hold_no_whole_blob(served):
    """Four 1-byte ranges of a 5 MiB regular file, and 16 of a 64 MiB LFS file: no blob is held."""
    before = served.peak_rss_mib()
    url = f"{served.endpoint}/datasets/org/target/resolve/main"

    def read(args: tuple[str, int]) -> int:
        name, start = args
        with httpx2.Client(timeout=60) as client:
            response = client.get(f"{url}/{name}", headers={"Range": f"bytes={start}-"})
            assert response.status_code == 206
            return len(response.content)

    jobs = [("regular.txt", 5 * MiB - 1)] * 4 + [("big.bin", i * MiB) for i in range(16)]
    with ThreadPoolExecutor(20) as pool:
        sizes = list(pool.map(read, jobs))
    assert sizes[:4] == [1] * 4 and sizes[4:] == [(64 - i) * MiB for i in range(16)]
    assert served.peak_rss_mib() < before + 40
    assert_still_serves(served.endpoint)


# Ref names ---------------------------------------------------------------------------------------------


def test_names_that_are_full_commit_ids_are_refused(hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    first = hf_api.dataset_info(repo_id).sha
    hf_api.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id=repo_id, repo_type="dataset")
    for call in (lambda: hf_api.create_branch(repo_id, branch=first, repo_type="dataset"),
                 lambda: hf_api.create_tag(repo_id, tag=first, repo_type="dataset"),
                 lambda: hf_api.create_branch(repo_id, branch=first.upper(), repo_type="dataset")):
        with pytest.raises(Exception) as info:
            call()
        assert info.value.response.status_code == 400
        assert "shadow" in info.value.response.json()["error"]
    assert hf_api.dataset_info(repo_id, revision=first).sha == first


def test_a_full_commit_id_resolves_to_that_commit_even_if_a_ref_has_its_name(hf_api, hub_server, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    honest = hf_api.dataset_info(repo_id).sha
    other = hf_api.upload_file(path_or_fileobj=b"other", path_in_repo="a.txt", repo_id=repo_id,
                               repo_type="dataset").oid
    namespace, name = repo_id.split("/")
    git = hub_server.api.storage.open(RepoId("dataset", namespace, name)).git
    git.refs[f"refs/heads/{honest}".encode()] = other.encode()  # written behind the API's back
    assert hf_api.dataset_info(repo_id, revision=honest).sha == honest
    assert not hf_api.file_exists(repo_id, "a.txt", repo_type="dataset", revision=honest)


# YAML --------------------------------------------------------------------------------------------------

ALIAS_BOMB = "---\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(7)) + "---\n"
CARDS = {"alias bomb": ALIAS_BOMB, "cyclic alias": "---\na: &a [*a]\n---\n",
         "huge integer": "---\na: " + "9" * 5000 + "\n---\n", "nested": "---\na: " + "[" * 5000 + "\n---\n"}


@pytest.mark.parametrize("name", CARDS)
def test_bad_readme_metadata_is_refused_at_commit(hf_api, hub_server, repo_id, name):
    hf_api.create_repo(repo_id, repo_type="dataset")
    line = {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(CARDS[name].encode()).decode()}}
    body = b'{"key": "header", "value": {"summary": "s"}}\n' + json.dumps(line).encode() + b"\n"
    with httpx2.Client(timeout=60) as client:
        started = time.monotonic()
        response = client.post(f"{hub_server.endpoint}/api/datasets/{repo_id}/commit/main", content=body,
                               headers={"Authorization": f"Bearer {HUB_TOKEN}"})
        assert response.status_code == 400 and "README.md" in response.json()["error"]
        validated = client.post(f"{hub_server.endpoint}/api/validate-yaml", json={"content": CARDS[name]})
        assert validated.status_code == 400 and validated.json()["errors"][0]["message"]
    assert time.monotonic() - started < 5
    with pytest.raises(ValueError):
        hf_api.upload_file(path_or_fileobj=CARDS[name].encode(), path_in_repo="README.md", repo_id=repo_id,
                           repo_type="dataset")
    assert "README.md" not in hf_api.list_repo_files(repo_id, repo_type="dataset")


def test_a_bad_readme_committed_before_the_check_never_breaks_repo_info(hf_api, hub_server, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    namespace, name = repo_id.split("/")
    repo = hub_server.api.storage.open(RepoId("dataset", namespace, name))
    for card in (ALIAS_BOMB, CARDS["cyclic alias"]):
        repo.commit("main", [AddFile("README.md", repo.add_blob("README.md", card.encode()))], "old card", "", None,
                    "coopt")
        with httpx2.Client() as client:
            response = client.get(f"{hub_server.endpoint}/api/datasets/{repo_id}")
        assert response.status_code == 200 and len(response.content) < 10_000
        assert "cardData" not in response.json()


# Cost ---------------------------------------------------------------------------------------------------


def test_expanded_paths_info_walks_the_history_once(hf_api, hub_server, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    namespace, name = repo_id.split("/")
    repo = hub_server.api.storage.open(RepoId("dataset", namespace, name))
    repo.commit("main", [AddFile("a.txt", repo.add_blob("a.txt", b"a"))], "the one that adds a", "", None, "coopt")
    for i in range(200):
        repo.commit("main", [AddFile("b.txt", repo.add_blob("b.txt", str(i).encode()))], f"b {i}", "", None, "coopt")
    url = f"{hub_server.endpoint}/api/datasets/{repo_id}/paths-info/main"
    with httpx2.Client(timeout=60) as client:
        started = time.monotonic()
        response = client.post(url, data={"paths": ["a.txt"] * 200 + ["b.txt"], "expand": "true"})
        assert time.monotonic() - started < 3
        assert response.status_code == 200
        by_path = {entry["path"]: entry["lastCommit"]["title"] for entry in response.json()}
        assert by_path == {"a.txt": "the one that adds a", "b.txt": "b 199"}
        too_many = client.post(url, data={"paths": [f"p{i}" for i in range(1001)]})
        assert too_many.status_code == 400 and "at most 1000" in too_many.json()["error"]
    tree = list(hf_api.list_repo_tree(repo_id, repo_type="dataset", expand=True))
    assert {entry.path: entry.last_commit.title for entry in tree}["a.txt"] == "the one that adds a"


def test_long_listings_come_in_linked_pages(hf_api, hub_server, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    namespace, name = repo_id.split("/")
    repo = hub_server.api.storage.open(RepoId("dataset", namespace, name))
    repo.commit("main", [AddFile(f"f/{i:03d}.txt", repo.add_blob("x", str(i).encode())) for i in range(120)],
                "many", "", None, "coopt")
    with httpx2.Client() as client:
        first = client.get(f"{hub_server.endpoint}/api/datasets/{repo_id}/tree/main/f", params={"expand": "true"})
    assert len(first.json()) == 50 and 'rel="next"' in first.headers["Link"]
    assert first.headers["Link"].startswith(f"<{hub_server.endpoint}/api/datasets/{repo_id}/tree/main/f?")
    expanded = list(hf_api.list_repo_tree(repo_id, "f", repo_type="dataset", expand=True))
    assert [entry.path for entry in expanded] == [f"f/{i:03d}.txt" for i in range(120)]


# Malformed input --------------------------------------------------------------------------------------

MALFORMED = {
    "5000-digit integer": ("/api/repos/create", b'{"name": ' + b"9" * 5000 + b"}"),
    "lone surrogate in a tag": ("/api/datasets/{repo}/tag/main", b'{"tag": "v\\ud800"}'),
    "lone surrogate in a branch start": ("/api/datasets/{repo}/branch/b", b'{"startingPoint": "\\udc80"}'),
    "lone surrogate in a summary": ("/api/datasets/{repo}/commit/main",
                                    b'{"key": "header", "value": {"summary": "s\\ud800"}}\n'),
    "lone surrogate in a path": ("/api/datasets/{repo}/preupload/main",
                                 b'{"files": [{"path": "a\\udfff.txt", "size": 1, "sample": ""}]}'),
    "path 990 folders deep": ("/api/datasets/{repo}/commit/main", b'{"key": "header", "value": {"summary": "s"}}\n'
                              + json.dumps({"key": "file", "value": {"path": "a/" * 990 + "f", "content": ""}}).encode()),
    "5000-digit LFS size": ("/datasets/{repo}.git/info/lfs/objects/batch",
                            b'{"operation": "upload", "objects": [{"oid": "' + b"a" * 64 + b'", "size": '
                            + b"9" * 5000 + b"}]}"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_input_is_400_json(hf_api, hub_server, repo_id, name):
    hf_api.create_repo(repo_id, repo_type="dataset")
    path, body = MALFORMED[name]
    with httpx2.Client() as client:
        response = client.post(hub_server.endpoint + path.format(repo=repo_id), content=body,
                               headers={"Authorization": f"Bearer {HUB_TOKEN}"})
        assert response.status_code == 400, response.text[:300]
        assert response.json()["error"] and response.headers["X-Error-Code"]
        assert client.get(f"{hub_server.endpoint}/api/datasets/{repo_id}").status_code == 200


def test_non_ascii_upload_signatures_are_refused(hub_server, hf_api, repo_id):
    hf_api.create_repo(repo_id, repo_type="dataset")
    base = f"{hub_server.endpoint}/datasets/{repo_id}.git/info/lfs/objects/{'a' * 64}"
    with httpx2.Client() as client:
        for query in ("size=3&expires=%C2%B2&sig=00", "size=3&expires=99999999999&sig=%C3%A9%C3%A9",
                      "size=%C2%B2&expires=99999999999&sig=00"):
            response = client.put(f"{base}?{query}", content=b"abc")
            assert response.status_code in (400, 403) and response.json()["error"], query


# Connections -----------------------------------------------------------------------------------------------


def test_half_open_connections_cost_no_thread_and_are_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(HubProtocol, "header_timeout_s", 1.0)
    with HubServer(tmp_path / "root", tokens=["t"]) as hub:
        threads_before = threading.active_count()
        stalled = []
        for i in range(300):
            connection = socket.create_connection(("127.0.0.1", hub.port))
            connection.sendall(b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
            stalled.append(connection)
        assert threading.active_count() <= threads_before + 2
        with httpx2.Client() as client:  # served meanwhile
            assert client.get(f"{hub.endpoint}/api/whoami-v2", headers={"Authorization": "Bearer t"}).status_code == 200
        time.sleep(2.5)
        for connection in stalled:
            connection.settimeout(5)
            assert connection.recv(10) == b""  # closed by the server
            connection.close()


def test_a_trickled_request_is_dropped_at_the_header_deadline(tmp_path, monkeypatch):
    monkeypatch.setattr(HubProtocol, "header_timeout_s", 1.5)
    with HubServer(tmp_path / "root", tokens=["t"]) as hub:
        with socket.create_connection(("127.0.0.1", hub.port), timeout=10) as connection:
            started = time.monotonic()
            try:
                for byte in b"GET /api/whoami-v2 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    connection.sendall(bytes([byte]))
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert time.monotonic() - started < 4  # one byte per 0.1 s never resets the deadline


# File modes and links ----------------------------------------------------------------------------------


def test_the_root_is_private_to_the_server_user(served):
    assert stat.S_IMODE(served.root.stat().st_mode) == 0o700
    loose = [path for path in served.root.rglob("*") if stat.S_IMODE(path.stat().st_mode) & 0o077]
    assert loose == []


def test_links_use_the_public_url_never_the_host_header(tmp_path):
    with HubServer(tmp_path / "root", tokens=["t"], public_url="https://hub.example.org/") as hub:
        assert hub.endpoint == "https://hub.example.org"
        headers = {"Authorization": "Bearer t", "Host": "evil.example"}
        with httpx2.Client(base_url=f"http://127.0.0.1:{hub.port}", headers=headers) as client:
            created = client.post("/api/repos/create", json={"name": "ds", "organization": "org", "type": "dataset"})
            assert created.json()["url"] == "https://hub.example.org/datasets/org/ds"
            commit = client.post("/api/datasets/org/ds/commit/main",
                                 content=b'{"key": "header", "value": {"summary": "s"}}\n')
            assert commit.json()["commitUrl"].startswith("https://hub.example.org/datasets/org/ds/commit/")
            oid = hashlib.sha256(b"abc").hexdigest()
            batch = client.post("/datasets/org/ds.git/info/lfs/objects/batch",
                                json={"operation": "upload", "objects": [{"oid": oid, "size": 3}]})
            assert batch.json()["objects"][0]["actions"]["upload"]["href"].startswith("https://hub.example.org/")
    with HubServer(tmp_path / "other", tokens=["t"]) as hub:
        with httpx2.Client(headers={"Authorization": "Bearer t", "Host": "evil.example"}) as client:
            created = client.post(f"{hub.endpoint}/api/repos/create", json={"name": "ds", "organization": "org"})
        assert created.json()["url"] == f"{hub.endpoint}/org/ds"
