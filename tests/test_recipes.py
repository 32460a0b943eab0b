"""The recipes as a user runs them: scripts in their own processes against a merged dataset on the hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_hub import FakePrior

from coopt_hub.platform.merge.run import merge

RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def merged(hub, digits_source, new_collaboration) -> str:
    collab = new_collaboration(digits_source, "recipe-coopt", shards=2, anchors=64, dim=16)
    good, other = FakePrior("good", 24), FakePrior("other", 12, rank=12)
    first = collab.push(0, good)
    collab.push(1, other, reference=(0, good, first))
    return merge(hub, collab.repo).repo


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(RECIPES / script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_train_from_hub_reports_probe_accuracy(merged):
    done = run("train_from_hub.py", "--dataset", merged, "--revision", "v1", "--arch", "resnet18",
               "--objective", "coopt", "--epochs", "1", "--image-size", "16", "--batch-size", "64")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["objective"] == "coopt"
    assert result["arch"] == "resnet18"
    assert result["epochs"] == pytest.approx(1.0)
    assert result["samples_per_s"] > 0
    assert 0.0 <= result["accuracy"] <= 1.0


@pytest.mark.slow
def test_compare_prints_one_table_for_both_budgets(merged):
    done = run("compare.py", "--dataset", merged, "--revision", "v1", "--arch", "resnet18", "--epochs", "1",
               "--image-size", "16", "--batch-size", "64", "--variants", "coopt", "supervised")
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
