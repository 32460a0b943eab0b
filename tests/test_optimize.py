"""`optimize` / `push` / `join` end to end: real random-init open_clip priors of two architectures
(ViT-S-32: 384 outputs, ViT-M-32: 512) label the digits source on the embedded hub."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from helpers_hub import start_collaboration

from coopt_hub.cli import cli
from coopt_hub.core.align import apply_alignment, fit_alignment
from coopt_hub.core.layout import PLAN_PATH, TARGETS_FILE, remote_paths, shard_prefix
from coopt_hub.core.shardfile import read_shard
from coopt_hub.errors import BadImageError, ConflictError, PlanError, PriorError, SourceError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import read_remote_header
from coopt_hub.participant.job import OptimizeOptions, optimize_shard
from coopt_hub.participant.labeling import ChunkStore
from coopt_hub.participant.workdir import run_directory
from coopt_hub.platform.status import DONE, collaboration_status
from coopt_hub.priors import Prior, PriorSpec, load_prior

# Seed 0 is what the command line builds from `--model ViT-S-32 --image-size 32`.
SMALL = PriorSpec(model="ViT-S-32", image_size=32)
MEDIUM = PriorSpec(model="ViT-M-32", image_size=32)
SMALL_ARGS = ["--model", "ViT-S-32", "--image-size", "32"]


@pytest.fixture(scope="module")
def hub(hub_server) -> Hub:
    return Hub(token=hub_server.token)


def publish_digits(hub: Hub, rows: int, rows_per_group: int, broken: tuple[int, ...] = ()) -> str:
    """The first `rows` scikit-learn digits as 16 px RGB PNGs in small row groups; `broken` rows hold junk."""
    from huggingface_hub import CommitOperationAdd

    from coopt_hub.demo.sample_data import digits_images

    images, _ = digits_images(16)
    cells = []
    for i, image in enumerate(images[:rows]):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        cells.append({"bytes": b"this is not a png" if i in broken else buffer.getvalue(), "path": None})
    table = pa.table({"image": pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=rows_per_group)
    repo = f"org/digits-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(repo)
    file = "data/train-00000-of-00001.parquet"
    hub.commit(repo, "main", lambda head: [CommitOperationAdd(file, buffer.getvalue())], "digits")
    return repo


@pytest.fixture(scope="module")
def source(hub) -> str:
    # 600 rows in 12 row groups: 4 shards of 3 storage units each, small enough to label in seconds.
    return publish_digits(hub, rows=600, rows_per_group=50)


@pytest.fixture(scope="module")
def small() -> Prior:
    return load_prior(SMALL)


@pytest.fixture(scope="module")
def medium() -> Prior:
    return load_prior(MEDIUM)


def collaboration(hub: Hub, source: str, **settings):
    options = {"shards": 4, "anchors": 32, "dim": 16, **settings}
    return start_collaboration(hub, f"org/digits-coopt-{uuid.uuid4().hex[:8]}", source, **options)


@pytest.fixture(scope="module")
def quiet(hub, source):
    """A collaboration nobody pushes to, so every result in it is its own reference."""
    return collaboration(hub, source)


@pytest.fixture(scope="module")
def clean(hub, quiet, small, tmp_path_factory):
    """Shard 1 of `quiet` labeled by ViT-S-32 in one uninterrupted single-process run."""
    return optimize_shard(hub, quiet.repo, 1, small, workdir=tmp_path_factory.mktemp("clean"))


def targets_bytes(result_dir: Path, shard: int) -> bytes:
    return (result_dir / shard_prefix(shard) / TARGETS_FILE).read_bytes()


class Wrapped(Prior):
    """A real prior with its outputs changed by `alter`; a different prior as far as coopt-hub can tell."""

    def __init__(self, inner: Prior, tag: str):
        self.inner = inner
        self.spec, self.preprocessing, self.output_dim = inner.spec, inner.preprocessing, inner.output_dim
        self.fingerprint, self.random_init = f"{tag}-{inner.fingerprint}", inner.random_init

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def encode_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.alter(self.inner.encode_batch(pixels))

    def alter(self, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Collapsed(Wrapped):
    """Outputs pulled towards one direction: a clearly worse (higher-V) prior than the one it wraps."""

    def __init__(self, inner: Prior):
        super().__init__(inner, "collapsed")
        self.direction = torch.nn.functional.normalize(torch.ones(inner.output_dim), dim=0)

    def alter(self, out: torch.Tensor) -> torch.Tensor:
        return out + 2 * out.norm(dim=1, keepdim=True) * self.direction


class NanAt(Wrapped):
    """NaN for one row of every batch."""

    def __init__(self, inner: Prior, row: int):
        super().__init__(inner, "nan")
        self.row = row

    def alter(self, out: torch.Tensor) -> torch.Tensor:
        out[self.row] = float("nan")
        return out


def test_push_is_one_commit_aligned_to_the_best_prior_and_not_repeated(hub, hf_api, source, small, medium, tmp_path):
    collab = collaboration(hub, source)
    repo, main = collab.repo, hub.head(collab.repo)

    first = optimize_shard(hub, repo, 0, small, workdir=tmp_path,
                           options=OptimizeOptions(push=True, participant="alice"))
    assert first.pushed and first.report["reference"] is None and first.report["residual"] == 0.0
    history = [c.commit_id for c in hf_api.list_repo_commits(repo, revision="shard/0", repo_type="dataset")]
    assert history[:2] == [first.commit, main]
    added = set(hf_api.list_repo_files(repo, revision=first.commit, repo_type="dataset")) - set(
        hf_api.list_repo_files(repo, revision=main, repo_type="dataset"))
    assert added == set(remote_paths(0))
    report = first.report
    assert report["participant"] == "alice" and report["counts"]["rows"] == len(collab.plan.shard_ids(0))
    assert report["prior"]["model"] == "ViT-S-32" and report["output_dim"] == 384 and report["images_per_s"] > 0
    assert report["fingerprint"] == small.fingerprint and report["tool_version"]
    assert set(report["files"]) == {"targets.safetensors", "anchors.safetensors"}

    # Another architecture with another output size, and a worse prior: it aligns to shard 0.
    worse = Collapsed(medium)
    second = optimize_shard(hub, repo, 1, worse, workdir=tmp_path, options=OptimizeOptions(push=True))
    assert second.report["uniformity"] > first.report["uniformity"]
    reference = second.report["reference"]
    assert (reference["shard"], reference["commit"], reference["fingerprint"]) == (0, first.commit, small.fingerprint)
    ours, our_anchors = read_shard(second.directory / shard_prefix(1))
    _, best_anchors = read_shard(first.directory / shard_prefix(0))
    assert ours.header.reference == {"shard": 0, "branch": "shard/0", "commit": first.commit,
                                     "fingerprint": small.fingerprint}
    assert ours.header.output_dim == 512 and ours.header.dim == collab.plan.dim
    transform, residual = fit_alignment(our_anchors.projected, best_anchors.projected)
    assert ours.header.residual == pytest.approx(residual) and 0 < residual < 1
    expected = apply_alignment(ours.raw.astype(np.float32), transform)
    np.testing.assert_allclose(ours.aligned.astype(np.float32), expected, rtol=2e-2, atol=2e-3)

    again = optimize_shard(hub, repo, 0, small, workdir=tmp_path, options=OptimizeOptions(push=True))
    assert not again.pushed and again.commit == first.commit == hub.head(repo, "shard/0")
    chunks = again.report["chunks"]
    assert chunks["computed"] == 0 and chunks["reused"] == chunks["total"]

    with pytest.raises(ConflictError, match="alice with ViT-S-32") as conflict:
        optimize_shard(hub, repo, 0, medium, workdir=tmp_path, options=OptimizeOptions(push=True))
    assert "--overwrite" in conflict.value.hint and hub.head(repo, "shard/0") == first.commit
    replaced = optimize_shard(hub, repo, 0, medium, workdir=tmp_path,
                              options=OptimizeOptions(push=True, overwrite=True))
    assert replaced.pushed and hub.head(repo, "shard/0") == replaced.commit != first.commit


def test_join_then_plain_optimize_then_push(hub, quiet, clean, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COOPT_HUB_REPO", raising=False)
    runner = CliRunner()
    joined = runner.invoke(cli, ["join", quiet.repo, *SMALL_ARGS, "--name", "bob", "--json"])
    assert joined.exit_code == 0, joined.output
    assert json.loads(joined.stdout)["free_shards"] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "coopt-hub.json").read_text())["prior"]["model"] == "ViT-S-32"

    made = runner.invoke(cli, ["optimize", "--shard", "1", "--json"])
    assert made.exit_code == 0, made.output
    summary = json.loads(made.stdout)
    assert not summary["pushed"] and summary["report"]["participant"] == "bob"
    assert Path(summary["directory"]).is_relative_to(tmp_path / "coopt-hub-work")
    assert targets_bytes(Path(summary["directory"]), 1) == targets_bytes(clean.directory, 1)
    assert hub.head(quiet.repo, "shard/1") is None

    pushed = runner.invoke(cli, ["push", "--shard", "1", "--json"])
    assert pushed.exit_code == 0, pushed.output
    commit = json.loads(pushed.stdout)["commit"]
    assert json.loads(pushed.stdout)["pushed"] and hub.head(quiet.repo, "shard/1") == commit
    repeated = runner.invoke(cli, ["push", "--shard", "1", "--json"])
    assert repeated.exit_code == 0 and not json.loads(repeated.stdout)["pushed"]
    assert hub.head(quiet.repo, "shard/1") == commit
    # Undo, so that every result in `quiet` stays its own reference for the other tests.
    hub.api.delete_branch(quiet.repo, branch="shard/1", repo_type="dataset")


ACCELERATE_JOB = """
import os, sys
from coopt_hub.cli import main
# Each rank gets its own work directory, as on machines that share no filesystem.
main(sys.argv[1:] + ["--workdir", os.path.join({base!r}, "rank" + os.environ["RANK"])])
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_accelerate_processes_give_the_same_targets_as_one(quiet, clean, small, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(ACCELERATE_JOB.format(base=str(tmp_path)))
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               str(script), "optimize", "--repo", quiet.repo, "--shard", "1", *SMALL_ARGS, "--json"]
    # CPU kernels split their sums by thread count: the processes use as many threads as the
    # single-process run did, so that the comparison is exact.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["report"]["run"]["world_size"] == 2
    assert targets_bytes(Path(summary["directory"]), 1) == targets_bytes(clean.directory, 1)
    # Rank 1 kept only its own chunks; rank 0 received the rest over the process group.
    rank_stores = [ChunkStore(run_directory(tmp_path / f"rank{r}", quiet.repo, 1, quiet.plan, small)) for r in (0, 1)]
    names = sorted(p.stem for p in rank_stores[0].markers.iterdir())
    assert names == sorted(p.stem for p in ChunkStore(clean.directory.parent).markers.iterdir())
    in_job_order = [n for n in names if n.startswith("unit-")] + [n for n in names if n.startswith("anchors-")]
    assert sorted(p.stem for p in rank_stores[1].markers.iterdir()) == sorted(in_job_order[1::2])


