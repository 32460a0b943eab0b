"""Faults survived, nothing lost: kill -9 at every stage of `optimize` and `merge`, a hub killed and
started again mid-upload and mid-commit, connections cut mid-body, pushes racing a merge.

Every fault is real. The participant and the merge run as `coopt-hub` processes that kill themselves
at a named point (COOPT_HUB_FAULT, see coopt_hub/faults.py) or are killed by a proxy that watches
their traffic; the hub runs as a `coopt-hub hub serve` process killed with SIGKILL and started again
on the same root and port; connections are cut by that proxy in the middle of a request body or
after the hub has answered. RELIABILITY.md counts the tables of this file (see
test_bad_inputs.py::test_reliability_report_matches_the_tables).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers_hub import FakePrior, start_collaboration
from PIL import Image

from coopt_hub.core import faults
from coopt_hub.core.layout import MANIFEST_PATH, TARGETS_PATH, remote_paths, shard_branch
from coopt_hub.errors import CoOptError
from coopt_hub.hub.client import Hub, RetryPolicy, is_transient
from coopt_hub.participant.job import optimize_shard
from coopt_hub.participant.labeling import ChunkStore
from coopt_hub.participant.push import publish_result
from coopt_hub.participant.workdir import run_directory
from coopt_hub.platform.merge.run import merge
from coopt_hub.priors import Preprocessing, Prior, PriorSpec

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent
PIXEL_MODEL = "pixel-net"
SHARD = 0

# The routes a fault strikes on, as the hub sees them.
LFS_UPLOAD = r"/info/lfs/objects/[0-9a-f]{64}\?"
COMMIT = r"^/api/datasets/[^/]+/[^/]+/commit/"
PREUPLOAD = r"^/api/datasets/[^/]+/[^/]+/preupload/"
REPORT_DOWNLOAD = r"/resolve/[^/]+/shards/\d+/report\.json$"


# A prior that costs nothing to load --------------------------------------------------------------


class PixelPrior(Prior):
    """A seeded random projection of 16x16 pixels: loads instantly in a fresh process and gives the
    very bytes it gives in this one, so a killed-and-rerun job can be compared with a clean run."""

    SIZE = 16

    def __init__(self, spec: PriorSpec):
        self.spec = spec
        self.preprocessing = Preprocessing(image_size=(self.SIZE, self.SIZE), mean=(0.0,) * 3, std=(1.0,) * 3,
                                           interpolation="bilinear", resize_mode="squash")
        self.output_dim = 24
        self.random_init = True
        generator = torch.Generator().manual_seed(spec.seed)
        self.weights = torch.randn(3 * self.SIZE * self.SIZE, self.output_dim, generator=generator,
                                   dtype=torch.float64)
        self.fingerprint = hashlib.sha256(self.weights.numpy().tobytes()).hexdigest()

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((self.SIZE, self.SIZE), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        # In float64, so that the summation order a thread count picks cannot reach the float32 result.
        return torch.tanh(pixels.reshape(len(pixels), -1).double() @ self.weights).float()


# `coopt-hub` as a separate process, with the pixel prior swapped in for open_clip's.
DRIVER = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import coopt_hub.priors
from test_faults import PixelPrior
coopt_hub.priors.load_prior = lambda spec, device="cpu", precision="fp32": PixelPrior(spec)
from coopt_hub.cli import main
main(sys.argv[1:])
"""


# A proxy that breaks one request ------------------------------------------------------------------


@dataclass
class Strike:
    """Break the first request matching `method` and `path` (a regex on the raw request target) at
    `moment`: "mid-body" (half its body has reached the hub), "sent" (all of it has, no answer yet) or
    "answered" (the hub has answered; the client will never see it). The connection is then reset."""

    method: str
    path: str
    moment: str

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.moment}"


@dataclass
class _Armed:
    strike: Strike
    action: object
    fired: threading.Event = field(default_factory=threading.Event)


