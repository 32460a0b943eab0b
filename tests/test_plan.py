import json
from dataclasses import replace

import numpy as np
import pytest

from coopt_hub.core.plan import Plan, Unit, make_plan
from coopt_hub.errors import ConfigError, PlanError

SHA = "0123456789abcdef0123456789abcdef01234567"


def row_group_units(sizes: list[int], per_file: int = 3) -> list[Unit]:
    units, start = [], 0
    for i, size in enumerate(sizes):
        units.append(Unit(file=f"data/train-{i // per_file:05d}.parquet", row_group=i % per_file,
                          start=start, num_rows=size))
        start += size
    return units


def plan_for(units: list[Unit], **overrides) -> Plan:
    settings = dict(source_repo="org/src", source_revision=SHA, split="train", image_column="image",
                    units=units, num_shards=3, anchors=10, dim=16, seed=7, temperature=2.0)
    settings.update(overrides)
    return make_plan(**settings)


def all_shard_ids(plan: Plan) -> list[np.ndarray]:
    return [plan.shard_ids(k) for k in range(plan.num_shards)]


def test_units_are_split_into_disjoint_balanced_shards():
    sizes = [100, 100, 100, 100, 90, 80, 60, 50, 40, 30, 20, 10]
    plan = plan_for(row_group_units(sizes))
    assert plan.granularity == "row_group"
    assert plan.num_rows == sum(sizes)
    shards = all_shard_ids(plan)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(plan.num_rows))
    rows = [len(ids) for ids in shards]
    assert max(rows) - min(rows) <= max(sizes)
    for k, ids in enumerate(shards):
        assert ids.dtype == np.int64, f"shard {k}"
        assert np.all(np.diff(ids) > 0), f"shard {k}: ids not sorted and unique"
        from_units = np.concatenate([np.arange(u.start, u.stop) for u in plan.shard_units(k)])
        assert np.array_equal(np.sort(from_units), ids), f"shard {k}: ids are not those of its units"


def test_assignment_depends_on_the_seed_only():
    units = row_group_units([50] * 12)
    assert plan_for(units, seed=1).unit_shards == plan_for(units, seed=1).unit_shards
    assert len({plan_for(units, seed=s).unit_shards for s in range(5)}) > 1
    assert plan_for(units, seed=1).anchor_ids != plan_for(units, seed=2).anchor_ids


def test_whole_files_give_file_granularity():
    units = [Unit(file=f"f{i}.parquet", row_group=None, start=10 * i, num_rows=10) for i in range(6)]
    assert plan_for(units).granularity == "file"


def test_too_few_units_fall_back_to_rows():
    plan = plan_for([Unit(file="data/train.parquet", row_group=0, start=0, num_rows=1000)], num_shards=4)
    assert plan.granularity == "row"
    assert plan.unit_shards == ()
    shards = all_shard_ids(plan)
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(1000))
    assert sorted(len(ids) for ids in shards) == [250, 250, 250, 250]
    assert not np.array_equal(shards[0], np.arange(250)), "rows should be assigned at random"
    assert plan.shard_units(2) == list(plan.units)
    assert np.array_equal(Plan.from_json(plan.to_json()).shard_ids(3), shards[3])


def test_anchor_count_and_fraction():
    units = row_group_units([100] * 10)
    plan = plan_for(units, anchors=25)
    ids = np.asarray(plan.anchor_ids)
    assert len(ids) == 25
    assert np.all(np.diff(ids) > 0)
    assert ids[0] >= 0
    assert ids[-1] < 1000
    assert len(plan_for(units, anchors=0.05).anchor_ids) == 50
    assert len(plan_for(units, anchors=0.0001).anchor_ids) == 1
    assert len(plan_for(units, anchors=1000).anchor_ids) == 1000


def test_json_round_trip_and_hash():
    plan = plan_for(row_group_units([30, 20, 10, 40, 25, 35, 5]), num_shards=2, temperature=0.5)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.plan_hash == plan.plan_hash
    reformatted = json.dumps(json.loads(text), indent=4)
    assert Plan.from_json(reformatted).plan_hash == plan.plan_hash
    assert replace(plan, dim=17).plan_hash != plan.plan_hash


def test_projection_is_shared_by_equal_output_sizes():
    plan = plan_for(row_group_units([100] * 6), dim=64)
    w = plan.projection(384)
    assert w.shape == (384, 64)
    assert w.dtype == np.float32
    assert np.array_equal(w, Plan.from_json(plan.to_json()).projection(384))
    assert not np.allclose(plan.projection(512)[:384], w)
    assert not np.allclose(replace(plan, seed=8).projection(384), w)
    # entries ~ N(0, 1/dim): squared norms are kept on average
    assert abs(float(np.mean(w))) < 0.01
    assert abs(float(np.var(w)) * 64 - 1) < 0.05


@pytest.mark.parametrize("overrides, error, words", [
    (dict(num_shards=0), PlanError, "at least one shard"),
    (dict(num_shards=1001), PlanError, "Cannot split 1000 rows"),
    (dict(anchors=0), PlanError, "anchor"),
    (dict(anchors=1001), PlanError, "anchor"),
    (dict(anchors=1.5), PlanError, "fraction"),
    (dict(anchors=0.0), PlanError, "fraction"),
    (dict(dim=0), ConfigError, "dimension"),
    (dict(seed=-1), ConfigError, "seed"),
    (dict(seed=1.5), ConfigError, "seed"),
    (dict(temperature=0.0), ConfigError, "temperature"),
    (dict(temperature=float("nan")), ConfigError, "temperature"),
    (dict(source_revision="main"), PlanError, "commit sha"),
])
def test_bad_settings_are_refused_with_a_hint(overrides, error, words):
    with pytest.raises(error, match=words) as info:
        plan_for(row_group_units([100] * 10), **overrides)
    assert info.value.hint


def test_units_must_tile_the_ids():
    gap = [Unit("a", 0, 0, 10), Unit("a", 1, 11, 10)]
    overlap = [Unit("a", 0, 0, 10), Unit("a", 1, 9, 10)]
    late_start = [Unit("a", 0, 5, 10)]
    for units, words in [(gap, "gap"), (overlap, "overlaps"), (late_start, "gap")]:
        with pytest.raises(PlanError, match=words):
            plan_for(units, num_shards=1)
    plan = plan_for(row_group_units([10] * 6), num_shards=2)
    with pytest.raises(PlanError, match="num_rows"):
        replace(plan, num_rows=61)


def test_tampered_json_is_refused():
    plan = plan_for(row_group_units([10] * 6), num_shards=2)
    data = json.loads(plan.to_json())
    data["anchor_ids"] = list(reversed(data["anchor_ids"]))
    with pytest.raises(PlanError, match="sorted"):
        Plan.from_json(json.dumps(data))
    with pytest.raises(PlanError, match="not a valid plan"):
        Plan.from_json("{\"units\": []}")
    with pytest.raises(PlanError, match="shard 5|Shard 5"):
        plan.shard_ids(5)
