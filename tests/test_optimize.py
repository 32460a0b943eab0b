"""`optimize` / `push` / `join` end to end: real random-init open_clip priors of two architectures
(ViT-S-32: 384 outputs, ViT-M-32: 512) label the digits source on the embedded hub."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fakes import Collapsed, NanAt, RecordingProgress
from helpers_hub import publish_digit_rows
from network_faults import free_port

from coopt_hub.cli import cli
from coopt_hub.core.align import select_alignment
from coopt_hub.core.layout import PLAN_PATH, TARGETS_FILE, remote_paths, shard_prefix
from coopt_hub.core.shardfile import read_shard
from coopt_hub.errors import BadImageError, ConflictError, PlanError, PriorError, SourceError
from coopt_hub.hub.repo import read_remote_header
from coopt_hub.participant.job import DEVIATION_ANCHORS, OptimizeOptions, load_job_prior, optimize_shard
from coopt_hub.participant.labeling import ChunkStore
from coopt_hub.participant.workdir import run_directory
from coopt_hub.platform.status import DONE, collaboration_status
from coopt_hub.priors import Prior, PriorSpec, load_prior

TESTS = Path(__file__).parent

# Seed 0 is what the command line builds from `--model ViT-S-32 --image-size 32`.
SMALL = PriorSpec(model="ViT-S-32", image_size=32)
MEDIUM = PriorSpec(model="ViT-M-32", image_size=32)
SMALL_ARGS = ["--model", "ViT-S-32", "--image-size", "32"]


@pytest.fixture(scope="module")
def source(hub) -> str:
    # 600 rows in 12 row groups: 4 shards of 3 storage units each, small enough to label in seconds.
    return publish_digit_rows(hub, rows=600, rows_per_group=50)


@pytest.fixture(scope="module")
def small() -> Prior:
    return load_prior(SMALL)


@pytest.fixture(scope="module")
def medium() -> Prior:
    return load_prior(MEDIUM)


@pytest.fixture(scope="module")
def collaboration(source, new_collaboration):
    """Factory: a new collaboration over `source`, 4 shards, 32 anchors, 16 dimensions unless told otherwise."""

    def make(**settings):
        return new_collaboration(source, "digits-coopt", **{"shards": 4, "anchors": 32, "dim": 16, **settings})

    return make


@pytest.fixture(scope="module")
def quiet(collaboration):
    """A collaboration nobody pushes to, so every result in it is its own reference."""
    return collaboration()


@pytest.fixture(scope="module")
def clean(hub, quiet, small, tmp_path_factory):
    """Shard 1 of `quiet` labeled by ViT-S-32 in one uninterrupted single-process run."""
    return optimize_shard(hub, quiet.repo, 1, small, workdir=tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def fast() -> Prior:
    """SMALL as the command line runs it by default: --precision auto (bf16 on a CPU with native bf16)."""
    return load_job_prior(SMALL, "cpu", "auto")


@pytest.fixture(scope="module")
def clean_fast(hub, quiet, fast, tmp_path_factory):
    """Shard 1 of `quiet` labeled by `fast` in one uninterrupted single-process run."""
    return optimize_shard(hub, quiet.repo, 1, fast, workdir=tmp_path_factory.mktemp("clean-fast"))


def targets_bytes(result_dir: Path, shard: int) -> bytes:
    return (result_dir / shard_prefix(shard) / TARGETS_FILE).read_bytes()


@pytest.mark.slow
def test_push_is_one_commit_aligned_to_the_best_prior_and_not_repeated(hub, hf_api, collaboration, small, medium,
                                                                       tmp_path):
    collab = collaboration()
    repo, main = collab.repo, hub.head(collab.repo)

    first = optimize_shard(hub, repo, 0, small, workdir=tmp_path,
                           options=OptimizeOptions(push=True, participant="alice"))
    assert first.pushed, "first push: nothing pushed"
    assert first.report["reference"] is None, "first push: aligned to a reference, though it is the only shard"
    assert first.report["residual"] == 0.0, "first push: a residual, though it is its own reference"
    history = [c.commit_id for c in hf_api.list_repo_commits(repo, revision="shard/0", repo_type="dataset")]
    assert history[:2] == [first.commit, main], "first push: not one commit on top of main"
    added = set(hf_api.list_repo_files(repo, revision=first.commit, repo_type="dataset")) - set(
        hf_api.list_repo_files(repo, revision=main, repo_type="dataset"))
    assert added == set(remote_paths(0)), "first push: other files than the shard's"
    report = first.report
    assert report["participant"] == "alice", "report: participant"
    assert report["counts"]["rows"] == len(collab.plan.shard_ids(0)), "report: rows"
    assert report["prior"]["model"] == "ViT-S-32", "report: prior"
    assert report["output_dim"] == 384, "report: output_dim"
    assert report["images_per_s"] > 0, "report: images_per_s"
    assert report["fingerprint"] == small.fingerprint, "report: fingerprint"
    assert report["tool_version"], "report: tool_version"
    assert set(report["files"]) == {"targets.safetensors", "anchors.safetensors"}, "report: files"

    # Another architecture with another output size, and a worse prior: it aligns to shard 0.
    worse = Collapsed(medium)
    second = optimize_shard(hub, repo, 1, worse, workdir=tmp_path, options=OptimizeOptions(push=True))
    assert second.report["uniformity"] > first.report["uniformity"], "the collapsed prior is not worse"
    reference = second.report["reference"]
    assert (reference["shard"], reference["commit"], reference["fingerprint"]) == \
        (0, first.commit, small.fingerprint), "second push: not aligned to shard 0"
    ours, our_anchors = read_shard(second.directory / shard_prefix(1))
    _, best_anchors = read_shard(first.directory / shard_prefix(0))
    assert ours.header.reference == {"shard": 0, "branch": "shard/0", "commit": first.commit,
                                     "fingerprint": small.fingerprint}, "second push: header reference"
    assert ours.header.output_dim == 512, "second push: header output_dim"
    assert ours.header.dim == collab.plan.dim, "second push: header dim"
    fit = select_alignment(our_anchors.projected, best_anchors.projected)
    assert ours.header.alignment == fit.to_dict(), "second push: the header's alignment is not the selected one"
    assert ours.header.residual == pytest.approx(fit.residual), "second push: header residual"
    assert 0 < ours.header.cv_residual < 1, "second push: held-out residual out of range"
    expected = fit.apply(ours.raw.astype(np.float32))
    np.testing.assert_allclose(ours.aligned.astype(np.float32), expected, rtol=2e-2, atol=2e-3,
                               err_msg="second push: aligned targets are not raw @ T")

    again = optimize_shard(hub, repo, 0, small, workdir=tmp_path, options=OptimizeOptions(push=True))
    assert not again.pushed, "same push again: pushed"
    assert again.commit == first.commit == hub.head(repo, "shard/0"), "same push again: the branch moved"
    chunks = again.report["chunks"]
    assert chunks["computed"] == 0, "same push again: chunks encoded again"
    assert chunks["reused"] == chunks["total"], "same push again: chunks not reused"

    with pytest.raises(ConflictError, match="alice with ViT-S-32") as conflict:
        optimize_shard(hub, repo, 0, medium, workdir=tmp_path, options=OptimizeOptions(push=True))
    assert "--overwrite" in conflict.value.hint, "push onto another's shard: the hint does not say --overwrite"
    assert hub.head(repo, "shard/0") == first.commit, "push onto another's shard: the branch moved"
    replaced = optimize_shard(hub, repo, 0, medium, workdir=tmp_path,
                              options=OptimizeOptions(push=True, overwrite=True))
    assert replaced.pushed, "--overwrite: nothing pushed"
    assert hub.head(repo, "shard/0") == replaced.commit != first.commit, "--overwrite: the branch did not move"


def test_join_then_plain_optimize_then_push(hub, quiet, clean_fast, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COOPT_HUB_REPO", raising=False)
    runner = CliRunner()
    joined = runner.invoke(cli, ["join", quiet.repo, *SMALL_ARGS, "--name", "bob", "--json"])
    assert joined.exit_code == 0, joined.output
    assert json.loads(joined.stdout)["free_shards"] == [0, 1, 2, 3], "join: free shards"
    assert json.loads((tmp_path / "coopt-hub.json").read_text())["prior"]["model"] == "ViT-S-32", "join: saved prior"

    made = runner.invoke(cli, ["optimize", "--shard", "1", "--json"])
    assert made.exit_code == 0, made.output
    summary = json.loads(made.stdout)
    assert not summary["pushed"], "optimize without --push pushed"
    assert summary["report"]["participant"] == "bob", "optimize: the joined name is not in the report"
    assert Path(summary["directory"]).is_relative_to(tmp_path / "coopt-hub-work"), "optimize: not the default workdir"
    assert targets_bytes(Path(summary["directory"]), 1) == targets_bytes(clean_fast.directory, 1), \
        "optimize: other targets"
    assert summary["report"]["precision"] == clean_fast.report["precision"], "optimize: not the default precision"
    deviation = read_shard(Path(summary["directory"]) / shard_prefix(1))[0].header.precision_deviation
    if summary["report"]["precision"] == "fp32":
        assert deviation is None, "an fp32 shard records a deviation"
    else:  # measured on the anchors against an fp32 forward, within what verify accepts
        assert deviation["anchors"] == min(DEVIATION_ANCHORS, len(quiet.plan.anchor_ids)), "deviation: anchors"
        assert 0 < deviation["mean_cosine_distance"] <= deviation["max_cosine_distance"] < 0.02, deviation
    timings = summary["report"]["timings"]
    assert {"plan_s", "model_load_s", "anchors_fetch_s", "first_batch_s"} <= set(timings), "fixed costs not reported"
    assert 0 < timings["first_batch_s"] < timings["labeling_s"], "first batch latency out of range"
    assert hub.head(quiet.repo, "shard/1") is None, "optimize without --push made a branch"

    pushed = runner.invoke(cli, ["push", "--shard", "1", "--json"])
    assert pushed.exit_code == 0, pushed.output
    commit = json.loads(pushed.stdout)["commit"]
    assert json.loads(pushed.stdout)["pushed"], "push: nothing pushed"
    assert hub.head(quiet.repo, "shard/1") == commit, "push: the branch is not at the commit"
    repeated = runner.invoke(cli, ["push", "--shard", "1", "--json"])
    assert repeated.exit_code == 0, repeated.output
    assert not json.loads(repeated.stdout)["pushed"], "push again: pushed"
    assert hub.head(quiet.repo, "shard/1") == commit, "push again: the branch moved"
    # Undo, so that every result in `quiet` stays its own reference for the other tests.
    hub.api.delete_branch(quiet.repo, branch="shard/1", repo_type="dataset")


ACCELERATE_JOB = """
import os, sys
from coopt_hub.cli import main
# Each rank gets its own work directory, as on machines that share no filesystem.
main(sys.argv[1:] + ["--workdir", os.path.join({base!r}, "rank" + os.environ["RANK"])])
"""


@pytest.mark.slow
def test_two_accelerate_processes_give_the_same_targets_as_one(quiet, clean_fast, fast, tmp_path):
    # The command line's default precision ("auto": bf16 on a CPU with native bf16) on both sides.
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
    assert summary["report"]["run"]["world_size"] == 2, "the job did not run as 2 processes"
    assert summary["report"]["precision"] == fast.precision, "the processes ran another precision"
    assert targets_bytes(Path(summary["directory"]), 1) == targets_bytes(clean_fast.directory, 1), "other targets"
    # Rank 1 kept only its own chunks; rank 0 received the rest over the process group.
    rank_stores = [ChunkStore(run_directory(tmp_path / f"rank{r}", quiet.repo, 1, quiet.plan, fast)) for r in (0, 1)]
    names = sorted(p.stem for p in rank_stores[0].markers.iterdir())
    assert names == sorted(p.stem for p in ChunkStore(clean_fast.directory.parent).markers.iterdir()), \
        "rank 0 does not hold every chunk"
    in_job_order = [n for n in names if n.startswith("unit-")] + [n for n in names if n.startswith("anchors-")]
    assert sorted(p.stem for p in rank_stores[1].markers.iterdir()) == sorted(in_job_order[1::2]), \
        "rank 1 holds other chunks than its own"


# The small prior, slowed down so that the test can kill the job half-way.
KILLABLE_JOB = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from fakes import Slow
from coopt_hub.hub.client import Hub
from coopt_hub.participant.job import load_job_prior, optimize_shard
from coopt_hub.priors import PriorSpec

prior = Slow(load_job_prior(PriorSpec(model="ViT-S-32", image_size=32), "cpu", "auto"))
optimize_shard(Hub(), {repo!r}, 1, prior, workdir=Path({workdir!r}))
"""


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing_and_matches_a_clean_run(hub, quiet, clean_fast, fast, tmp_path):
    # At the command line's default precision: a bf16 run resumes to the same bytes as well.
    workdir = tmp_path / "work"
    store = ChunkStore(run_directory(workdir, quiet.repo, 1, quiet.plan, fast))
    job = subprocess.Popen([sys.executable, "-c", KILLABLE_JOB.format(tests=str(TESTS), repo=quiet.repo,
                                                                      workdir=str(workdir))],
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
    total = clean_fast.report["chunks"]["total"]
    assert 1 <= len(finished) < total, "the job was not killed half-way"

    resumed = optimize_shard(hub, quiet.repo, 1, fast, workdir=workdir)
    assert resumed.report["chunks"] == {"total": total, "computed": total - len(finished), "reused": len(finished)}, \
        "the rerun did not reuse exactly the finished chunks"
    assert {name: store.data_path(name).stat().st_mtime_ns for name in finished} == finished, \
        "a finished chunk was written again"
    assert targets_bytes(resumed.directory, 1) == targets_bytes(clean_fast.directory, 1), \
        "other targets than a clean run"


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
    assert exited.value.code == 1, error
    assert "Error: Shard 7 does not exist" in error, error
    assert "Next step:" in error, error


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
def broken(hub, new_collaboration):
    """40 digits in 4 row groups, two of them undecodable; 8 anchors for 16 dimensions."""
    source = publish_digit_rows(hub, rows=40, rows_per_group=10, broken=BROKEN)
    return new_collaboration(source, "broken-coopt", shards=2, anchors=8, dim=16)


def test_undecodable_images_stop_the_job_or_are_skipped_and_recorded(hub, broken, small, tmp_path):
    plan = broken.plan
    shard = plan.unit_shards[0]  # the shard holding row 5
    reached = set(plan.shard_ids(shard)) | set(plan.anchor_ids)
    expected = sorted(i for i in BROKEN if i in reached)
    with pytest.raises(BadImageError, match=r"cannot be decoded: ids 5\b") as refused:
        optimize_shard(hub, broken.repo, shard, small, workdir=tmp_path)
    assert 5 in refused.value.ids, "refusal: id 5 not named"
    assert set(refused.value.ids) <= set(expected), "refusal: ids named that are not broken"
    assert "--on-bad-image skip" in refused.value.hint, "refusal: the hint does not say --on-bad-image skip"

    progress = RecordingProgress()
    skipped = optimize_shard(hub, broken.repo, shard, small, workdir=tmp_path, progress=progress,
                             options=OptimizeOptions(on_bad_image="skip"))
    report = skipped.report
    recorded = report["skipped_ids"]["shard"] + report["skipped_ids"]["anchors"]
    assert sorted(set(recorded)) == expected, "skip: other ids recorded than the broken ones"
    assert report["counts"]["skipped"] == len(recorded), "skip: the count is not the ids recorded"
    assert report["counts"]["rows"] == len(plan.shard_ids(shard)) - len(report["skipped_ids"]["shard"]), \
        "skip: rows counted"
    assert report["chunks"]["reused"] >= 1, "skip: the chunk stored before the refusal was encoded again"
    result, anchors = read_shard(skipped.directory / shard_prefix(shard))
    assert not set(recorded) & set(result.ids), "skip: a skipped id is in the targets"
    assert not set(recorded) & set(anchors.ids), "skip: a skipped id is in the anchors"
    assert not any("under-determined" in w for w in progress.warnings), \
        "skip: an under-determined warning, though the shard is its own reference"
    assert any("Skipped" in w for w in progress.warnings), "skip: no warning on skipped images"
    assert result.header.skipped_ids == sorted(report["skipped_ids"]["shard"]), "skip: header skipped_ids"
    assert 5 in result.header.skipped_ids, "skip: id 5 not in the header's skipped_ids"

    # The rows the plan gives the shard less the skipped ones are the whole result: it pushes and counts as done.
    pushed = CliRunner().invoke(cli, ["push", "--repo", broken.repo, "--shard", str(shard),
                                      "--workdir", str(tmp_path), "--json"])
    assert pushed.exit_code == 0, pushed.output
    commit = json.loads(pushed.stdout)["commit"]
    header = read_remote_header(hub, broken.repo, commit, remote_paths(shard).targets)
    assert header.skipped_ids == result.header.skipped_ids, "push: the pushed header's skipped_ids"
    assert header.num_rows == result.ids.size, "push: the pushed header's rows"
    status = collaboration_status(hub, broken.repo).shards[shard]
    assert status.state == DONE, "status: the shard is not done"
    assert status.skipped == len(header.skipped_ids), "status: skipped count"


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
    assert resolve_repo(None, config) == "org/from-env", "the environment does not come before the config"
    assert resolve_repo("org/option", config) == "org/option", "the option does not come before the environment"
    assert resolve_prior(None, None, None, 64, config) == PriorSpec("ViT-S-32", pretrained="openai", image_size=64)
    # A model named on the command line does not inherit weights saved for another model.
    assert resolve_prior("ViT-M-32", None, None, None, config) == PriorSpec("ViT-M-32")
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid"):
        load_config(tmp_path)
