"""`coopt-hub demo --fast`: the main job end to end, as a newcomer runs it, in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The demo runs once for the module (the first test waits for it), in several minutes. Under
# pytest-xdist a module fixture runs once per worker that gets one of the module's tests: the README's
# test command (`--dist loadscope`) keeps a module's tests on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The demo's --json report."""
    # The demo starts its own hub: it must not inherit the suite's endpoint or caches.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "COOPT_HUB_"))}
    root = tmp_path_factory.mktemp("demo") / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "coopt_hub", "demo", "--fast", "--json", "--root", str(root)],
        env=env, capture_output=True, text=True, timeout=880,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_demo_publishes_the_merged_dataset(report):
    assert report["tag"] == "v1"
    assert report["repo"] == "demo/digits-coopt"
    assert report["rows"] == 1438


def test_demo_labels_with_three_priors_aligned_to_the_best(report):
    priors = report["priors"]
    assert [p["state"] for p in priors] == ["done"] * 3
    assert len({p["output_dim"] for p in priors}) == 3, "three priors with three output sizes"
    best = min(priors, key=lambda p: p["uniformity"])
    assert best["residual"] == pytest.approx(0.0, abs=1e-6), "the lowest-V prior is everyone's reference"


def test_demo_runs_a_participant_as_two_accelerate_processes(report):
    assert any("accelerate launch, 2 processes" in step["step"] for step in report["steps"]), report["steps"]


def test_demo_compares_every_objective(report):
    rows = {row["objective"]: row for row in report["comparison"]}
    assert set(rows) == {"coopt", "coopt-raw", "byol", "supervised"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0, row["objective"]
        assert row["seconds"] > 0, row["objective"]
    # With labels, the upper bound is far above chance even after a short run.
    assert rows["supervised"]["accuracy"] > 0.3


def test_demo_explains_its_result(report):
    assert report["explanation"]


def test_demo_claims_no_winner_from_one_seed(report):
    findings = report["findings"]
    assert findings, "the comparison's findings are in the report"
    assert not any(" beats " in line for line in findings), findings
    assert any("no winner" in line and "no interval" in line for line in findings), findings
    assert any(line.startswith("coopt speedup over byol:") for line in findings), findings
    assert report["results"]["plot"].endswith(".png")
