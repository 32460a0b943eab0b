"""`coopt-hub demo --fast`: the main job end to end, as a newcomer runs it, in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(900)
def test_demo_runs_the_whole_collaboration(tmp_path):
    # The demo starts its own hub: it must not inherit the suite's endpoint or caches.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "COOPT_HUB_"))}
    done = subprocess.run(
        [sys.executable, "-m", "coopt_hub", "demo", "--fast", "--json", "--root", str(tmp_path / "demo")],
        env=env, capture_output=True, text=True, timeout=880,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout)

    assert report["tag"] == "v1" and report["repo"] == "demo/digits-coopt"
    assert report["rows"] == 1438
    priors = report["priors"]
    assert [p["state"] for p in priors] == ["done"] * 3
    assert len({p["output_dim"] for p in priors}) == 3, "three priors with three output sizes"
    best = min(priors, key=lambda p: p["uniformity"])
    assert best["residual"] == pytest.approx(0.0, abs=1e-6), "the lowest-V prior is everyone's reference"
    assert any("accelerate launch, 2 processes" in step["step"] for step in report["steps"])

    rows = {row["objective"]: row for row in report["comparison"]}
    assert set(rows) == {"coopt", "coopt-raw", "byol", "supervised"}
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["seconds"] > 0
    # With labels, the upper bound is far above chance even after a short run.
    assert rows["supervised"]["accuracy"] > 0.3
    assert report["explanation"]
