"""Bad input gets a clear error, never a corrupted dataset.

Three tables: command lines (run in this process with `coopt_hub.cli.main`'s error handling, plus
a few as real `coopt-hub` processes), library calls, and raw requests to the server. Every case
must fail with a message that says what is wrong and a next step, a non-zero exit code (or a 4xx),
no traceback, and every repo's branches and tags exactly as they were.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import reliability
from cli_run import Outcome, run_main
from fakes import PIXEL_MODEL, FakePrior, NanPixelPrior, PixelPrior
from helpers_hub import publish_digit_rows

from coopt_hub import errors
from coopt_hub.cli import main
from coopt_hub.core.layout import ANCHORS_FILE, PLAN_PATH, TARGETS_FILE, shard_prefix
from coopt_hub.core.shardfile import HEADER_KEY
from coopt_hub.hub.client import Hub
from coopt_hub.participant.job import optimize_shard
from coopt_hub.priors import PriorSpec

BIN = Path(sys.executable).parent
BROKEN_ROWS = (3, 4)  # rows of the broken source that hold no image
USAGE_HINT = "--help` lists every option"


@dataclass(frozen=True)
class Case:
    """A bad input and the error it must get. `argv`/`call` may name the world's repos and files
    as {repo}, {work}, ... (see World.names); `setup` prepares files the case needs first."""

    name: str
    message: str  # regex the error message must match
    hint: str  # text the next step must contain
    argv: tuple[str, ...] = ()
    setup: Callable[[World, Path], None] | None = None
    code: int | None = None  # exit code, when it matters


@dataclass
class World:
    hub: Hub
    root: Path  # the hub's storage
    repos: dict[str, str]  # placeholder -> repo id; every one is checked unchanged after each case
    result: Path  # a finished local result of shard 1 of {repo}, made without --push
    names: dict[str, str] = field(default_factory=dict)

    def refs(self) -> dict[str, dict[bytes, bytes]]:
        """Every ref of every repo, read from the hub's storage: all of them, at a fraction of two requests a repo."""
        from dulwich.repo import Repo

        snapshot = {}
        for repo in self.repos.values():
            with Repo(str(self.root / "repos" / "datasets" / f"{repo}.git")) as git:
                snapshot[repo] = git.get_refs()
        return snapshot


# Building the world -------------------------------------------------------------------------------


def edit_main(hub: Hub, repo: str, path: str, change: Callable[[str], str]) -> None:
    """A hand edit of one file on main, as someone with write access might make it."""
    from huggingface_hub import CommitOperationAdd

    text = hub.download(repo, path, "main").read_text()
    hub.commit(repo, "main", lambda head: [CommitOperationAdd(path, change(text).encode())], f"edit {path}")


def narrower(result, anchors) -> None:
    """A shard whose targets have 8 dimensions, self-consistent, for a plan of 16."""
    result.header.dim = 8
    result.raw, result.aligned, anchors.projected = result.raw[:, :8], result.aligned[:, :8], anchors.projected[:, :8]


SECRET = b"private-content-0f9e8d"  # what the private repo holds; no unauthenticated answer may carry it


@pytest.fixture(scope="module")
def world(hub, hub_server, small_source, new_collaboration, tmp_path_factory) -> World:
    from huggingface_hub import CommitOperationAdd

    broken_source = publish_digit_rows(hub, rows=240, rows_per_group=30, broken=BROKEN_ROWS, name="broken-digits")

    def collab(name: str, origin: str = small_source):
        return new_collaboration(origin, f"bad-{name}", shards=2, anchors=32, dim=16)

    repo = collab("inputs")
    first = repo.push(0, FakePrior("someone-else", output_dim=20))
    hub.create_tag(repo.repo, "v1", first, "an earlier version")
    stale = collab("stale")
    stale.push(0, FakePrior("good-net", output_dim=40))
    stale.push(1, FakePrior("narrow-net", output_dim=28), edit=narrower)
    handplan, shuffled, mismatch, manifest = (collab(name) for name in ("handplan", "shuffled", "mismatch", "manifest"))
    edit_main(hub, handplan.repo, PLAN_PATH, lambda text: text.replace('"dim": 16', '"dim": "sixteen"'))
    edit_main(hub, shuffled.repo, PLAN_PATH, lambda text: json.dumps(
        {**json.loads(text), "anchor_ids": sorted(json.loads(text)["anchor_ids"], reverse=True)}))
    edit_main(hub, mismatch.repo, PLAN_PATH, lambda text: text.replace('"image_column": "image"',
                                                                        '"image_column": "picture"'))
    hub.commit(manifest.repo, "main", lambda head: [CommitOperationAdd("coopt/manifest.json", b'{"version": 1}')],
               "hand-made manifest")
    broken = collab("broken", broken_source)
    noplan, private = f"org/bad-noplan-{uuid.uuid4().hex[:8]}", f"org/bad-private-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(noplan)
    hub.ensure_repo(private, private=True)
    hub.commit(private, "main", lambda head: [CommitOperationAdd("secret.txt", SECRET),
                                              CommitOperationAdd("secret.bin", SECRET)], "secret")

    workdir = tmp_path_factory.mktemp("result")
    optimize_shard(hub, repo.repo, 1, PixelPrior(PriorSpec(PIXEL_MODEL)), workdir=workdir)
    repos = {"repo": repo.repo, "source": small_source, "broken_source": broken_source, "stale": stale.repo,
             "handplan": handplan.repo, "shuffled": shuffled.repo, "mismatch": mismatch.repo,
             "manifest": manifest.repo, "broken": broken.repo, "noplan": noplan, "private": private}
    broken_shard = broken.plan.unit_shards[0]  # the shard holding rows 3 and 4
    return World(hub=hub, root=hub_server.root, repos=repos, result=workdir,
                 names={**repos, "broken_shard": str(broken_shard)})


