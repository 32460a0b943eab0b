"""`init` guidance from numbers (anchors per dimension) and anchors that every participant can decode."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from fakes import RecordingProgress
from helpers_hub import publish_digit_rows

from coopt_hub.core.plan import Unit, make_plan
from coopt_hub.hub.repo import load_anchors
from coopt_hub.platform.init import STABLE_ANCHORS_PER_DIM, anchor_guidance, initialize
from coopt_hub.priors import decode_image

ROWS, ROWS_PER_GROUP, ANCHORS = 120, 30, 16


def plan_args(source: str, **overrides) -> dict:
    args = {"source": source, "source_revision": None, "split": "train", "image_column": "image", "shards": 2,
            "anchors": ANCHORS, "dim": 4, "seed": 0, "temperature": 2.0}
    return {**args, **overrides}


def anchors_drawn(excluded=()) -> tuple[int, ...]:
    """The anchor ids init draws for ROWS rows (they depend on the seed, the row count and the count only)."""
    units = [Unit("f", g, g * ROWS_PER_GROUP, ROWS_PER_GROUP) for g in range(ROWS // ROWS_PER_GROUP)]
    return make_plan(source_repo="org/x", source_revision="0" * 40, split="train", image_column="image", units=units,
                     num_shards=2, anchors=ANCHORS, dim=4, seed=0, temperature=2.0,
                     excluded_anchors=excluded).anchor_ids


def test_too_few_anchors_per_dimension_are_explained_with_settings_that_avoid_it():
    under = anchor_guidance(8, 16, num_rows=1000)
    assert "under-determined" in under, under
    assert "--anchors 64 or --dim 2" in under, under
    unstable = anchor_guidance(32, 16, num_rows=1000)
    assert "under-determined" not in unstable, unstable
    assert "2.00 per dimension" in unstable and "--anchors 64 or --dim 8" in unstable, unstable
    assert anchor_guidance(int(STABLE_ANCHORS_PER_DIM * 16), 16, num_rows=1000) is None
    assert "--anchors" not in anchor_guidance(300, 256, num_rows=500), "suggests more anchors than rows"


def test_init_tells_the_platform_when_its_anchors_are_too_few(hub):
    source = publish_digit_rows(hub, rows=ROWS, rows_per_group=ROWS_PER_GROUP, name="guided-digits")
    progress = RecordingProgress()
    result = initialize(hub, f"org/guided-{uuid.uuid4().hex[:12]}", **plan_args(source, dim=8), progress=progress)
    assert len(result.warnings) == 1 and "--anchors 32 or --dim 4" in result.warnings[0], result.warnings
    assert progress.warnings == list(result.warnings), "the warning did not reach the progress"
    quiet = initialize(hub, f"org/guided-{uuid.uuid4().hex[:12]}", **plan_args(source), progress=RecordingProgress())
    assert quiet.warnings == (), "16 anchors for 4 dimensions are enough"


@pytest.mark.parametrize("which", [0, ANCHORS - 1])
def test_an_undecodable_anchor_is_replaced_at_init(hub, which):
    bad = anchors_drawn()[which]
    source = publish_digit_rows(hub, rows=ROWS, rows_per_group=ROWS_PER_GROUP, broken=(bad,), name="broken-anchor")
    repo = f"org/replaced-{uuid.uuid4().hex[:12]}"
    progress = RecordingProgress()
    result = initialize(hub, repo, **plan_args(source), progress=progress)

    plan = result.plan
    assert result.undecodable_anchors == (bad,), "the undecodable anchor is not reported"
    assert bad not in plan.anchor_ids, "the undecodable anchor is still an anchor"
    assert len(plan.anchor_ids) == ANCHORS, "the anchor count changed"
    assert plan.anchor_ids == anchors_drawn(excluded={bad}), "the replacement is not the seeded next row"
    assert any(str(bad) in w and "replaced" in w for w in progress.warnings), progress.warnings
    table = load_anchors(hub, repo, plan)
    assert np.array_equal(table.column("id").to_numpy(), plan.anchor_ids), "published anchor rows"
    for sample_id, cell in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
        decode_image(cell, sample_id)  # raises for an undecodable one
    again = initialize(hub, repo, **plan_args(source), progress=RecordingProgress())
    assert not again.created and again.plan.plan_hash == plan.plan_hash, "the same init again is not a no-op"
