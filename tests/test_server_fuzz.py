"""Fuzzing the server with raw HTTP: random methods, paths in odd encodings, headers and bodies.

Whatever arrives, the server answers below 500 with no traceback, never echoes a token, never
shows a private repo to a caller without a valid token, writes nothing outside its root, leaves
every repo whole, and keeps serving. Requests go out as raw bytes over a socket, so nothing on the
client side tidies them up. Example counts are fixed and the examples derandomized, so every run
sends the same requests (RELIABILITY.md counts them).

test_server_safety.py holds the targeted bad-input cases and the JSON-body property; this file
covers the request line, the headers and the routing around them.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from huggingface_hub import HfApi
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_faults import assert_whole

from coopt_hub.server import HubServer

TOKEN = "fuzz-write-token-5e1f0c"
WRONG_TOKEN = "hf_fuzz_wrong_token_93ab"
SECRET = b"fuzz-private-secret-7c2a91"
MARK = "fuzzmark"  # in names the fuzzer makes up, to find anything written where it must not be
OPEN, CLOSED = "org/open", "org/closed"
FUZZ_EXAMPLES = {"structured requests": 400, "raw request bytes": 150, "commit payloads": 150}


@dataclass
class Box:
    server: HubServer
    folder: Path  # holds the server's root and nothing else


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """A server of its own on a root alone in its folder, with a public and a private repo."""
    folder = tmp_path_factory.mktemp("fuzz-box")
    server = HubServer(folder / "root", tokens=[TOKEN]).start()
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    api.create_repo(OPEN, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"open text", path_in_repo="a.txt", repo_id=OPEN, repo_type="dataset")
    api.create_repo(CLOSED, repo_type="dataset", private=True)
    for name in ("secret.txt", "secret.bin"):  # a plain file and an LFS one
        api.upload_file(path_or_fileobj=SECRET, path_in_repo=name, repo_id=CLOSED, repo_type="dataset")
    yield Box(server, folder)
    server.stop()


@pytest.fixture
def server_log(caplog):
    caplog.set_level(logging.DEBUG, logger="coopt_hub.server")
    return caplog


@pytest.fixture
def crashes(capfd):
    """What the server's threads printed: socketserver prints the traceback of an exception that
    escaped a request handler, which the client only sees as a dropped connection."""
    return lambda: [line for line in capfd.readouterr().err.splitlines() if "Traceback" in line]


# Sending raw bytes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: no status line (http.server answers an unparseable request line that way)
    head: bytes
    body: bytes


def exchange(port: int, raw: bytes) -> Answer:
    """Send `raw`, close our side (so a body announced longer than sent ends), read the whole answer."""
    received = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        try:
            connection.sendall(raw)
            connection.shutdown(socket.SHUT_WR)
            while block := connection.recv(65536):
                received.append(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading everything: what it sent still counts
    answer = b"".join(received)
    while re.match(rb"HTTP/1\.[01] 1\d\d ", answer):  # an interim answer (100 Continue) precedes the real one
        answer = answer.partition(b"\r\n\r\n")[2]
    head, _, body = answer.partition(b"\r\n\r\n")
    status = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    return Answer(int(status[1]) if status else None, head, body if status else answer)


def request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes,
                  declared: int | None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if declared is not None:
        lines.append(f"Content-Length: {declared}")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


def authorized(headers: list[tuple[str, str]]) -> bool:
    values = [value for name, value in headers if name.lower() == "authorization"]
    if len(values) != 1:
        return False
    scheme, _, token = values[0].partition(" ")
    return scheme.lower() == "bearer" and token.strip() == TOKEN


def assert_sound(answer: Answer, raw: bytes, sent_headers: list[tuple[str, str]], names_private: bool) -> None:
    # --hypothesis-show-statistics shows what the examples reached.
    event(f"answered {answer.status or ('without a status line' if answer.body else 'nothing')}")
    everything = answer.head + answer.body
    assert answer.status is None or answer.status < 500, (raw[:300], answer.body[:500])
    assert b"Traceback" not in everything and b'File "' not in everything, answer.body[:500]
    assert TOKEN.encode() not in everything and WRONG_TOKEN.encode() not in everything
    if not authorized(sent_headers):
        assert SECRET not in everything, raw[:300]
        if names_private:
            assert answer.status is None or not 200 <= answer.status < 300, (raw[:300], answer.body[:300])


# Strategies ------------------------------------------------------------------------------------------

ODD_SEGMENTS = ["..", ".", "%2e%2e", "%2E%2E%2F%2E%2E", "..%2f..%2f..%2fetc%2fpasswd", "%00", "a%00b", "%ff%fe",
                "%", "%zz", "%25", "~", ".git", ".GIT", "HEAD", "refs%2Fheads%2Fmain", "refs/pr/1", "\u00fc\u00f1",
                "%C3%BC", "a" * 300, "main", "v1", "0" * 40, "shard%2F0", "CON", "a;b", "*", "''", MARK]
odd_segment = st.sampled_from(ODD_SEGMENTS) | st.text(max_size=12).map(lambda text: quote(text, safe=""))
known_repos = st.sampled_from([OPEN] * 3 + [CLOSED] * 3 + ["org/missing", "org/..", "../..", "org%2Fclosed",
                                                           "ORG/CLOSED", "org/closed.git", "org//closed",
                                                           "%2e%2e/%2e%2e", f"org/{MARK}"])
repo_name = known_repos | known_repos | st.builds("{}/{}".format, odd_segment, odd_segment)
revision = st.just("main") | st.just("main") | odd_segment
# Each route with the method it serves; the fuzzer mostly keeps that method, so examples get past the router.
ROUTES = [
    ("GET", "/api/datasets/{repo}"), ("GET", "/api/datasets/{repo}/revision/{rev}"),
    ("GET", "/api/datasets/{repo}/tree/{rev}/{path}"), ("GET", "/api/datasets/{repo}/refs"),
    ("GET", "/api/datasets/{repo}/commits/{rev}"), ("POST", "/api/datasets/{repo}/paths-info/{rev}"),
    ("POST", "/api/datasets/{repo}/preupload/{rev}"), ("POST", "/api/datasets/{repo}/commit/{rev}"),
    ("POST", "/api/datasets/{repo}/branch/{rev}"), ("DELETE", "/api/datasets/{repo}/branch/{rev}"),
    ("POST", "/api/datasets/{repo}/tag/{rev}"), ("DELETE", "/api/datasets/{repo}/tag/{rev}"),
    ("PUT", "/api/datasets/{repo}/settings"), ("GET", "/datasets/{repo}/resolve/{rev}/{path}"),
    ("HEAD", "/datasets/{repo}/resolve/{rev}/{path}"), ("POST", "/datasets/{repo}.git/info/lfs/objects/batch"),
    ("PUT", "/datasets/{repo}.git/info/lfs/objects/{oid}"),
    ("POST", "/datasets/{repo}.git/info/lfs/objects/{oid}/verify"),
    ("GET", "/{repo}/resolve/{rev}/{path}"), ("GET", "/api/models/{repo}"), ("GET", "/api/spaces/{repo}"),
    ("POST", "/api/repos/create"), ("DELETE", "/api/repos/delete"), ("GET", "/api/whoami-v2"),
    ("POST", "/api/validate-yaml"), ("GET", "/"), ("GET", "//"), ("GET", "/api/datasets"), ("GET", "/{path}"),
]
FILE_PATHS = ["a.txt", "secret.txt", "secret.bin", "../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", ".git/config",
              "..%5c..%5cwin.ini", f"{MARK}/x.txt", "a%00b", "dir/", "%2F", "a" * 300]
QUERIES = ["", "?recursive=1&expand=true", "?blobs=1", "?size=3&expires=99999999999&sig=00", "?size=-1",
           "?create_pr=1", "?%ff=%fe", "?a=" + "b" * 500, "?&&&==", "?include_prs=1"]
# Repeats weigh the draw toward what clients send, without losing the odd ones.
METHODS = ["GET"] * 4 + ["POST"] * 4 + ["PUT", "HEAD", "DELETE"] * 2 + ["PATCH", "OPTIONS", "TRACE", "CONNECT",
                                                                       "PROPFIND", "get", "BREW"]
AUTHORIZATION = [None] * 4 + [f"Bearer {TOKEN}"] * 6 + [f"bearer {TOKEN} ", f"Bearer {WRONG_TOKEN}", "Bearer",
                                                        "Bearer ", "Basic dXNlcjpwYXNz", f"Token {TOKEN}", "\u00fc"]
EXTRA_HEADERS = st.lists(st.sampled_from([
    ("Range", "bytes=0-0"), ("Range", "bytes=-5"), ("Range", "bytes=9999999999-"), ("Range", "bytes=a-b"),
    ("Range", "bytes=0-0,2-3"), ("Content-Type", "application/json"), ("Content-Type", "application/x-ndjson"),
    ("Content-Type", "application/x-www-form-urlencoded"), ("Content-Type", "\u00ff/\u00fe"), ("Host", "evil.example"),
    ("Host", ""), ("Host", "a:b:c"), ("Transfer-Encoding", "gzip"), ("Expect", "100-continue"),
    ("X-Forwarded-For", "127.0.0.1"), ("Accept-Encoding", "br"), ("Cookie", "a=" + "b" * 2000),
]), max_size=4)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10) | odd_segment,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.lists(json_values, max_size=4).map(lambda items: b"\n".join(json.dumps(i).encode() for i in items)),
    st.builds(lambda path: json.dumps({"files": [{"path": path, "size": 3, "sample": ""}]}).encode(), odd_segment),
)


@st.composite
def structured_requests(draw) -> tuple[bytes, list[tuple[str, str]], bool]:
    authorization = draw(st.sampled_from(AUTHORIZATION))
    headers = ([("Authorization", authorization)] if authorization is not None else []) + draw(EXTRA_HEADERS)
    # Writes with the valid token stay off the private repo, so that its privacy is a property to check.
    repos = repo_name.filter(lambda name: "closed" not in unquote(name).lower()) if authorized(headers) else repo_name
    method, route = draw(st.sampled_from(ROUTES))
    target = route.format(
        repo=draw(repos), rev=draw(revision), path=draw(st.sampled_from(FILE_PATHS) | odd_segment),
        oid=draw(st.sampled_from(["a" * 64, "A" * 64, "0" * 63, "g" * 64]) | odd_segment),
    ) + draw(st.sampled_from(QUERIES))
    body = draw(bodies)
    declared = draw(st.sampled_from([len(body), len(body), len(body) + 7, 0]))  # + 7: announced, never sent
    raw = request_bytes(draw(st.sampled_from([method] * len(METHODS) + METHODS)), target, headers, body, declared)
    return raw, headers, "closed" in unquote(unquote(target)).lower()


FUZZ_SETTINGS = dict(deadline=None, database=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=FUZZ_EXAMPLES["structured requests"], **FUZZ_SETTINGS)
@given(request=structured_requests())
def test_structured_requests_get_sound_answers(box, server_log, crashes, request):
    raw, headers, names_private = request
    assert_sound(exchange(box.server.port, raw), raw, headers, names_private)
    assert TOKEN not in server_log.text and WRONG_TOKEN not in server_log.text
    assert not crashes(), raw[:300]


raw_lines = st.one_of(
    st.binary(min_size=1, max_size=200),
    st.builds(lambda method, target, version: f"{method} {target} {version}".encode("utf-8", "surrogateescape"),
              st.text(min_size=1, max_size=10), st.text(max_size=40),
              st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.x", "HTTP/", "FOO", "", "HTTP/1.1 extra"])),
)


@settings(max_examples=FUZZ_EXAMPLES["raw request bytes"], **FUZZ_SETTINGS)
@given(line=raw_lines, headers=st.lists(st.binary(max_size=60), max_size=5))
def test_raw_request_bytes_get_sound_answers(box, server_log, crashes, line, headers):
    # HTTP/2 and later request lines are left out: for those http.server's 505 is the right answer.
    raw = b"\r\n".join([line.replace(b"HTTP/2", b"HTTP/x").replace(b"HTTP/3", b"HTTP/x"), *headers]) + b"\r\n\r\n"
    assert_sound(exchange(box.server.port, raw), raw, [], names_private=b"closed" in raw.lower())
    assert TOKEN not in server_log.text
    assert not crashes(), raw[:300]


commit_lines = st.fixed_dictionaries({"key": st.sampled_from(["file", "lfsFile", "deletedFile", "deletedFolder",
                                                              "header", "copyFile", "x"]),
                                      "value": st.fixed_dictionaries({}, optional={
                                          "path": st.sampled_from(FILE_PATHS) | odd_segment,
                                          "content": st.sampled_from(["YWJj", "", "%%", "YWJj" * 50]),
                                          "encoding": st.sampled_from(["base64", "utf-8", ""]),
                                          "oid": st.sampled_from(["a" * 64, "0" * 64, "zz"]),
                                          "size": st.sampled_from([0, 3, -1, 10**20, "3"]),
                                          "summary": st.sampled_from(["s", "", " "]),
                                          "parentCommit": st.sampled_from(["a" * 40, None, 5])})})


@settings(max_examples=FUZZ_EXAMPLES["commit payloads"], **FUZZ_SETTINGS)
@given(lines=st.lists(commit_lines, max_size=5), header_first=st.booleans())
def test_commit_payloads_never_leave_a_partial_commit(box, crashes, lines, header_first):
    header = [{"key": "header", "value": {"summary": f"{MARK} commit"}}] if header_first else []
    body = b"\n".join(json.dumps(line).encode() for line in header + lines) + b"\n"
    raw = request_bytes("POST", f"/api/datasets/{OPEN}/commit/main", [("Authorization", f"Bearer {TOKEN}")], body,
                        len(body))
    answer = exchange(box.server.port, raw)
    assert answer.status is not None and answer.status < 500, answer.body[:500]
    assert b"Traceback" not in answer.body and not crashes()


def test_after_the_fuzzing_the_root_holds_everything_and_the_server_serves(box):
    """Runs after the properties above (file order): nothing escaped, every repo is whole, reads work."""
    assert [path.name for path in box.folder.iterdir()] == ["root"]
    root = box.folder / "root"
    escaped = [path for path in box.folder.parent.glob(f"*{MARK}*")] + list(Path("/tmp").glob(f"{MARK}*"))
    assert not escaped
    for repo_dir in (root / "repos").glob("*/*/*.git"):
        if repo_dir.parts[-3] == "datasets":
            assert_whole(root, f"{repo_dir.parent.name}/{repo_dir.name[:-4]}")
    api = HfApi(endpoint=box.server.endpoint, token=TOKEN)
    assert api.dataset_info(CLOSED).private
    assert Path(api.hf_hub_download(CLOSED, "secret.bin", repo_type="dataset", cache_dir=box.folder.parent / "cache")
                ).read_bytes() == SECRET
    assert api.dataset_info(OPEN).id == OPEN