# Damaging a local result ---------------------------------------------------------------------------


def local_result(world: World, tmp: Path) -> Path:
    """A copy of the world's finished result in {tmp}/work; returns the folder of its shard files."""
    shutil.copytree(world.result, tmp / "work")
    (directory,) = (tmp / "work").glob(f"*/shard-00001/*/result/{shard_prefix(1)}")
    return directory


def rewrite_shard(directory: Path, change: Callable[[dict, dict, dict], None]) -> None:
    """Change a shard pair and re-sign it (fresh checksums): damage that only a check of meaning can catch."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    loaded = {}
    for name in (TARGETS_FILE, ANCHORS_FILE):
        with safe_open(str(directory / name), framework="numpy") as stored:
            loaded[name] = ({key: stored.get_tensor(key) for key in stored.keys()},
                            json.loads(stored.metadata()[HEADER_KEY]))
    targets, header = loaded[TARGETS_FILE]
    anchors, _ = loaded[ANCHORS_FILE]
    change(targets, anchors, header)

    def digest(array: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()

    header["checksums"] = {**{f"targets/{k}": digest(v) for k, v in targets.items()},
                           **{f"anchors/{k}": digest(v) for k, v in anchors.items()}}
    metadata = {HEADER_KEY: json.dumps(header, sort_keys=True)}
    save_file(targets, str(directory / TARGETS_FILE), metadata=metadata)
    save_file(anchors, str(directory / ANCHORS_FILE), metadata=metadata)


def truncate_targets(world: World, tmp: Path) -> None:
    path = local_result(world, tmp) / TARGETS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def nan_targets(world: World, tmp: Path) -> None:
    def poison(targets, anchors, header):
        targets["aligned"] = targets["aligned"].copy()
        targets["aligned"][5, 3] = np.nan

    rewrite_shard(local_result(world, tmp), poison)


def wrong_dims(world: World, tmp: Path) -> None:
    def narrow(targets, anchors, header):
        header["dim"] = 8
        targets["raw"], targets["aligned"] = targets["raw"][:, :8].copy(), targets["aligned"][:, :8].copy()
        anchors["projected"] = anchors["projected"][:, :8].copy()

    rewrite_shard(local_result(world, tmp), narrow)


def other_plan_report(world: World, tmp: Path) -> None:
    path = local_result(world, tmp) / "report.json"
    report = json.loads(path.read_text())
    path.write_text(json.dumps({**report, "plan_hash": "0" * 64}))


def broken_config(world: World, tmp: Path) -> None:
    (tmp / "coopt-hub.json").write_text('{"version": 1, "repo": ')


def truncated_checkpoint(world: World, tmp: Path) -> None:
    (tmp / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")


def token_file_with_an_unknown_role(world: World, tmp: Path) -> None:
    (tmp / "tokens.txt").write_text("# the owner\nsecret-token owner\n")


# The tables -----------------------------------------------------------------------------------------

INIT = ("init", "org/bad-new-{uid}", "--source", "{source}")
OPTIMIZE = ("optimize", "--repo", "{repo}", "--model", PIXEL_MODEL, "--workdir", "{tmp}/work")
PUSH = ("push", "--repo", "{repo}", "--shard", "1", "--workdir", "{tmp}/work")

CLI_CASES = [
    # init: every option out of its type or range, and sources that do not fit
    Case("init --shards 0", r"Invalid value for '--shards': 0 is not in the range x>=1", USAGE_HINT,
         (*INIT, "--shards", "0", "--anchors", "8"), code=2),
    Case("init --shards two", r"'two' is not a valid integer", USAGE_HINT, (*INIT, "--shards", "two", "--anchors", "8"),
         code=2),
    Case("init --anchors many", r"'many' is not a number", USAGE_HINT, (*INIT, "--shards", "2", "--anchors", "many"),
         code=2),
    Case("init --anchors 1.5", r"whole count >= 1 .* or a fraction between 0 and 1", USAGE_HINT,
         (*INIT, "--shards", "2", "--anchors", "1.5"), code=2),
    Case("init --anchors 5000", r"Cannot draw 5000 anchor rows from 240 rows", "Use between 1 and 240 anchors",
         (*INIT, "--shards", "2", "--anchors", "5000")),
    Case("init --shards 1000", r"Cannot split 240 rows into 1000 shards", "at most 240 shards",
         (*INIT, "--shards", "1000", "--anchors", "8")),
    Case("init --dim 0", r"Invalid value for '--dim'", USAGE_HINT,
         (*INIT, "--shards", "2", "--anchors", "8", "--dim", "0"), code=2),
    Case("init --dim 1.5", r"'1.5' is not a valid integer", USAGE_HINT,
         (*INIT, "--shards", "2", "--anchors", "8", "--dim", "1.5"), code=2),
    Case("init --temperature nan", r"temperature must be positive, got nan", "usual value is 2",
         (*INIT, "--shards", "2", "--anchors", "8", "--temperature", "nan")),
    Case("init --temperature -1", r"temperature must be positive, got -1", "usual value is 2",
         (*INIT, "--shards", "2", "--anchors", "8", "--temperature", "-1")),
    Case("init --seed -1", r"seed must be a non-negative integer", "--seed 0 or above",
         (*INIT, "--shards", "2", "--anchors", "8", "--seed", "-1")),
    Case("init: source that does not exist", r"org/no-such-source", "HF_TOKEN",
         ("init", "org/bad-new-{uid}", "--source", "org/no-such-source", "--shards", "2", "--anchors", "8")),
    Case("init: source revision that does not exist", r"no-such-branch", "revision",
         (*INIT, "--source-revision", "no-such-branch", "--shards", "2", "--anchors", "8")),
    Case("init: source revision with a path in it", r"\.\./\.\./etc", "revision",
         (*INIT, "--source-revision", "../../etc", "--shards", "2", "--anchors", "8")),
    Case("init: split the source lacks", r"validation", "split",
         (*INIT, "--split", "validation", "--shards", "2", "--anchors", "8")),
    Case("init: image column the source lacks", r"picture", "column",
         (*INIT, "--image-column", "picture", "--shards", "2", "--anchors", "8")),
    Case("init: repo name with a space", r"org/bad name", "ORG/NAME",
         ("init", "org/bad name", "--source", "{source}", "--shards", "2", "--anchors", "8")),
    Case("init: repo name with a path in it", r"\.\./etc", "ORG/NAME",
         ("init", "../etc", "--source", "{source}", "--shards", "2", "--anchors", "8")),
    Case("init: another plan on an existing collaboration", r"already holds a different plan", "existing plan",
         ("init", "{repo}", "--source", "{source}", "--shards", "3", "--anchors", "32", "--dim", "16")),
    # optimize: options, priors, configs, plans and sources that do not fit
    Case("optimize --shard -1", r"Invalid value for '--shard'", USAGE_HINT, (*OPTIMIZE, "--shard", "-1"), code=2),
    Case("optimize --shard 7", r"Shard 7 does not exist; this plan has shards 0\.\.1", "Pick a shard number",
         (*OPTIMIZE, "--shard", "7")),
    Case("optimize --batch-size 0", r"Invalid value for '--batch-size'", USAGE_HINT,
         (*OPTIMIZE, "--shard", "1", "--batch-size", "0"), code=2),
    Case("optimize --workers 0", r"Invalid value for '--workers'", USAGE_HINT,
         (*OPTIMIZE, "--shard", "1", "--workers", "0"), code=2),
    Case("optimize --precision fp64", r"'fp64' is not one of 'fp32', 'bf16', 'fp16'", USAGE_HINT,
         (*OPTIMIZE, "--shard", "1", "--precision", "fp64"), code=2),
    Case("optimize --on-bad-image ignore", r"'ignore' is not one of 'error', 'skip'", USAGE_HINT,
         (*OPTIMIZE, "--shard", "1", "--on-bad-image", "ignore"), code=2),
    Case("optimize --image-size 4", r"Invalid value for '--image-size'", USAGE_HINT,
         (*OPTIMIZE, "--shard", "1", "--image-size", "4"), code=2),
    Case("optimize --device tpu", r"Unknown device 'tpu'", "cpu, cuda or cuda:N",
         ("optimize", "--repo", "{repo}", "--shard", "1", "--model", "ViT-S-32", "--device", "tpu")),
    Case("optimize: unknown model", r"Unknown open_clip model 'NoSuchNet'", "open_clip.list_models",
         ("optimize", "--repo", "{repo}", "--shard", "1", "--model", "NoSuchNet", "--workdir", "{tmp}/work")),
    Case("optimize: checkpoint that does not exist", r"'/no/such/weights.safetensors' does not exist", USAGE_HINT,
         ("optimize", "--repo", "{repo}", "--shard", "1", "--model", "ViT-S-32", "--checkpoint",
          "/no/such/weights.safetensors"), code=2),
    Case("optimize: truncated checkpoint", r"weights\.safetensors does not fit ViT-S-32", "state dict",
         ("optimize", "--repo", "{repo}", "--shard", "1", "--model", "ViT-S-32", "--image-size", "32", "--checkpoint",
          "{tmp}/weights.safetensors", "--workdir", "{tmp}/work"), setup=truncated_checkpoint),
    Case("optimize: pretrained weights and a checkpoint", r"not both", "--pretrained TAG",
         ("optimize", "--repo", "{repo}", "--shard", "1", "--model", "ViT-S-32", "--pretrained", "openai",
          "--checkpoint", "{tmp}/weights.safetensors"), setup=truncated_checkpoint, code=2),
    Case("optimize: a hub model with a pretrained tag", r"brings its own weights", "Drop --pretrained",
         ("optimize", "--repo", "{repo}", "--shard", "1", "--model", "hf-hub:org/clip", "--pretrained", "openai"),
         code=2),
    Case("optimize: no repo given anywhere", r"No CoOpt repo given", "--repo ORG/NAME",
         ("optimize", "--shard", "1", "--model", PIXEL_MODEL)),
    Case("optimize: no prior given anywhere", r"No prior model given", "--model",
         ("optimize", "--repo", "{repo}", "--shard", "1")),
    Case("optimize: hand-edited participant config", r"coopt-hub\.json is not a valid coopt-hub participant config",
         "coopt-hub join", ("optimize", "--shard", "1"), setup=broken_config),
    Case("optimize: repo without a plan", r"No CoOpt plan in org/bad-noplan", "coopt-hub init",
         ("optimize", "--repo", "{noplan}", "--shard", "0", "--model", PIXEL_MODEL, "--workdir", "{tmp}/work")),
    Case("optimize: hand-edited plan", r"coopt/plan\.json is not a valid plan", "edited by hand",
         ("optimize", "--repo", "{handplan}", "--shard", "0", "--model", PIXEL_MODEL, "--workdir", "{tmp}/work")),
    Case("optimize: hand-edited plan with anchors out of order", r"not a valid plan: Anchor ids must be sorted",
         "edited by hand", ("optimize", "--repo", "{shuffled}", "--shard", "0", "--model", PIXEL_MODEL, "--workdir",
                            "{tmp}/work")),
    Case("optimize: plan naming a column the source lacks", r"picture", "plan",
         ("optimize", "--repo", "{mismatch}", "--shard", "0", "--model", PIXEL_MODEL, "--workdir", "{tmp}/work")),
    Case("optimize: undecodable images", r"image\(s\) of shard \d+ or the anchors cannot be decoded: ids 3, 4",
         "--on-bad-image skip", ("optimize", "--repo", "{broken}", "--shard", "{broken_shard}", "--model", PIXEL_MODEL,
                                 "--push", "--workdir", "{tmp}/work")),
    Case("optimize --push onto another participant's shard", r"already holds shard 0 labeled by .*someone-else",
         "--overwrite", (*OPTIMIZE, "--shard", "0", "--push")),
    # push: local results that are missing, damaged or made for something else
    Case("push with nothing computed", r"No finished result of shard 1", "coopt-hub optimize", PUSH),
    Case("push: truncated targets file", r"targets\.safetensors is not a readable safetensors file", "optimize",
         PUSH, setup=truncate_targets),
    Case("push: NaN in the targets", r"tensor 'aligned' holds NaN or infinite values", "rerun",
         PUSH, setup=nan_targets),
    Case("push: targets of the wrong dimension", r"8 dimensions, the plan says 16", "optimize",
         PUSH, setup=wrong_dims),
    Case("push: hand-edited report", r"made for plan 000000000000", "coopt-hub optimize", PUSH,
         setup=other_plan_report),
    # merge
    Case("merge --images link", r"'link' is not one of 'copy', 'reference'", USAGE_HINT,
         ("merge", "{repo}", "--images", "link"), code=2),
    Case("merge --tag that exists", r"Tag v1 already exists in org/bad-inputs", "Omit --tag",
         ("merge", "{repo}", "--tag", "v1")),
    Case("merge with shards missing", r"Shard\(s\) 1 of org/bad-inputs-\w+ have not been pushed", "--allow-partial",
         ("merge", "{repo}")),
    Case("merge with nothing pushed", r"No shard of org/bad-broken-\w+ has been pushed yet", "coopt-hub optimize",
         ("merge", "{broken}")),
    Case("merge a shard of the wrong dimension", r"targets have 8 dimensions, the plan says 16", "optimize",
         ("merge", "{stale}")),
    Case("merge over a hand-edited manifest", r"coopt/manifest\.json", "manifest", ("merge", "{manifest}")),
    # status, verify, tokens, hub serve
    Case("status of a repo that does not exist", r"Repository not found", "HF_TOKEN", ("status", "org/no-such-repo"),
         code=3),
    Case("status of a repo name with odd characters", r"org/na\*me", "ORG/NAME", ("status", "org/na*me")),
    Case("status with a wrong token", r"401", "HF_TOKEN", ("status", "{repo}", "--token", "hf_wrong_token"), code=5),
    Case("status of a repo without a plan", r"No CoOpt plan", "coopt-hub init", ("status", "{noplan}")),
    Case("verify --sample 0", r"Invalid value for '--sample'", USAGE_HINT, ("verify", "{repo}", "--sample", "0"),
         code=2),
    Case("verify --threshold 2", r"Invalid value for '--threshold'", USAGE_HINT,
         ("verify", "{repo}", "--threshold", "2"), code=2),
    Case("hub serve --port 70000", r"Invalid value for '--port'", USAGE_HINT,
         ("hub", "serve", "--root", "{tmp}/root", "--port", "70000"), code=2),
    # An empty token file is valid now (tokens are added to it while the hub runs); a line with an
    # unknown role is not.
    Case("hub serve with a token of an unknown role", r"Cannot read the token file: .*unknown role 'owner'",
         "hub token add --help", ("hub", "serve", "--root", "{tmp}/root", "--token-file", "{tmp}/tokens.txt"),
         setup=token_file_with_an_unknown_role),
]


def fill(parts: tuple[str, ...], world: World, tmp: Path) -> list[str]:
    names = {**world.names, "tmp": str(tmp), "uid": uuid.uuid4().hex[:8]}
    return [part.format(**names) for part in parts]


def assert_clear_error(outcome: Outcome, case: Case) -> None:
    text = outcome.stderr
    assert outcome.code != 0, f"exit code 0:\n{text}"
    if case.code is not None:
        assert outcome.code == case.code, f"exit code {outcome.code}, expected {case.code}:\n{text}"
    assert "Traceback" not in text + outcome.stdout, f"a traceback:\n{text}"
    error = re.search(r"^Error: (.*)$", text, re.MULTILINE)
    hint = re.search(r"^Next step: (.*)$", text, re.MULTILINE)
    assert error, f"no 'Error:' line:\n{text}"
    assert re.search(case.message, error.group(1)), f"the error does not match {case.message!r}:\n{text}"
    assert hint, f"no 'Next step:' line:\n{text}"
    assert case.hint in hint.group(1), f"the next step does not say {case.hint!r}:\n{text}"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, fake_backends) -> Path:
    """Run from an empty directory, with the fake backends known (PIXEL_MODEL is the pixel prior)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda case: case.name)
