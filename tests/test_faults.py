"""Faults survived, nothing lost: kill -9 at every stage of `optimize` and `merge`, a hub killed and
started again mid-upload and mid-commit, connections cut mid-body, pushes racing a merge.

Every fault is real. The participant and the merge run as `coopt-hub` processes (the participant
with tests/fakes.py's pixel prior, registered as a backend: it loads instantly) that kill
themselves at a named point (COOPT_HUB_FAULT, see coopt_hub/core/faults.py) or are killed by a
proxy that watches their traffic; the hub runs as a `coopt-hub hub serve` process killed with
SIGKILL and started again on the same root and port; connections are cut by that proxy in the
middle of a request body or after the hub has answered (tests/network_faults.py). RELIABILITY.md
counts the scenario tables, which live in tests/reliability.py (see
test_bad_inputs.py::test_reliability_report_matches_the_tables).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from fakes import PIXEL_MODEL, FakePrior, PixelPrior, cli_command
from network_faults import Proxy, ServedHub, Strike, copy_repos, free_port
from reliability import (
    MERGE_KILLS,
    NETWORK_CUTS,
    OPTIMIZE_KILLS,
    OUTAGE_CALLS,
    RACERS,
    REPORT_DOWNLOAD,
    SERVER_KILLS,
)
from repo_checks import assert_whole

from coopt_hub.core import faults
from coopt_hub.core.layout import MANIFEST_PATH, TARGETS_PATH, remote_paths, shard_branch
from coopt_hub.errors import CoOptError
from coopt_hub.hub.client import Hub, RetryPolicy, is_transient
from coopt_hub.participant.job import optimize_shard
from coopt_hub.participant.labeling import ChunkStore
from coopt_hub.participant.push import publish_result
from coopt_hub.participant.workdir import run_directory
from coopt_hub.platform.merge.run import merge
from coopt_hub.priors import PriorSpec

SHARD = 0
DOWN_S = 1.0  # how long a killed hub stays down before it is started again


# Fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def collaboration(small_source, new_collaboration):
    """Factory: a new collaboration over the small source, 2 shards unless told otherwise."""

    def make(shards: int = 2):
        return new_collaboration(small_source, "faults-coopt", shards=shards, anchors=32, dim=16)

    return make


@pytest.fixture(scope="module")
def clean(collaboration, hub, tmp_path_factory):
    """Shard 0 labeled by the pixel prior in one uninterrupted run: what every faulty run must equal."""
    collab = collaboration()
    return optimize_shard(hub, collab.repo, SHARD, PixelPrior(PriorSpec(PIXEL_MODEL)),
                          workdir=tmp_path_factory.mktemp("clean"))


@pytest.fixture
def proxy(hub_server, monkeypatch):
    """A relay in front of the session hub. The hub is told it is served there, as a hub behind a proxy
    is: the links it hands out (LFS upload URLs) lead through the relay, never around it."""
    relay = Proxy(hub_server.port)
    monkeypatch.setattr(hub_server, "public_url", relay.endpoint)
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
    process = subprocess.Popen(cli_command(*args), env=environment,
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


@pytest.mark.slow
def test_participant_killed_at_every_stage_resumes_to_the_clean_result(hub, hub_server, collaboration, clean, proxy,
                                                                        tmp_path):
    collab = collaboration()
    repo, main = collab.repo, hub.head(collab.repo)
    workdir = tmp_path / "work"
    store = ChunkStore(run_directory(workdir, repo, SHARD, collab.plan, PixelPrior(PriorSpec(PIXEL_MODEL))))
    env = {"HF_ENDPOINT": proxy.endpoint}
    finished = 0
    for kill in OPTIMIZE_KILLS:
        run = run_cli(optimize_args(repo, workdir), env, fault=kill.fault, proxy=proxy, strike=kill.strike)
        assert run.returncode == -signal.SIGKILL, f"{kill.name}: {run.stderr[-3000:]}"
        now = assert_chunk_store_consistent(store)
        assert now >= finished, f"{kill.name}: finished chunks were lost"
        finished = now
        if kill is not OPTIMIZE_KILLS[-1]:
            assert hub.head(repo, shard_branch(SHARD)) in (None, main), f"{kill.name} left a commit"

    rerun = run_cli(optimize_args(repo, workdir), env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    history = shard_history(hub, repo)
    # The killed run's commit went through: the rerun finds it and does not commit again.
    assert not summary["pushed"], "the rerun committed again"
    assert summary["commit"] == history[0], "the rerun does not name the branch's head"
    assert history[1:] == main_history(hub, repo), "the branch is not one commit on top of main"
    assert history[1] == main, "main moved"
    assert branch_files(hub, repo, history[0]) == clean_files(clean), "the pushed files differ from a clean run's"
    chunks = summary["report"]["chunks"]
    assert chunks["computed"] == 0, "the rerun encoded chunks again"
    assert chunks["reused"] == chunks["total"] == clean.report["chunks"]["total"], "chunks were not all reused"
    assert summary["report"]["files"] == clean.report["files"], "the report's files differ from a clean run's"
    assert_whole(hub_server.root, repo)


# Hub killed -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_hub_killed_mid_upload_and_mid_commit_the_push_completes(hub_server, small_source, collaboration, clean,
                                                                 tmp_path):
    collab = collaboration()
    root = tmp_path / "served"
    copy_repos(hub_server.root, root, small_source, collab.repo)
    port = free_port()
    relay = Proxy(port)
    served = ServedHub(root, token="served-token", port=port, public_url=relay.endpoint)
    try:
        served.start()
        for kill in SERVER_KILLS:
            relay.arm(kill.strike, lambda: served.kill_then_restart(DOWN_S))
        env = {"HF_ENDPOINT": relay.endpoint, "HF_TOKEN": served.token, "HF_HOME": str(tmp_path / "hf-home")}
        run = run_cli(optimize_args(collab.repo, tmp_path / "work"), env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert served.kills == len(SERVER_KILLS), "not every kill happened"
        summary = json.loads(run.stdout)
        remote = Hub(token=served.token, endpoint=served.endpoint)
        history = [c.commit_id for c in remote.api.list_repo_commits(collab.repo, revision=shard_branch(SHARD),
                                                                     repo_type="dataset")]
        main = [c.commit_id for c in remote.api.list_repo_commits(collab.repo, repo_type="dataset")]
        # One commit, whichever way the kill fell.
        assert summary["commit"] == history[0], "the push does not name the branch's head"
        assert history[1:] == main, "the branch is not one commit on top of main"
        assert branch_files(remote, collab.repo, history[0]) == clean_files(clean), "the pushed files differ"
        served.kill()  # settle the disk before reading it, as after a crash
        for repo in (small_source, collab.repo):
            assert_whole(root, repo)
    finally:
        relay.close()
        served.stop()


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
        assert answers["read a file"] == {"a": 1}, "the file read is not what was committed"
        assert answers["read a branch head"] == answers["commit"], "the head read is not the commit made"
        assert served.kills == len(OUTAGE_CALLS), "not every outage happened"
    finally:
        served.stop()


def test_an_unreachable_hub_is_not_taken_for_a_missing_file(monkeypatch, hub_server):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from coopt_hub.hub import client as hub_module

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise LocalEntryNotFoundError("Cannot reach the Hub, and the file is not in the cache.")

    monkeypatch.setattr(hub_module, "hf_hub_download", unreachable)
    # The endpoint answers the client's first contact; every download after it fails as an outage does.
    client = Hub(token=hub_server.token, endpoint=hub_server.endpoint, retry=RetryPolicy(attempts=3, base_seconds=0.01))
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


@pytest.mark.parametrize("cut", NETWORK_CUTS, ids=lambda cut: cut.name)
def test_a_connection_cut_once_mid_push_is_retried_to_one_commit(hub, hub_server, collaboration, clean, proxy, cut):
    strike = cut.strike
    collab = collaboration()
    main = hub.head(collab.repo)
    already = None
    if strike.path == REPORT_DOWNLOAD:
        # The push reads the branch's report to see whether its result is there: let it be there.
        already, _ = publish_result(hub, collab.repo, SHARD, clean.directory)
    armed = proxy.arm(strike)
    through_proxy = Hub(token=hub_server.token, endpoint=proxy.endpoint, retry=RetryPolicy(base_seconds=0.05))
    commit, pushed = publish_result(through_proxy, collab.repo, SHARD, clean.directory)
    assert armed.fired.is_set(), f"{strike} never happened"
    history = shard_history(hub, collab.repo)
    assert history[0] == commit, "the push does not name the branch's head"
    assert history[1] == main, "the branch is not one commit on top of main"
    if already:
        assert (commit, pushed) == (already, False), "a result already on the branch was pushed again"
    assert branch_files(hub, collab.repo, commit) == clean_files(clean), "the pushed files differ"
    assert_whole(hub_server.root, collab.repo)


# Merge killed -------------------------------------------------------------------------------------

GOOD = FakePrior("good-net", output_dim=40, rank=18)
WEAK = FakePrior("weak-net", output_dim=20, rank=6)
MID = FakePrior("mid-net", output_dim=28, rank=12)


@pytest.mark.slow
def test_merge_killed_at_every_stage_leaves_main_whole_and_the_rerun_completes(hub, hub_server, collaboration,
                                                                                proxy):
    from click.testing import CliRunner

    from coopt_hub.cli import cli

    collab = collaboration(shards=3)
    first = collab.push(0, GOOD)
    pushed = {0: first, 1: collab.push(1, WEAK, reference=(0, GOOD, first)),
              2: collab.push(2, MID, reference=(0, GOOD, first))}
    repo, main = collab.repo, hub.head(collab.repo)
    env = {"HF_ENDPOINT": proxy.endpoint}
    for kill in MERGE_KILLS:
        run = run_cli(["merge", repo, "--json"], env, fault=kill.fault, proxy=proxy, strike=kill.strike)
        assert run.returncode == -signal.SIGKILL, f"{kill.name}: {run.stderr[-3000:]}"
        branches, tags = hub.refs(repo)
        assert tags == {}, f"{kill.name} left a tag"
        assert {k: branches[shard_branch(k)] for k in pushed} == pushed, f"{kill.name} moved a shard branch"
        if kill is not MERGE_KILLS[-1]:
            assert branches["main"] == main, f"{kill.name} moved main"
    # Killed after its commit: main holds the whole merge, untagged.
    merged_head = hub.head(repo)
    assert main_history(hub, repo)[1] == main, "the merge is not one commit on top of main"
    assert hub.read_json(repo, MANIFEST_PATH, merged_head)["tag"] == "v1", "main does not hold the merge of v1"
    assert_whole(hub_server.root, repo)

    rerun = CliRunner().invoke(cli, ["merge", repo, "--json"])
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert (summary["tag"], summary["commit"], summary["created"]) == ("v1", merged_head, False), \
        "the rerun did not take up the killed merge's commit"
    _, tags = hub.refs(repo)
    assert tags == {"v1": merged_head}, "the rerun did not tag the merge"
    assert_merged(hub, repo, "v1", pushed, collab.plan.num_rows)


def assert_merged(hub: Hub, repo: str, revision: str, shards: dict[int, str], rows: int) -> None:
    """Main at `revision` holds exactly `shards` (shard -> commit), every row of them, finite targets."""
    from safetensors.numpy import load_file

    manifest = hub.read_json(repo, MANIFEST_PATH, revision)
    assert {s["shard"]: s["commit"] for s in manifest["shards"]} == shards, "the manifest lists other shards"
    merged = load_file(hub.download(repo, TARGETS_PATH, revision))
    assert merged["ids"].size == rows, "the merged targets lack rows"
    assert np.isfinite(merged["targets"].astype(np.float32)).all(), "the merged targets are not finite"


# Pushes racing a merge ----------------------------------------------------------------------------


def test_pushes_racing_a_merge_lose_nothing_and_the_merge_is_consistent(hub, hub_server, collaboration):
    collab = collaboration(shards=RACERS + 1)
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
    assert {k: branches[shard_branch(k)] for k in range(RACERS + 1)} == pushed, "a push was lost"
    result = outcome.get("result")
    if result is not None:
        # Whatever it saw, it saw whole: every merged shard at a commit that was pushed.
        assert tags == {result.tag: result.commit}, "the racing merge's tag is not its commit"
        assert result.commit == branches["main"], "main is not the racing merge's commit"
        merged = {s.shard: s.commit for s in result.manifest.shards}
        assert merged[0] == first, "the racing merge took shard 0 at another commit"
        assert all(pushed[k] == commit for k, commit in merged.items()), "the racing merge took a commit never pushed"
        assert_merged(hub, collab.repo, result.tag, merged, sum(len(collab.plan.shard_ids(k)) for k in merged))
    else:
        assert tags == {}, "a refused merge left a tag"
        assert hub.head(collab.repo) == main_history(hub, collab.repo)[0], "a refused merge moved main"
    final = merge(hub, collab.repo)
    assert_merged(hub, collab.repo, final.tag, pushed, collab.plan.num_rows)
    assert_whole(hub_server.root, collab.repo)