class Proxy:
    """A loopback HTTP/1.1 relay in front of a hub. Each connection carries one request and one answer
    at a time (clients do not pipeline), so the proxy knows exactly where a body or an answer stands."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._armed: list[_Armed] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, strike: Strike, action=lambda: None) -> _Armed:
        armed = _Armed(strike, action)
        with self._lock:
            self._armed.append(armed)
        return armed

    def close(self) -> None:
        self.listener.close()

    def _take(self, method: str, target: str) -> _Armed | None:
        with self._lock:
            for armed in self._armed:
                if armed.strike.method == method and re.search(armed.strike.path, target):
                    self._armed.remove(armed)
                    return armed
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = None
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60)
            from_client, from_upstream = client.makefile("rb"), upstream.makefile("rb")
            while True:
                head = _read_head(from_client)
                if head is None:
                    return
                method, target = head.split(b" ", 2)[:2]
                method, target = method.decode(), target.decode("latin-1")
                armed = self._take(method, target)
                upstream.sendall(head)
                body = _body_length(head)
                if armed and armed.strike.moment == "mid-body":
                    _copy(from_client, upstream, max(1, body // 2))
                    return self._fire(armed)
                _copy_body(from_client, upstream, head, body)
                if armed and armed.strike.moment == "sent":
                    return self._fire(armed)
                answer = _read_head(from_upstream)
                if answer is None:
                    return
                status = int(answer.split(b" ", 2)[1])
                length = 0 if method == "HEAD" or status in (204, 304) else _body_length(answer)
                payload = from_upstream.read(length)
                if armed and armed.strike.moment == "answered":
                    return self._fire(armed)
                client.sendall(answer + payload)
                if b"connection: close" in answer.lower() or b"connection: close" in head.lower():
                    return
        except (OSError, ValueError, IndexError):
            return  # the hub went away or the client did: the connection ends like a real one would
        finally:
            _reset(client)
            if upstream is not None:
                upstream.close()

    @staticmethod
    def _fire(armed: _Armed) -> None:
        armed.action()
        armed.fired.set()


def _read_head(stream) -> bytes | None:
    lines = []
    while True:
        line = stream.readline(65536)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _body_length(head: bytes) -> int:
    return int(_header(head, b"content-length") or 0)


def _copy(source, sink: socket.socket, count: int) -> None:
    while count > 0:
        block = source.read(min(count, 1 << 16))
        if not block:
            raise ValueError("the body ended early")
        sink.sendall(block)
        count -= len(block)


def _copy_body(source, sink: socket.socket, head: bytes, length: int) -> None:
    if b"chunked" not in (_header(head, b"transfer-encoding") or b"").lower():
        _copy(source, sink, length)
        return
    while True:
        size_line = source.readline(1024)
        sink.sendall(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while (trailer := source.readline(1024)) not in (b"\r\n", b"\n", b""):
                sink.sendall(trailer)
            sink.sendall(b"\r\n")
            return
        _copy(source, sink, size + 2)


def _reset(connection: socket.socket) -> None:
    """Close with RST, as a crashed peer or a broken network does, not with an orderly FIN."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    connection.close()