def test_cli_bad_input_gets_a_clear_error_and_changes_nothing(world, in_tmp, case):
    if case.setup is not None:
        case.setup(world, in_tmp)
    before = world.refs()
    outcome = run_main(fill(case.argv, world, in_tmp))
    assert_clear_error(outcome, case)
    for token in (world.hub.token, "hf_wrong_token"):
        assert token not in outcome.stdout + outcome.stderr, "a token was printed"
    assert world.refs() == before, "a branch or tag changed"


def test_debug_shows_the_traceback_the_plain_run_hides(world, in_tmp):
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        main(["--debug", "status", "org/no-such-repo"])


END_TO_END = [
    Case("coopt-hub status of a private repo without a token", r"Repository not found", "private repos need HF_TOKEN",
         ("status", "{private}"), code=3),
    Case("coopt-hub init --shards 0", r"Invalid value for '--shards'", USAGE_HINT, (*INIT, "--shards", "0", "--anchors",
                                                                                   "8"), code=2),
    Case("coopt-hub push of a truncated result", r"not a readable safetensors file", "optimize", PUSH,
         setup=truncate_targets),
]


@pytest.mark.parametrize("case", END_TO_END, ids=lambda case: case.name)
def test_console_script_reports_bad_input_the_same_way(world, tmp_path, case):
    if case.setup is not None:
        case.setup(world, tmp_path)
    before = world.refs()
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "COOPT_HUB_DEBUG")}
    done = subprocess.run([str(BIN / "coopt-hub"), *fill(case.argv, world, tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert_clear_error(Outcome(done.returncode, done.stdout, done.stderr), case)
    assert world.refs() == before, "a branch or tag changed"


# Library calls ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    name: str
    call: Callable[[World, Path], object]
    error: type[errors.CoOptError]
    message: str  # regex on str(error)
    hint: str  # text the error's hint must contain


def damaged_chunk(world: World, tmp: Path) -> None:
    shutil.copytree(world.result, tmp / "work")
    chunk = sorted((tmp / "work").rglob("chunks/unit-*.safetensors"))[0]
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    optimize_shard(world.hub, world.repos["repo"], 1, PixelPrior(PriorSpec(PIXEL_MODEL)), workdir=tmp / "work")


def nan_shard(world: World, tmp: Path) -> None:
    from coopt_hub.core.shardfile import (
        AnchorOutputs,
        ShardResult,
        read_shard,
        write_shard,
    )

    (directory,) = world.result.glob(f"*/shard-00001/*/result/{shard_prefix(1)}")
    result, anchors = read_shard(directory)
    result.aligned = result.aligned.astype(np.float32)
    result.aligned[2, 2] = np.inf
    write_shard(tmp, ShardResult(result.header, result.ids, result.raw, result.aligned),
                AnchorOutputs(anchors.ids, anchors.features, anchors.projected))


def edited_plan(world: World, tmp: Path) -> None:
    from coopt_hub.core.plan import Plan
    from coopt_hub.hub.repo import load_plan

    data = json.loads(load_plan(world.hub, world.repos["repo"]).to_json())
    Plan.from_json(json.dumps({**data, "num_shards": 500}))


def call_initialize(**overrides) -> Callable[[World, Path], object]:
    from coopt_hub.platform.init import initialize

    def call(world: World, tmp: Path) -> object:
        arguments = dict(source=world.repos["source"], source_revision=None, split="train", image_column="image",
                         shards=2, anchors=32, dim=16, seed=0, temperature=2.0)
        return initialize(world.hub, f"org/bad-lib-{uuid.uuid4().hex[:8]}", **{**arguments, **overrides})

    return call


def status_of(placeholder: str) -> Callable[[World, Path], object]:
    from coopt_hub.platform.status import collaboration_status

    return lambda world, tmp: collaboration_status(world.hub, world.repos[placeholder])


def load_real_prior(**spec) -> Callable[[World, Path], object]:
    from coopt_hub.priors import load_prior

    precision = spec.pop("precision", "fp32")
    return lambda world, tmp: load_prior(PriorSpec(**spec), precision=precision)


LIBRARY_CASES = [
    Call("initialize with an anchor fraction of 0", call_initialize(anchors=0.0), errors.PlanError,
         r"anchor fraction must lie strictly between 0 and 1", "fraction such as 0.01"),
    Call("initialize with a revision that is no commit", call_initialize(source_revision="f" * 40), errors.SourceError,
         r"f{40}", "--source-revision"),
    Call("a prior that puts out NaN", lambda world, tmp: optimize_shard(
        world.hub, world.repos["repo"], 1, NanPixelPrior(PriorSpec(PIXEL_MODEL)), workdir=tmp / "work"),
         errors.PriorError, r"NaN or infinite outputs for \d+ sample\(s\): ids \d+", "bf16 or fp32"),
    Call("a finished chunk damaged on disk", damaged_chunk, errors.ShardFileError,
         r"unit-\d+\.safetensors is damaged \(checksum mismatch\); it has been discarded", "Rerun the same command"),
    Call("infinite targets handed to write_shard", nan_shard, errors.ShardFileError,
         r"tensor 'aligned' holds NaN or infinite values", "precision fp32"),
    Call("a plan edited to more shards than rows", edited_plan, errors.PlanError,
         r"not a valid plan: Cannot split 240 rows into 500 shards", "Use at most 240 shards"),
    Call("a checkpoint that does not exist", load_real_prior(model="ViT-S-32", checkpoint="/no/such.pt"),
         errors.PriorError, r"checkpoint /no/such\.pt does not exist", "state dict"),
    Call("fp16 on a CPU", load_real_prior(model="ViT-S-32", precision="fp16"), errors.ConfigError,
         r"fp16 needs a CUDA device", "bf16 or fp32"),
    Call("a prior record with unknown settings", lambda world, tmp: PriorSpec.from_dict({"model": "x", "colour": 1}),
         errors.ConfigError, r"Unknown prior settings \['colour'\]", "upgrade"),
    Call("a tag that exists", lambda world, tmp: world.hub.create_tag(world.repos["repo"], "v1", world.hub.head(
        world.repos["repo"]), "again"), errors.ConflictError, r"Tag v1 already exists", "another --tag"),
    Call("status over a hand-made manifest", status_of("manifest"), errors.VerificationError,
         r"coopt/manifest\.json is not a manifest written by coopt-hub merge", "last vN tag"),
]


@pytest.mark.parametrize("case", LIBRARY_CASES, ids=lambda case: case.name)
def test_library_bad_input_raises_a_clear_error_and_changes_nothing(world, tmp_path, case):
    before = world.refs()
    with pytest.raises(case.error) as raised:
        case.call(world, tmp_path)
    assert re.search(case.message, str(raised.value)), str(raised.value)
    assert raised.value.hint, "the error has no next step"
    assert case.hint in raised.value.hint, raised.value.hint
    assert world.refs() == before, "a branch or tag changed"


# Raw requests to the server ------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    name: str
    method: str
    path: str  # may name {repo} (a public collaboration) or {private}
    status: int
    message: str  # text the answer must carry
    body: bytes = b""
    token: str | None = "session"  # "session": the hub's write token; None: no Authorization header
    headers: tuple[tuple[str, str], ...] = ()


DEEP = b"[" * 100_000
HEADER_LINE = b'{"key": "header", "value": {"summary": "bad"}}\n'

SERVER_CASES = [
    Request("JSON nested 100k deep", "POST", "/api/repos/create", 400, "nested too deeply", DEEP),
    Request("commit line nested 100k deep", "POST", "/api/datasets/{repo}/commit/main", 400, "not valid JSON",
            HEADER_LINE + DEEP + b"\n"),
    Request("LFS batch nested 100k deep", "POST", "/datasets/{repo}.git/info/lfs/objects/batch", 400,
            "nested too deeply", DEEP),
    Request("README metadata nested 5k deep", "POST", "/api/validate-yaml", 400, "nested too deeply",
            json.dumps({"content": "---\na: " + "[" * 5000 + "\n---\n"}).encode()),
    Request("body announced at 2 GiB", "POST", "/api/repos/create", 413, "larger than the server limit",
            headers=(("Content-Length", str(2 << 30)),)),
    Request("commit on a parent that is not the head", "POST", "/api/datasets/{repo}/commit/main", 412,
            "A commit has happened since", b'{"key": "header", "value": {"summary": "s", "parentCommit": "'
            + b"a" * 40 + b'"}}\n'),
    Request("commit with a token the hub does not know", "POST", "/api/datasets/{repo}/commit/main", 401,
            "Invalid credentials", HEADER_LINE, token="hf_not_a_token"),
    Request("commit without a token", "POST", "/api/datasets/{repo}/commit/main", 401, "Authentication required",
            HEADER_LINE, token=None),
    Request("LFS upload URL that expired", "PUT", "/datasets/{repo}.git/info/lfs/objects/" + "a" * 64
            + "?size=3&expires=1000&sig=00", 403, "expired", b"abc", token=None),
    Request("private repo info without a token", "GET", "/api/datasets/{private}", 404, "not found", token=None),
    Request("private file without a token", "GET", "/datasets/{private}/resolve/main/secret.txt", 404, "not found",
            token=None),
    Request("private tree without a token", "GET", "/api/datasets/{private}/tree/main", 404, "not found", token=None),
    Request("private refs with a wrong token", "GET", "/api/datasets/{private}/refs", 401, "Invalid credentials",
            token="hf_not_a_token"),
    Request("deleting main", "DELETE", "/api/datasets/{repo}/branch/main", 403, "it is the default branch"),
    Request("a tag named like a branch ref", "POST", "/api/datasets/{repo}/tag/main", 400, "Invalid tag name",
            b'{"tag": "refs/heads/main"}'),
    Request("a repo named x.git", "POST", "/api/repos/create", 400, "must not end with",
            b'{"name": "x.git", "organization": "org", "type": "dataset"}'),
    Request("a repo name in another script", "POST", "/api/repos/create", 400, "Invalid repo name",
            json.dumps({"name": "名前", "organization": "org", "type": "dataset"}).encode()),
    Request("a commit to a revision with '..'", "POST", "/api/datasets/{repo}/commit/main..x", 404, "not found",
            HEADER_LINE),
]


def send(endpoint: str, request: Request, world: World, token: str) -> tuple[int, dict[str, str], bytes]:
    url = urlparse(endpoint)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    headers = dict(request.headers)
    if request.token is not None:
        headers["Authorization"] = f"Bearer {token if request.token == 'session' else request.token}"
    path = request.path.format(**world.names)
    if "Content-Length" in headers:  # announce a body that is never sent
        connection.putrequest(request.method, path)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
    else:
        connection.request(request.method, path, body=request.body, headers=headers)
    response = connection.getresponse()
    answer = response.status, dict(response.headers), response.read()
    connection.close()
    return answer


@pytest.mark.parametrize("request_", SERVER_CASES, ids=lambda request: request.name)
def test_server_bad_request_gets_a_4xx_that_says_why_and_changes_nothing(world, hub_server, request_):
    before = world.refs()
    status, headers, body = send(hub_server.endpoint, request_, world, hub_server.token)
    assert status == request_.status, body[:500]
    assert request_.message in body.decode("utf-8", "replace"), body[:500]
    assert b"Traceback" not in body, "the answer carries a traceback"
    assert SECRET not in body, "the answer carries the private repo's content"
    assert hub_server.token.encode() not in body, "the answer carries the token"
    assert world.refs() == before, "a branch or tag changed"


def test_a_readme_with_unreadable_metadata_is_refused_at_commit(world, hub_server, new_repo_id):
    """Such a README once made every repo info a 500; the hub now refuses it when it is committed
    (a 4xx naming README.md), and the repo stays as it was."""
    import base64

    repo = new_repo_id("deep-card")
    world.hub.ensure_repo(repo)
    before = world.hub.head(repo)
    readme = ("---\nlicense: " + "[" * 5000 + "\n---\n# card\n").encode()
    line = {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(readme).decode()}}
    commit = Request("", "POST", f"/api/datasets/{repo}/commit/main", 400, "error",
                     HEADER_LINE + json.dumps(line).encode() + b"\n")
    status, _, body = send(hub_server.endpoint, commit, world, hub_server.token)
    assert 400 <= status < 500, f"the raw commit was not refused: {status} {body[:500]!r}"
    assert b"README.md" in body, f"the refusal does not name the README: {body[:500]!r}"
    assert world.hub.head(repo) == before, "the refused commit moved main"
    info = world.hub.api.dataset_info(repo)
    assert info.card_data is None or not info.card_data.to_dict(), "the repo gained card data"


# RELIABILITY.md ---------------------------------------------------------------------------------------


def test_reliability_report_matches_the_tables():
    """RELIABILITY.md's figures and scenario lists are the suite's tables: the page cannot go stale."""
    figures = {
        "Participant killed (SIGKILL) at a stage of `optimize`, then the same command rerun":
            len(reliability.OPTIMIZE_KILLS),
        "Hub process killed (SIGKILL) mid-push and restarted; the push completes by itself":
            len(reliability.SERVER_KILLS),
        "Hub down (connection refused) when a client call starts": len(reliability.OUTAGE_CALLS),
        "Connection cut once in the middle of a push": len(reliability.NETWORK_CUTS),
        "Merge killed (SIGKILL) at a stage, then rerun": len(reliability.MERGE_KILLS),
        "Participants pushing while a merge runs": reliability.RACERS,
        "Bad command lines, run in process": len(CLI_CASES),
        "Bad command lines, run as `coopt-hub` processes": len(END_TO_END),
        "Bad library calls": len(LIBRARY_CASES),
        "Bad raw requests to the server": len(SERVER_CASES),
        "Fuzzed structured requests (method, route, odd encodings, headers, body)":
            reliability.FUZZ_EXAMPLES["structured requests"],
        "Fuzzed raw request bytes (request line and headers)": reliability.FUZZ_EXAMPLES["raw request bytes"],
        "Fuzzed commit payloads (NDJSON)": reliability.FUZZ_EXAMPLES["commit payloads"],
    }
    report = (Path(__file__).parent.parent / "RELIABILITY.md").read_text()
    table = report.split("## Figures", 1)[1].split("\n## ", 1)[0]
    written = {label: int(count) for label, count in re.findall(r"^\| (.+?) \| (\d+) \|$", table, re.MULTILINE)}
    assert written == figures, "update the table in RELIABILITY.md:\n" + "\n".join(
        f"| {label} | {count} |" for label, count in figures.items())
    listed = set(re.findall(r"^- (.+)$", report, re.MULTILINE))
    scenarios = [*reliability.OPTIMIZE_KILLS, *reliability.SERVER_KILLS, *reliability.NETWORK_CUTS,
                 *reliability.MERGE_KILLS]
    unlisted = {fault.name for fault in scenarios} - listed
    assert not unlisted, f"RELIABILITY.md does not list the scenario(s) {sorted(unlisted)}"
    cases = len(CLI_CASES) + len(END_TO_END) + len(LIBRARY_CASES) + len(SERVER_CASES)
    assert cases >= 30, "the bad-input tables shrank"
