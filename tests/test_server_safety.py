"""Bad input gets a 4xx with a message, never a traceback, never a write; the server keeps serving."""

from __future__ import annotations

import base64
import http.client
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

import pytest
from huggingface_hub import HfApi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coopt_hub.server import HubServer
from tests.conftest import HUB_TOKEN


def raw(endpoint: str, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
        token: str | None = HUB_TOKEN, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with the path sent byte for byte (no client-side normalisation of `..`)."""
    url = urlparse(endpoint)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    all_headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
    chunked = body is not None and not isinstance(body, bytes)
    connection.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, dict(response.headers), data


def ndjson(*items: dict) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


def file_line(path: str, content: bytes = b"x") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}


HEADER = {"key": "header", "value": {"summary": "attack"}}


@pytest.fixture
def dataset(hf_api, repo_id) -> str:
    hf_api.create_repo(repo_id, repo_type="dataset")
    return repo_id


def assert_clean_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> None:
    assert status == expected, body
    message = json.loads(body)["error"]
    assert message and "Traceback" not in message
    assert headers["X-Error-Message"]


@pytest.mark.parametrize("path", ["../../escape.txt", "a/../../escape.txt", "/abs.txt", ".git/config",
                                  "x/.GIT/hooks/post", "a//b", "./a", "back\\slash", "nul\x00.txt", ""])
def test_bad_paths_in_commits_are_refused(hub_server, dataset, path):
    status, headers, body = raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/commit/main",
                                ndjson(HEADER, file_line(path)), headers={"Content-Type": "application/x-ndjson"})
    assert_clean_error(status, headers, body, 400 if path == "" else 422)  # 422: well formed, not allowed


def test_nothing_is_written_outside_the_root(hub_server, dataset, hf_api):
    outside = hub_server.root.parent
    before = sorted(p.name for p in outside.iterdir())
    for path in ("../../../escape.txt", "../escape.txt"):
        raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/commit/main", ndjson(HEADER, file_line(path)))
        raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/preupload/main",
            json.dumps({"files": [{"path": path, "size": 1, "sample": ""}]}).encode())
    raw(hub_server.endpoint, "POST", f"/datasets/{dataset}/resolve/main/../../../../escape.txt")
    raw(hub_server.endpoint, "POST", "/api/repos/create", json.dumps({"name": "..", "organization": ".."}).encode())
    raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/branch/..%2F..%2Fescape", b"{}")
    raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/tag/main", json.dumps({"tag": "../../x"}).encode())
    assert sorted(p.name for p in outside.iterdir()) == before
    assert not list(hub_server.root.rglob("escape*"))
    assert hf_api.list_repo_files(dataset, repo_type="dataset") == [".gitattributes"]


@pytest.mark.parametrize("path", [
    "/datasets/{repo}/resolve/main/../../../etc/passwd",
    "/datasets/{repo}/resolve/main/%2E%2E/%2E%2E/etc/passwd",
    "/datasets/{repo}/resolve/main/.git/config",
    "/api/datasets/{repo}/tree/main/..%2F..",
    "/api/datasets/{repo}/revision/..%2F..%2Fconfig",
    "/api/datasets/{repo}/revision/refs%2Fheads%2F..%2F..%2Fconfig",
])
def test_traversal_in_reads_finds_nothing(hub_server, dataset, path):
    status, headers, body = raw(hub_server.endpoint, "GET", path.format(repo=dataset))
    assert 400 <= status < 500
    assert b"root:" not in body and b"[core]" not in body


@pytest.mark.parametrize("payload, fragment", [
    (b"not json at all\n", "not valid JSON"),
    (b'{"key": "header"}\n', "must be"),
    (ndjson(file_line("a.txt")), "first line"),
    (ndjson({"key": "header", "value": {"summary": ""}}), "summary"),
    (ndjson(HEADER, {"key": "file", "value": {"path": "a.txt", "content": "%%%", "encoding": "base64"}}), "base64"),
    (ndjson(HEADER, {"key": "lfsFile", "value": {"path": "a.bin", "algo": "sha256", "oid": "abc", "size": 1}}),
     "sha256"),
    (ndjson(HEADER, {"key": "lfsFile", "value": {"path": "a.bin", "algo": "sha256", "oid": "a" * 64, "size": 3}}),
     "not uploaded"),
    (ndjson(HEADER, {"key": "copyFile", "value": {"path": "a.txt"}}), "Unknown commit operation"),
    (ndjson({"key": "header", "value": {"summary": "s", "parentCommit": "short"}}), "parentCommit"),
    (b"", "Empty commit"),
])
def test_malformed_commits_are_400_and_change_nothing(hub_server, hf_api, dataset, payload, fragment):
    before = hf_api.dataset_info(dataset).sha
    status, headers, body = raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/commit/main", payload)
    assert_clean_error(status, headers, body, 400)
    assert fragment in json.loads(body)["error"]
    assert hf_api.dataset_info(dataset).sha == before


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/repos/create", b"{not json"),
    ("POST", "/api/repos/create", b"[1, 2]"),
    ("POST", "/api/repos/create", json.dumps({"name": "x", "organization": "org", "type": "kernel"}).encode()),
    ("POST", "/api/repos/create", json.dumps({"name": "has space", "organization": "org"}).encode()),
    ("POST", "/api/repos/create", json.dumps({"name": "a--b", "organization": "org"}).encode()),
    ("POST", "/api/repos/create", json.dumps({"name": 5, "organization": "org"}).encode()),
    ("POST", "/api/repos/create", json.dumps({"name": "x", "organization": "org", "type": {"a": 1}}).encode()),
    ("POST", "/api/validate-yaml", b"\xff\xfe"),
    ("POST", "/api/datasets/{repo}/preupload/main", b'{"files": "nope"}'),
    ("POST", "/api/datasets/{repo}/preupload/main", b'{"files": [{"path": "a", "size": -1, "sample": ""}]}'),
    ("POST", "/api/datasets/{repo}/branch/bad%20name", b"{}"),
    ("POST", "/api/datasets/{repo}/tag/main", b'{"tag": "a..b"}'),
    ("POST", "/datasets/{repo}.git/info/lfs/objects/batch", b'{"operation": "download", "objects": []}'),
])
def test_malformed_requests_are_400(hub_server, dataset, method, path, body):
    status, headers, data = raw(hub_server.endpoint, method, path.format(repo=dataset), body)
    assert_clean_error(status, headers, data, 400)


@pytest.mark.parametrize("method, path", [("GET", "/api/kernels/org/x"), ("GET", "/api/datasets/org"),
                                          ("GET", "/nothing/here"), ("GET", "/api/unknown"),
                                          ("PATCH", "/api/repos/create"), ("OPTIONS", "/api/whoami-v2")])
def test_unknown_routes_are_404(hub_server, method, path):
    status, headers, body = raw(hub_server.endpoint, method, path)
    assert_clean_error(status, headers, body, 404)


def test_oversize_bodies_are_413_and_the_server_keeps_serving(tmp_path):
    with HubServer(tmp_path / "root", tokens=["t"], max_body_bytes=10_000) as hub:
        api = HfApi(endpoint=hub.endpoint, token="t")
        api.create_repo("org/small", repo_type="dataset")
        payload = ndjson(HEADER, file_line("big.txt", os.urandom(20_000)))
        status, headers, body = raw(hub.endpoint, "POST", "/api/datasets/org/small/commit/main", payload, token="t")
        assert_clean_error(status, headers, body, 413)
        chunked = raw(hub.endpoint, "POST", "/api/datasets/org/small/commit/main", iter([payload]), token="t",
                      headers={"Transfer-Encoding": "chunked"})
        assert chunked[0] == 413
        assert api.list_repo_files("org/small", repo_type="dataset") == [".gitattributes"]
        api.upload_file(path_or_fileobj=b"fine", path_in_repo="ok.txt", repo_id="org/small", repo_type="dataset")


def test_lfs_upload_urls_are_signed(hub_server, dataset, hf_api):
    oid = "b" * 64
    status, _, _ = raw(hub_server.endpoint, "PUT", f"/datasets/{dataset}.git/info/lfs/objects/{oid}?size=3", b"abc")
    assert status == 403
    status, _, body = raw(hub_server.endpoint, "POST", f"/datasets/{dataset}.git/info/lfs/objects/batch",
                          json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": 3}]}).encode())
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    put_path = href[len(hub_server.endpoint):]
    status, _, body = raw(hub_server.endpoint, "PUT", put_path, b"abc", token=None)
    assert status == 400 and b"does not match" in body  # right size, wrong content: refused, not stored
    status, _, _ = raw(hub_server.endpoint, "PUT", put_path.replace(oid, "c" * 64), b"abc", token=None)
    assert status == 403
    assert not list(hub_server.root.rglob(oid))


def test_a_spooled_body_is_hashed_as_it_arrives_across_the_spill_to_disk(tmp_path):
    """An LFS upload is checked against its oid by the digest taken as its bytes arrived (no read-back)."""
    from coopt_hub.server.http import Body

    body, chunks = Body(tmp_path), [b"a" * 700_000, b"b" * 700_000, b"c"]  # spills past 1 MiB
    for chunk in chunks:
        body.write(chunk)
    assert body.sha256() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert body.on_disk().read_bytes() == b"".join(chunks), "the spooled file is not what was hashed"
    body.discard()


def test_lfs_batch_needs_a_token(hub_server, dataset):
    status, headers, body = raw(hub_server.endpoint, "POST", f"/datasets/{dataset}.git/info/lfs/objects/batch",
                                json.dumps({"operation": "upload", "objects": []}).encode(), token=None)
    assert_clean_error(status, headers, body, 401)


def test_tokens_never_reach_logs_or_messages(hub_server, dataset, caplog):
    caplog.set_level(logging.DEBUG, logger="coopt_hub.server")
    secret = "hf_secret_value_that_must_not_leak"
    status, headers, body = raw(hub_server.endpoint, "GET", f"/api/datasets/{dataset}", token=secret)
    assert status == 401 and headers["X-Error-Code"]
    raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/commit/main", b"garbage", token=secret)
    raw(hub_server.endpoint, "POST", f"/api/datasets/{dataset}/commit/main", b"garbage")
    assert secret not in caplog.text and HUB_TOKEN not in caplog.text
    assert secret.encode() not in body and secret not in str(headers)


def test_server_survives_a_flood_of_bad_requests(hub_server, dataset, hf_api):
    hf_api.upload_file(path_or_fileobj=b"abc", path_in_repo="a.txt", repo_id=dataset, repo_type="dataset")
    for headers in ({"Range": "bytes=" + "9" * 5000 + "-"}, {"Range": "bytes=2-1"}, {"Range": "pages=1-2"},
                    {"Content-Length": "9" * 5000}, {"Content-Length": "-1"}):
        status, _, _ = raw(hub_server.endpoint, "GET", f"/datasets/{dataset}/resolve/main/a.txt", headers=headers)
        assert status in (200, 206, 400, 416)
    for path in ("/%7F", "/api/datasets/%ZZ/x", "//", "/api/datasets/a/b/c/d/e/f", "/datasets/x/y/resolve"):
        status, _, _ = raw(hub_server.endpoint, "GET", path)
        assert 400 <= status < 500
    url = urlparse(hub_server.endpoint)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    connection.putrequest("POST", f"/api/datasets/{dataset}/commit/main")
    connection.putheader("Content-Length", "1000")
    connection.endheaders(b"partial")
    connection.close()  # the client vanishes mid-body
    assert hf_api.dataset_info(dataset).id == dataset


def test_stale_locks_from_a_crashed_writer_do_not_block(hub_server, dataset, hf_api):
    repo_dir = Path(hub_server.root, "repos", "datasets", f"{dataset}.git")
    (repo_dir / "refs" / "heads" / "main.lock").write_text("crashed")
    hf_api.upload_file(path_or_fileobj=b"after crash", path_in_repo="a.txt", repo_id=dataset, repo_type="dataset")
    assert "a.txt" in hf_api.list_repo_files(dataset, repo_type="dataset")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
ENDPOINTS = [
    ("POST", "/api/repos/create", ["name", "organization", "type", "visibility", "private"]),
    ("POST", "/api/datasets/{repo}/preupload/main", ["files", "gitIgnore"]),
    ("POST", "/api/datasets/{repo}/branch/fuzz", ["startingPoint", "emptyBranch"]),
    ("POST", "/api/datasets/{repo}/tag/main", ["tag", "message"]),
    ("POST", "/datasets/{repo}.git/info/lfs/objects/batch", ["operation", "objects", "hash_algo"]),
    ("PUT", "/api/datasets/{repo}/settings", ["private", "visibility", "gated"]),
    ("POST", "/api/validate-yaml", ["content", "repoType"]),
    ("POST", "/api/datasets/{repo}/commit/main", ["key", "value"]),
]


@pytest.fixture(scope="module")
def fuzz_repo(hub_server) -> str:
    repo = f"org/fuzz-{uuid.uuid4().hex[:12]}"
    HfApi().create_repo(repo, repo_type="dataset")
    return repo


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), data=st.data())
def test_any_json_gets_an_answer_below_500(hub_server, fuzz_repo, endpoint, data):
    method, path, keys = endpoint
    body = data.draw(st.fixed_dictionaries({}, optional={key: json_values for key in keys}))
    status, _, _ = raw(hub_server.endpoint, method, path.format(repo=fuzz_repo), json.dumps(body).encode())
    assert status < 500


def test_upload_urls_signed_before_a_restart_stay_valid(tmp_path):
    """A client that got its LFS upload URL just before the server restarted can still PUT to it."""
    import stat

    from coopt_hub.server import HubServer
    from coopt_hub.server.app import URL_KEY_FILE

    first = HubServer(tmp_path / "hub", tokens=["t"])
    expires, signature = first.api.auth.sign("datasets/org/x", "a" * 64)
    restarted = HubServer(tmp_path / "hub", tokens=["t"])
    restarted.api.auth.check_signature(str(expires), signature, "datasets/org/x", "a" * 64)
    assert stat.S_IMODE((tmp_path / "hub" / URL_KEY_FILE).stat().st_mode) == 0o600
    elsewhere = HubServer(tmp_path / "other", tokens=["t"])
    with pytest.raises(Exception, match="signature"):
        elsewhere.api.auth.check_signature(str(expires), signature, "datasets/org/x", "a" * 64)