# The hub as a process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServedHub:
    """`coopt-hub hub serve` in its own process, killed with SIGKILL and started again on the same root and port."""

    def __init__(self, root: Path, token: str):
        self.root, self.token, self.port = root, token, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> ServedHub:
        self.process = subprocess.Popen(
            [str(BIN / "coopt-hub"), "hub", "serve", "--root", str(self.root), "--port", str(self.port),
             "--token", self.token, "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        exports = [self.process.stdout.readline() for _ in range(3)]  # printed once the port is bound
        assert all(line.startswith("export ") for line in exports), exports
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()
        self.kills += 1

    def kill_then_restart(self, down_s: float) -> None:
        """Kill now; come back after `down_s` seconds, during which connections are refused."""
        self.kill()
        threading.Timer(down_s, self.start).start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def copy_repos(source_root: Path, target_root: Path, *repos: str) -> None:
    """Serve repos built on the session hub from another root: a repo is its directory."""
    for repo in repos:
        relative = Path("repos", "datasets", f"{repo}.git")
        shutil.copytree(source_root / relative, target_root / relative)


def assert_whole(root: Path, repo: str) -> None:
    """Every ref of `repo` on disk points at a commit whose whole history is present, each LFS file
    included with its exact bytes: no dangling ref, no partial commit."""
    from dulwich.objects import Commit, Tag
    from dulwich.repo import Repo

    path = root / "repos" / "datasets" / f"{repo}.git"
    git = Repo(str(path))
    try:
        assert not list((path / "refs").rglob("*.lock")), "a ref lock was left behind"
        seen: set[bytes] = set()
        for name, sha in git.get_refs().items():
            obj = git[sha]
            while isinstance(obj, Tag):
                obj = git[obj.object[1]]
            assert isinstance(obj, Commit), f"{name!r} does not point at a commit"
            for entry in git.get_walker(include=[obj.id]):
                _assert_tree(git, git[entry.commit.tree], path, seen)
    finally:
        git.close()


def _assert_tree(git, tree, repo_path: Path, seen: set[bytes]) -> None:
    from dulwich.objects import Tree

    if tree.id in seen:
        return
    seen.add(tree.id)
    for item in tree.items():
        obj = git[item.sha]  # KeyError: an object the commit needs is missing
        if isinstance(obj, Tree):
            _assert_tree(git, obj, repo_path, seen)
            continue
        pointer = re.fullmatch(rb"version https://git-lfs.github.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n",
                               obj.data)
        if pointer:
            oid = pointer[1].decode()
            content = (repo_path / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes()
            assert len(content) == int(pointer[2]) and hashlib.sha256(content).hexdigest() == oid, item.path


# Fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(hub_server) -> Hub:
    return Hub(token=hub_server.token)


def publish_small_source(hub: Hub, broken: tuple[int, ...] = ()) -> str:
    """240 digits (16 px PNGs, with labels) in 8 row groups: 2 shards of 4 storage units each.
    The rows in `broken` hold bytes that are no image."""
    from huggingface_hub import CommitOperationAdd

    from coopt_hub.demo.sample_data import digits_images

    images, labels = digits_images(16)
    cells = []
    for row, image in enumerate(images[:240]):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cells.append({"bytes": b"\x89PNG truncated" if row in broken else buffer.getvalue(), "path": None})
    table = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                      "label": pa.array(labels[:240])})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=30)
    repo = f"org/faults-digits-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(repo)
    hub.commit(repo, "main", lambda head: [CommitOperationAdd("data/train-00000-of-00001.parquet",
                                                              buffer.getvalue())], "digits")
    return repo


@pytest.fixture(scope="module")
def source(hub) -> str:
    return publish_small_source(hub)


def collaboration(hub: Hub, source: str, shards: int = 2):
    return start_collaboration(hub, f"org/faults-coopt-{uuid.uuid4().hex[:8]}", source, shards=shards,
                               anchors=32, dim=16)


@pytest.fixture(scope="module")
def clean(hub, source, tmp_path_factory):
    """Shard 0 labeled by the pixel prior in one uninterrupted run: what every faulty run must equal."""
    collab = collaboration(hub, source)
    return optimize_shard(hub, collab.repo, SHARD, PixelPrior(PriorSpec(PIXEL_MODEL)),
                          workdir=tmp_path_factory.mktemp("clean"))


@pytest.fixture
def proxy(hub_server):
    relay = Proxy(int(hub_server.endpoint.rsplit(":", 1)[1]))
    yield relay
    relay.close()


def optimize_args(repo: str, workdir: Path) -> list[str]:
    return ["optimize", "--repo", repo, "--shard", str(SHARD), "--model", PIXEL_MODEL, "--push",
            "--batch-size", "16", "--workers", "2", "--workdir", str(workdir), "--json"]