KILLABLE_JOB = """
import sys, time
from pathlib import Path
from coopt_hub.hub.client import Hub
from coopt_hub.participant.job import OptimizeOptions, optimize_shard
from coopt_hub.priors import Prior, PriorSpec, load_prior

class Slow(Prior):
    # The same prior, slowed down so that the test can kill it half-way.
    def __init__(self, inner):
        self.inner = inner
        for name in ("spec", "preprocessing", "output_dim", "fingerprint", "random_init", "precision"):
            setattr(self, name, getattr(inner, name))

    def preprocess(self, image):
        return self.inner.preprocess(image)

    def encode_batch(self, pixels):
        time.sleep(1.5)
        return self.inner.encode_batch(pixels)

prior = Slow(load_prior(PriorSpec(model="ViT-S-32", image_size=32)))
optimize_shard(Hub(), {repo!r}, 1, prior, workdir=Path({workdir!r}))
"""


def test_killed_run_resumes_without_recomputing_and_matches_a_clean_run(hub, quiet, clean, small, tmp_path):
    workdir = tmp_path / "work"
    store = ChunkStore(run_directory(workdir, quiet.repo, 1, quiet.plan, small))
    job = subprocess.Popen([sys.executable, "-c", KILLABLE_JOB.format(repo=quiet.repo, workdir=str(workdir))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and job.poll() is None:
        if store.markers.is_dir() and any(store.markers.glob("*.json")):
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed: " + job.stderr.read().decode()[-2000:]
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = {p.stem: store.data_path(p.stem).stat().st_mtime_ns for p in store.markers.glob("*.json")}
    total = clean.report["chunks"]["total"]
    assert 1 <= len(finished) < total

    resumed = optimize_shard(hub, quiet.repo, 1, small, workdir=workdir)
    assert resumed.report["chunks"] == {"total": total, "computed": total - len(finished), "reused": len(finished)}
    assert {name: store.data_path(name).stat().st_mtime_ns for name in finished} == finished
    assert targets_bytes(resumed.directory, 1) == targets_bytes(clean.directory, 1)


def test_non_finite_prior_outputs_name_the_ids(hub, quiet, small, tmp_path):
    first_unit = next(i for i, k in enumerate(quiet.plan.unit_shards) if k == 2)
    bad_id = quiet.plan.units[first_unit].start + 3
    with pytest.raises(PriorError, match=rf"ids {bad_id}\b"):
        optimize_shard(hub, quiet.repo, 2, NanAt(small, row=3), workdir=tmp_path)


def test_shard_out_of_range_and_missing_plan_fail_before_any_model_is_loaded(hub, quiet, hub_server, tmp_path,
                                                                             capsys):
    from coopt_hub.cli import main

    def must_not_load():
        raise AssertionError("the prior was loaded")

    with pytest.raises(PlanError, match="Shard 4 does not exist"):
        optimize_shard(hub, quiet.repo, 4, must_not_load, workdir=tmp_path)
    empty = f"org/empty-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(empty)
    with pytest.raises(PlanError, match="No CoOpt plan"):
        optimize_shard(hub, empty, 0, must_not_load, workdir=tmp_path)

    with pytest.raises(SystemExit) as exited:
        main(["optimize", "--repo", quiet.repo, "--shard", "7", *SMALL_ARGS, "--workdir", str(tmp_path)])
    error = capsys.readouterr().err
    assert exited.value.code == 1 and "Error: Shard 7 does not exist" in error and "Next step:" in error


def test_pinned_source_commit_gone_is_an_error(hub, quiet, tmp_path):
    from huggingface_hub import CommitOperationAdd

    moved = replace(quiet.plan, source_revision="0" * 40)
    repo = f"org/unpinned-{uuid.uuid4().hex[:8]}"
    hub.ensure_repo(repo)
    hub.commit(repo, "main", lambda head: [CommitOperationAdd(PLAN_PATH, moved.to_json().encode())], "plan")
    with pytest.raises(SourceError, match="can no longer be read"):
        optimize_shard(hub, repo, 0, lambda: pytest.fail("the prior was loaded"), workdir=tmp_path)


BROKEN = (5, 27)


@pytest.fixture(scope="module")
def broken(hub):
    """40 digits in 4 row groups, two of them undecodable; 8 anchors for 16 dimensions."""
    source = publish_digits(hub, rows=40, rows_per_group=10, broken=BROKEN)
    return start_collaboration(hub, f"org/broken-coopt-{uuid.uuid4().hex[:8]}", source, shards=2, anchors=8, dim=16)


class Recorder:
    def __init__(self):
        self.infos: list[str] = []
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        self.infos.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def test_undecodable_images_stop_the_job_or_are_skipped_and_recorded(hub, broken, small, tmp_path):
    plan = broken.plan
    shard = plan.unit_shards[0]  # the shard holding row 5
    reached = set(plan.shard_ids(shard)) | set(plan.anchor_ids)
    expected = sorted(i for i in BROKEN if i in reached)
    with pytest.raises(BadImageError, match=r"cannot be decoded: ids 5\b") as refused:
        optimize_shard(hub, broken.repo, shard, small, workdir=tmp_path)
    assert 5 in refused.value.ids and set(refused.value.ids) <= set(expected)
    assert "--on-bad-image skip" in refused.value.hint

    messages = Recorder()
    skipped = optimize_shard(hub, broken.repo, shard, small, workdir=tmp_path, messages=messages,
                             options=OptimizeOptions(on_bad_image="skip"))
    report = skipped.report
    recorded = report["skipped_ids"]["shard"] + report["skipped_ids"]["anchors"]
    assert sorted(set(recorded)) == expected and report["counts"]["skipped"] == len(recorded)
    assert report["counts"]["rows"] == len(plan.shard_ids(shard)) - len(report["skipped_ids"]["shard"])
    assert report["chunks"]["reused"] >= 1  # the chunk stored before the refusal is not encoded again
    result, anchors = read_shard(skipped.directory / shard_prefix(shard))
    assert not set(recorded) & set(result.ids) and not set(recorded) & set(anchors.ids)
    assert any("anchors for 16 target dimensions" in w for w in messages.warnings)
    assert any("Skipped" in w for w in messages.warnings)
    assert result.header.skipped_ids == sorted(report["skipped_ids"]["shard"]) and 5 in result.header.skipped_ids

    # The rows the plan gives the shard less the skipped ones are the whole result: it pushes and counts as done.
    pushed = CliRunner().invoke(cli, ["push", "--repo", broken.repo, "--shard", str(shard),
                                      "--workdir", str(tmp_path), "--json"])
    assert pushed.exit_code == 0, pushed.output
    commit = json.loads(pushed.stdout)["commit"]
    header = read_remote_header(hub, broken.repo, commit, remote_paths(shard).targets)
    assert header.skipped_ids == result.header.skipped_ids and header.num_rows == result.ids.size
    status = collaboration_status(hub, broken.repo).shards[shard]
    assert status.state == DONE and status.skipped == len(header.skipped_ids)


def test_source_main_moving_on_is_a_note_and_reading_stays_at_the_pin(hub, broken, small, tmp_path):
    from huggingface_hub import CommitOperationAdd

    hub.commit(broken.source, "main", lambda head: [CommitOperationAdd("README.md", b"# moved on\n")], "edit")
    shard = 1 - broken.plan.unit_shards[0]
    result = optimize_shard(hub, broken.repo, shard, small, workdir=tmp_path,
                            options=OptimizeOptions(on_bad_image="skip"))
    assert any("moved on" in note and broken.plan.source_revision[:8] in note for note in result.notes)
    assert result.report["source"]["revision"] == broken.plan.source_revision


def test_repo_and_prior_come_from_options_then_environment_then_the_saved_config(tmp_path, monkeypatch):
    from coopt_hub.errors import ConfigError
    from coopt_hub.participant.config import (
        CONFIG_FILE,
        REPO_ENV,
        ParticipantConfig,
        load_config,
        resolve_prior,
        resolve_repo,
        save_config,
    )

    monkeypatch.delenv(REPO_ENV, raising=False)
    with pytest.raises(ConfigError, match="No CoOpt repo"):
        resolve_repo(None, None)
    with pytest.raises(ConfigError, match="No prior"):
        resolve_prior(None, None, None, None, None)
    saved = ParticipantConfig(repo="org/saved", prior=PriorSpec("ViT-S-32", pretrained="openai"), name="carol")
    save_config(saved, tmp_path)
    config = load_config(tmp_path)
    assert config == saved
    assert resolve_repo(None, config) == "org/saved"
    monkeypatch.setenv(REPO_ENV, "org/from-env")
    assert resolve_repo(None, config) == "org/from-env" and resolve_repo("org/option", config) == "org/option"
    assert resolve_prior(None, None, None, 64, config) == PriorSpec("ViT-S-32", pretrained="openai", image_size=64)
    # A model named on the command line does not inherit weights saved for another model.
    assert resolve_prior("ViT-M-32", None, None, None, config) == PriorSpec("ViT-M-32")
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid"):
        load_config(tmp_path)
