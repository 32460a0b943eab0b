"""The recipes as a user runs them: scripts in their own processes against a merged dataset on the hub."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from helpers_hub import FakePrior
from safetensors.torch import load_file

from coopt_hub.platform.merge.run import merge
from coopt_hub.training.checkpoint import list_checkpoints

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def merged(hub, digits_source, new_collaboration) -> str:
    collab = new_collaboration(digits_source, "recipe-coopt", shards=2, anchors=64, dim=16)
    good, other = FakePrior("good", 24), FakePrior("other", 12, rank=12)
    first = collab.push(0, good)
    collab.push(1, other, reference=(0, good, first))
    return merge(hub, collab.repo).repo


def run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(RECIPES / script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_from_hub_reports_probe_accuracy(merged):
    done = run("train_from_hub.py", "--dataset", merged, "--revision", "v1", "--arch", "test_resnet",
               "--objective", "coopt", "--epochs", "1", "--image-size", "16", "--batch-size", "64",
               "--probe-epochs", "20")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["objective"] == "coopt"
    assert result["arch"] == "test_resnet"
    assert result["epochs"] == pytest.approx(1.0)
    assert result["samples_per_s"] > 0
    assert 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.slow
def test_compare_prints_one_table_for_both_budgets(merged):
    done = run("compare.py", "--dataset", merged, "--revision", "v1", "--arch", "test_resnet", "--epochs", "1",
               "--image-size", "16", "--batch-size", "64", "--probe-epochs", "20", "--variants", "coopt", "supervised")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [(r["variant"], r["budget"]) for r in rows] == [
        ("coopt", "epochs"), ("supervised", "epochs"), ("coopt", "time"), ("supervised", "time")]
    assert "probe acc" in done.stdout, done.stdout


def test_recipe_errors_say_what_to_do(merged):
    done = run("train_from_hub.py", "--dataset", merged, "--revision", "v9", "--epochs", "1")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Revision not found" in done.stderr, done.stderr[-3000:]
    assert "Next step:" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


# Ctrl-C ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_keeps_the_checkpoints_and_resume_continues(merged, tmp_path):
    output = tmp_path / "run"
    common = ["--dataset", merged, "--revision", "v1", "--arch", "test_resnet", "--image-size", "16",
              "--batch-size", "32", "--eval-points", "0", "--output", str(output), "--checkpoint-every", "1"]
    job = subprocess.Popen([sys.executable, str(RECIPES / "train_from_hub.py"), *common, "--epochs", "1000"],
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None and not list_checkpoints(output):
        time.sleep(0.05)
    assert job.poll() is None, "the run ended before Ctrl-C: " + job.communicate()[1][-3000:]
    job.send_signal(signal.SIGINT)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 130, stderr[-3000:]
    assert "Interrupted. With --output DIR the checkpoints written so far are kept" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    kept = list_checkpoints(output)
    assert kept, "Ctrl-C lost the checkpoints"

    step = int(kept[-1].name.split("-")[1])
    done = run("train_from_hub.py", *common, "--epochs", "1000", "--resume", "--max-steps", str(step + 2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {kept[-1]} at step {step}" in done.stderr, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == step + 2


# --pretrained: timm's weights from the weights endpoint, whatever hub the dataset is on --------------------

MIRROR_TOKEN = "mirror-write-token"
TIMM_REPO = "timm/resnet10t.c3_in1k"  # what timm downloads for `resnet10t` (its default tag)


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A second embedded hub holding timm's resnet10t weights (random ones, saved as timm publishes them)."""
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from coopt_hub.server import HubServer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        published = timm.create_model("resnet10t")  # with its classifier
    folder = tmp_path_factory.mktemp("resnet10t")
    save_file(published.state_dict(), str(folder / "model.safetensors"))
    with HubServer(tmp_path_factory.mktemp("mirror"), tokens=[MIRROR_TOKEN]) as server:
        api = HfApi(endpoint=server.endpoint, token=MIRROR_TOKEN)
        api.create_repo(TIMM_REPO, repo_type="model")
        api.upload_file(path_or_fileobj=str(folder / "model.safetensors"), path_in_repo="model.safetensors",
                        repo_id=TIMM_REPO, repo_type="model")
        server.published = {k: v for k, v in published.state_dict().items() if not k.startswith("fc.")}
        yield server


def test_pretrained_backbones_come_from_the_weights_endpoint(mirror, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from coopt_hub.priors.weights import WEIGHTS_ENDPOINT_ENV
    from coopt_hub.training.models import BackboneConfig, build_backbone

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # never the session's cache
    monkeypatch.setenv(WEIGHTS_ENDPOINT_ENV, mirror.endpoint)
    backbone, _ = build_backbone(BackboneConfig("resnet10t", 32, small_stem=False, pretrained=True))
    loaded = backbone.state_dict()
    assert loaded.keys() == mirror.published.keys()
    assert all(torch.equal(loaded[k], v) for k, v in mirror.published.items()), "not the mirror's weights"


@pytest.mark.slow
def test_train_from_hub_pretrained_while_the_dataset_is_on_another_hub(merged, mirror, tmp_path):
    """HF_ENDPOINT stays the dataset's hub; the weights come from --weights-endpoint. With lr 0 the exported
    student still holds them; a weights endpoint without the repo fails naming the URL, not the dataset."""
    student = tmp_path / "student"
    args = ["--dataset", merged, "--revision", "v1", "--arch", "resnet10t", "--no-small-stem", "--pretrained",
            "--image-size", "32", "--batch-size", "32", "--max-steps", "1", "--eval-points", "0", "--lr", "0"]
    done = run("train_from_hub.py", *args, "--weights-endpoint", mirror.endpoint, "--output-dir", str(student),
               env={"HF_HUB_CACHE": str(tmp_path / "cache-1")})
    assert done.returncode == 0, done.stderr[-3000:]
    weights = load_file(str(student / "model.safetensors"))
    convs = [k for k in mirror.published if k.endswith(".weight") and "conv" in k]
    assert convs and all(torch.equal(weights[k], mirror.published[k]) for k in convs), "not the mirror's weights"

    dataset_hub = os.environ["HF_ENDPOINT"]
    failed = run("train_from_hub.py", *args, "--weights-endpoint", dataset_hub,
                 env={"HF_HUB_CACHE": str(tmp_path / "cache-2")})
    assert failed.returncode != 0
    assert f"{dataset_hub}/{TIMM_REPO}/resolve/" in failed.stderr, failed.stderr[-3000:]
    assert "resnet10t could not be downloaded" in failed.stderr, failed.stderr[-3000:]
    assert "not a merged CoOpt dataset" not in failed.stderr and "Traceback" not in failed.stderr, failed.stderr[-3000:]