def run_cli(args: list[str], env: dict[str, str], *, fault: str | None = None, proxy: Proxy | None = None,
            strike: Strike | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run `coopt-hub ARGS` in its own process; `fault` makes it kill itself, `strike` has the proxy kill it."""
    environment = {**os.environ, **env, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    environment.pop(faults.ENV, None)
    if fault:
        environment[faults.ENV] = fault
    process = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=environment,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    armed = proxy.arm(strike, process.kill) if strike else None
    stdout, stderr = process.communicate(timeout=timeout)
    if armed is not None:
        assert armed.fired.is_set(), f"{strike} never happened:\n{stderr[-3000:]}"
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def shard_history(hub: Hub, repo: str, shard: int = SHARD) -> list[str]:
    return [c.commit_id for c in hub.api.list_repo_commits(repo, revision=shard_branch(shard), repo_type="dataset")]


def main_history(hub: Hub, repo: str) -> list[str]:
    return [c.commit_id for c in hub.api.list_repo_commits(repo, repo_type="dataset")]


def branch_files(hub: Hub, repo: str, revision: str, shard: int = SHARD) -> dict[str, bytes]:
    paths = remote_paths(shard)
    return {path: hub.download(repo, path, revision).read_bytes() for path in (paths.targets, paths.anchors)}


def clean_files(clean) -> dict[str, bytes]:
    paths = remote_paths(SHARD)
    return {path: (clean.directory / path).read_bytes() for path in (paths.targets, paths.anchors)}


def assert_chunk_store_consistent(store: ChunkStore) -> int:
    """Every completion marker stands for whole, intact data; returns how many chunks are finished."""
    markers = sorted(store.markers.glob("*.json")) if store.markers.is_dir() else []
    for marker in markers:
        data = store.data_path(marker.stem).read_bytes()
        assert hashlib.sha256(data).hexdigest() == json.loads(marker.read_text())["sha256"], marker.stem
    return len(markers)


# Participant killed -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One fault: a process's own COOPT_HUB_FAULT, or the proxy striking when the traffic reaches a point
    (with an action: kill the participant, kill the hub, or just cut the connection)."""

    name: str
    fault: str | None = None
    strike: Strike | None = None


# One participant, killed again and again: each run of the same command resumes from what the
# previous killed run left, and only the last one is allowed to finish.
OPTIMIZE_KILLS = [
    Fault("encoding: a batch encoded, its chunk not stored yet", fault="encode:3"),
    Fault("writing chunks: a chunk's data written, not its marker", fault="chunk-data:2"),
    Fault("upload: half of a shard file sent to the hub", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("commit: built, nothing sent yet", fault="commit:1"),
    Fault("commit: the hub committed, the participant never heard", strike=Strike("POST", COMMIT, "answered")),
]


def test_participant_killed_at_every_stage_resumes_to_the_clean_result(hub, hub_server, source, clean, proxy,
                                                                        tmp_path):
    collab = collaboration(hub, source)
    repo, main = collab.repo, hub.head(collab.repo)
    workdir = tmp_path / "work"
    store = ChunkStore(run_directory(workdir, repo, SHARD, collab.plan, PixelPrior(PriorSpec(PIXEL_MODEL))))
    env = {"HF_ENDPOINT": proxy.endpoint}
    finished = 0
    for kill in OPTIMIZE_KILLS:
        run = run_cli(optimize_args(repo, workdir), env, fault=kill.fault, proxy=proxy, strike=kill.strike)
        assert run.returncode == -signal.SIGKILL, f"{kill.name}: {run.stderr[-3000:]}"
        now = assert_chunk_store_consistent(store)
        assert now >= finished, kill.name  # finished chunks are never lost
        finished = now
        if kill is not OPTIMIZE_KILLS[-1]:
            assert hub.head(repo, shard_branch(SHARD)) in (None, main), f"{kill.name} left a commit"

    rerun = run_cli(optimize_args(repo, workdir), env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    history = shard_history(hub, repo)
    # The killed run's commit went through: the rerun finds it and does not commit again.
    assert not summary["pushed"] and summary["commit"] == history[0]
    assert history[1:] == main_history(hub, repo) and history[1] == main
    assert branch_files(hub, repo, history[0]) == clean_files(clean)
    chunks = summary["report"]["chunks"]
    assert chunks["computed"] == 0 and chunks["reused"] == chunks["total"] == clean.report["chunks"]["total"]
    assert summary["report"]["files"] == clean.report["files"]
    assert_whole(hub_server.root, repo)


# Hub killed -------------------------------------------------------------------------------------

# The hub process dies with SIGKILL while the participant pushes, and comes back on the same root
# after DOWN_S seconds; the participant is never restarted: its retries carry the push through.
SERVER_KILLS = [
    Fault("hub killed while half of a shard file is uploaded", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("hub killed with the whole commit request in hand", strike=Strike("POST", COMMIT, "sent")),
]
DOWN_S = 1.0


def test_hub_killed_mid_upload_and_mid_commit_the_push_completes(hub, hub_server, source, clean, tmp_path):
    collab = collaboration(hub, source)
    root = tmp_path / "served"
    copy_repos(hub_server.root, root, source, collab.repo)
    served = ServedHub(root, token="served-token").start()
    relay = Proxy(served.port)
    try:
        for kill in SERVER_KILLS:
            relay.arm(kill.strike, lambda: served.kill_then_restart(DOWN_S))
        env = {"HF_ENDPOINT": relay.endpoint, "HF_TOKEN": served.token, "HF_HOME": str(tmp_path / "hf-home")}
        run = run_cli(optimize_args(collab.repo, tmp_path / "work"), env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert served.kills == len(SERVER_KILLS)
        summary = json.loads(run.stdout)
        remote = Hub(token=served.token, endpoint=served.endpoint)
        history = [c.commit_id for c in remote.api.list_repo_commits(collab.repo, revision=shard_branch(SHARD),
                                                                     repo_type="dataset")]
        main = [c.commit_id for c in remote.api.list_repo_commits(collab.repo, repo_type="dataset")]
        assert summary["commit"] == history[0] and history[1:] == main  # one commit, whichever way the kill fell
        assert branch_files(remote, collab.repo, history[0]) == clean_files(clean)
        served.kill()  # settle the disk before reading it, as after a crash
        for repo in (source, collab.repo):
            assert_whole(root, repo)
    finally:
        relay.close()
        served.stop()


# Calls made while the hub is down (connection refused) and comes back DOWN_S seconds later.
OUTAGE_CALLS = ("commit", "read a file", "read a branch head")


def test_a_hub_that_refuses_connections_for_a_while_is_waited_for(tmp_path):
    from huggingface_hub import CommitOperationAdd

    served = ServedHub(tmp_path / "root", token="t").start()
    try:
        client = Hub(token="t", endpoint=served.endpoint, retry=RetryPolicy(attempts=8, base_seconds=0.2))
        client.ensure_repo("org/refused")
        answers = {}
        calls = {
            "commit": lambda: client.commit("org/refused", "main",
                                            lambda head: [CommitOperationAdd("a.json", b'{"a": 1}')], "a"),
            "read a file": lambda: client.read_json("org/refused", "a.json", "main"),
            "read a branch head": lambda: client.head("org/refused"),
        }
        for name in OUTAGE_CALLS:
            served.kill_then_restart(DOWN_S)  # each call starts while nothing listens on the port
            answers[name] = calls[name]()
        assert answers["read a file"] == {"a": 1} and answers["read a branch head"] == answers["commit"]
        assert served.kills == len(OUTAGE_CALLS)
    finally:
        served.stop()


def test_an_unreachable_hub_is_not_taken_for_a_missing_file(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from coopt_hub.hub import client as hub_module

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise LocalEntryNotFoundError("Cannot reach the Hub, and the file is not in the cache.")

    monkeypatch.setattr(hub_module, "hf_hub_download", unreachable)
    client = Hub(token="t", endpoint="http://127.0.0.1:9", retry=RetryPolicy(attempts=3, base_seconds=0.01))
    # Read as "no report", an outage would make a participant pick the wrong reference or a merge
    # publish a card without the source's license.
    with pytest.raises(LocalEntryNotFoundError):
        client.read_json("org/x", "shards/0/report.json", "shard/0")
    assert len(calls) == 3


def lfs_upload_failure(cause: Exception) -> RuntimeError:
    """What huggingface_hub raises when an LFS upload fails: a RuntimeError from the real error."""
    try:
        raise RuntimeError("Error while uploading 'shards/0/targets.safetensors' to the Hub.") from cause
    except RuntimeError as wrapped:
        return wrapped


def test_a_failed_lfs_upload_is_retried_when_what_failed_underneath_is_worth_it():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def refused(status: int) -> HfHubHTTPError:
        request = httpx2.Request("PUT", "http://hub/datasets/org/x.git/info/lfs/objects/0")
        return HfHubHTTPError("refused", response=httpx2.Response(status, request=request))

    assert is_transient(lfs_upload_failure(httpx2.ConnectError("refused")))
    assert is_transient(lfs_upload_failure(refused(403)))  # an upload URL that expired, or a restarted hub's
    assert is_transient(lfs_upload_failure(refused(503)))
    assert not is_transient(lfs_upload_failure(refused(400)))
    assert not is_transient(RuntimeError("a bug"))


# Connections cut ----------------------------------------------------------------------------------

NETWORK_CUTS = [
    Fault("preupload request sent, connection cut before the answer", strike=Strike("POST", PREUPLOAD, "sent")),
    Fault("connection cut halfway through a shard file upload", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("connection cut halfway through the commit request", strike=Strike("POST", COMMIT, "mid-body")),
    Fault("the hub committed, the answer was lost", strike=Strike("POST", COMMIT, "answered")),
    Fault("the branch's report downloaded, the answer was lost", strike=Strike("GET", REPORT_DOWNLOAD, "answered")),
]


@pytest.mark.parametrize("cut", NETWORK_CUTS, ids=lambda cut: cut.name)
def test_a_connection_cut_once_mid_push_is_retried_to_one_commit(hub, hub_server, source, clean, proxy, cut):
    strike = cut.strike
    collab = collaboration(hub, source)
    main = hub.head(collab.repo)
    already = None
    if strike.path == REPORT_DOWNLOAD:
        # The push reads the branch's report to see whether its result is there: let it be there.
        already, _ = publish_result(hub, collab.repo, SHARD, clean.directory)
    armed = proxy.arm(strike)
    through_proxy = Hub(token=hub_server.token, endpoint=proxy.endpoint, retry=RetryPolicy(base_seconds=0.05))
    commit, pushed = publish_result(through_proxy, collab.repo, SHARD, clean.directory)
    assert armed.fired.is_set()
    history = shard_history(hub, collab.repo)
    assert history[0] == commit and history[1] == main
    if already:
        assert (commit, pushed) == (already, False)
    assert branch_files(hub, collab.repo, commit) == clean_files(clean)
    assert_whole(hub_server.root, collab.repo)


# Merge killed -------------------------------------------------------------------------------------

GOOD = FakePrior("good-net", output_dim=40, rank=18)
WEAK = FakePrior("weak-net", output_dim=20, rank=6)
MID = FakePrior("mid-net", output_dim=28, rank=12)

# One collaboration, merged by a process that is killed again and again; main must not move until
# the merge commit, which lands whole; the last rerun finishes the job.
MERGE_KILLS = [
    Fault("after one shard was verified and aligned", fault="merge-shard:1"),
    Fault("upload: half of a merged file sent", strike=Strike("PUT", LFS_UPLOAD, "mid-body")),
    Fault("commit: built, nothing sent yet", fault="commit:1"),
    Fault("between the merge commit and its tag", fault="merge-tag:1"),
]


def test_merge_killed_at_every_stage_leaves_main_whole_and_the_rerun_completes(hub, hub_server, source, proxy):
    from click.testing import CliRunner

    from coopt_hub.cli import cli

    collab = collaboration(hub, source, shards=3)
    first = collab.push(0, GOOD)
    pushed = {0: first, 1: collab.push(1, WEAK, reference=(0, GOOD, first)),
              2: collab.push(2, MID, reference=(0, GOOD, first))}
    repo, main = collab.repo, hub.head(collab.repo)
    env = {"HF_ENDPOINT": proxy.endpoint}
    for kill in MERGE_KILLS:
        run = run_cli(["merge", repo, "--json"], env, fault=kill.fault, proxy=proxy, strike=kill.strike)
        assert run.returncode == -signal.SIGKILL, f"{kill.name}: {run.stderr[-3000:]}"
        branches, tags = hub.refs(repo)
        assert tags == {} and {k: branches[shard_branch(k)] for k in pushed} == pushed, kill.name
        if kill is not MERGE_KILLS[-1]:
            assert branches["main"] == main, f"{kill.name} moved main"
    # Killed after its commit: main holds the whole merge, untagged.
    merged_head = hub.head(repo)
    assert main_history(hub, repo)[1] == main
    assert hub.read_json(repo, MANIFEST_PATH, merged_head)["tag"] == "v1"
    assert_whole(hub_server.root, repo)

    rerun = CliRunner().invoke(cli, ["merge", repo, "--json"])
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert (summary["tag"], summary["commit"], summary["created"]) == ("v1", merged_head, False)
    _, tags = hub.refs(repo)
    assert tags == {"v1": merged_head}
    assert_merged(hub, repo, "v1", pushed, collab.plan.num_rows)


def assert_merged(hub: Hub, repo: str, revision: str, shards: dict[int, str], rows: int) -> None:
    """Main at `revision` holds exactly `shards` (shard -> commit), every row of them, finite targets."""
    from safetensors.numpy import load_file

    manifest = hub.read_json(repo, MANIFEST_PATH, revision)
    assert {s["shard"]: s["commit"] for s in manifest["shards"]} == shards
    merged = load_file(hub.download(repo, TARGETS_PATH, revision))
    assert merged["ids"].size == rows and np.isfinite(merged["targets"].astype(np.float32)).all()


# Pushes racing a merge ----------------------------------------------------------------------------

RACERS = 3  # participants pushing while the merge runs


def test_pushes_racing_a_merge_lose_nothing_and_the_merge_is_consistent(hub, hub_server, source):
    collab = collaboration(hub, source, shards=RACERS + 1)
    first = collab.push(0, GOOD)
    priors = [WEAK, MID, FakePrior("other-net", output_dim=32, rank=9)]
    start = threading.Barrier(RACERS + 1)
    pushed: dict[int, str] = {0: first}
    outcome: dict[str, object] = {}

    def participant(k: int) -> None:
        start.wait()
        pushed[k] = collab.push(k, priors[k - 1], reference=(0, GOOD, first))

    def merger() -> None:
        start.wait()
        try:
            outcome["result"] = merge(hub, collab.repo, allow_partial=True)
        except CoOptError as err:  # a clean refusal is allowed; a half-written main is not
            outcome["error"] = err

    threads = [threading.Thread(target=participant, args=(k,)) for k in range(1, RACERS + 1)]
    threads.append(threading.Thread(target=merger))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    branches, tags = hub.refs(collab.repo)
    assert {k: branches[shard_branch(k)] for k in range(RACERS + 1)} == pushed  # no push lost
    result = outcome.get("result")
    if result is not None:
        # Whatever it saw, it saw whole: every merged shard at a commit that was pushed.
        assert tags == {result.tag: result.commit} and result.commit == branches["main"]
        merged = {s.shard: s.commit for s in result.manifest.shards}
        assert merged[0] == first and all(pushed[k] == commit for k, commit in merged.items())
        assert_merged(hub, collab.repo, result.tag, merged, sum(len(collab.plan.shard_ids(k)) for k in merged))
    else:
        assert tags == {} and hub.head(collab.repo) == main_history(hub, collab.repo)[0]
    final = merge(hub, collab.repo)
    assert_merged(hub, collab.repo, final.tag, pushed, collab.plan.num_rows)
    assert_whole(hub_server.root, collab.repo)
