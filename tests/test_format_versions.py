"""Files already pushed and published keep loading: fixtures written by coopt-hub 0.1.0 (shard file
schema and manifest version 1, before schema versions were recorded) are read by the current release."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from coopt_hub.core.align import fit_pca_basis, select_alignment
from coopt_hub.core.layout import ANCHORS_FILE
from coopt_hub.core.manifest import Manifest
from coopt_hub.core.plan import Plan, Unit, make_plan
from coopt_hub.core.shardfile import (
    SCHEMA_VERSION,
    AnchorOutputs,
    ShardHeader,
    ShardReader,
    ShardResult,
    read_shard,
    write_shard,
)
from coopt_hub.errors import ShardFileError

V1 = Path(__file__).parent / "fixtures" / "v1"


def test_a_v1_shard_pair_reads_with_every_check():
    result, anchors = read_shard(V1 / "shards" / "1", verify=True)
    assert result.header.shard == 1, "shard number"
    assert result.header.skipped_ids == [3], "skipped ids"
    assert np.array_equal(result.ids, [0, 2, 5, 7]), "target ids"
    assert result.aligned.shape == (4, 4), "aligned targets shape"
    assert np.array_equal(anchors.ids, [1, 4, 6]), "anchor ids"


def test_a_v1_manifest_reads():
    manifest = Manifest.from_dict(json.loads((V1 / "manifest.json").read_text()))
    assert manifest.tag == "v1", "tag"
    assert manifest.shards[0].skipped_ids == (3,), "skipped ids of the merged shard"
    assert manifest.missing == (0,), "missing shards"
    assert manifest.verification is None, "unverified merge"


def test_a_v1_manifest_reads_with_the_defaults_of_version_2():
    manifest = Manifest.from_dict(json.loads((V1 / "manifest.json").read_text()))
    assert manifest.version == 1, "the version it was written as"
    (shard,) = manifest.shards
    assert shard.uniformity_native == shard.uniformity == -1.25, "V was the native V before version 2"
    assert shard.alignment is None, "no alignment figures were recorded"
    assert shard.noise_like is False, "no prior was flagged"
    assert manifest.ranking is None and manifest.quality is None, "no ranking or quality recorded"
    assert manifest.splits["train"].num_bytes is None and manifest.splits["train"].file_bytes is None, "sizes"


def test_a_v1_manifest_written_again_reads_back_the_same():
    manifest = Manifest.from_dict(json.loads((V1 / "manifest.json").read_text()))
    assert Manifest.from_dict(json.loads(manifest.to_json())) == manifest


# Shard headers and plans (participant side) ------------------------------------------------------

# A plan.json as coopt-hub 0.1.0 wrote it (compact here), and the hash every header and manifest of its
# collaboration pins: a plan without the projection field must keep both.
PLAN_0_1_0 = (
    '{"anchor_ids":[0,4,10,19,46,118],"dim":8,"granularity":"row_group","image_column":"image","num_rows":120,'
    '"num_shards":2,"schema_version":1,"seed":3,"source_repo":"org/digits",'
    '"source_revision":"0123456789abcdef0123456789abcdef01234567","split":"train","temperature":2.0,'
    '"unit_shards":[0,1,1,0],"units":['
    + ",".join(f'{{"file":"data/train.parquet","num_rows":30,"row_group":{g},"start":{30 * g}}}' for g in range(4))
    + "]}"
)
PLAN_0_1_0_HASH = "257890d7cc1f5b463f48306c69ee625d8ab85372b8d9a452ac9916652a8c71f3"


def test_a_v1_shard_header_reads_with_the_defaults_of_version_2():
    result, anchors = read_shard(V1 / "shards" / "1", verify=True)
    header = result.header
    assert header.schema_version == 1, "the version it was written as"
    assert header.uniformity_native == header.uniformity == -1.25, "V was the native V before version 2"
    assert header.alignment is None and header.cv_residual is None, "no alignment fit was recorded"
    assert header.projection == "random", "version 1 knew only the random W"
    assert anchors.basis is None, "a random-projection shard has no PCA basis"


def test_the_plan_of_an_earlier_release_keeps_its_hash_and_its_bytes():
    plan = Plan.from_json(PLAN_0_1_0)
    assert plan.plan_hash == PLAN_0_1_0_HASH, "the plan hash changed"
    assert plan.projection_kind == "random", "projection"
    assert json.loads(plan.to_json()) == json.loads(PLAN_0_1_0), "written again, the plan gained or lost fields"
    units = [Unit("data/train.parquet", g, 30 * g, 30) for g in range(4)]
    made = make_plan(source_repo="org/digits", source_revision="0123456789abcdef0123456789abcdef01234567",
                     split="train", image_column="image", units=units, num_shards=2, anchors=6, dim=8, seed=3,
                     temperature=2.0)
    assert made.plan_hash == PLAN_0_1_0_HASH, "the same settings make another plan now"
    assert make_plan(**{**_settings(made), "units": units, "projection": "pca"}).plan_hash != PLAN_0_1_0_HASH, \
        "the projection is not part of the hash"


def _settings(plan: Plan) -> dict:
    return {"source_repo": plan.source_repo, "source_revision": plan.source_revision, "split": plan.split,
            "image_column": plan.image_column, "num_shards": plan.num_shards, "anchors": len(plan.anchor_ids),
            "dim": plan.dim, "seed": plan.seed, "temperature": plan.temperature}


def _v2_pair(projection: str = "pca") -> tuple[ShardResult, AnchorOutputs]:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((12, 6)).astype(np.float32)
    basis = fit_pca_basis(features, 4) if projection == "pca" else None
    fit = select_alignment(rng.standard_normal((12, 4)), rng.standard_normal((12, 4)), folds=2)
    header = ShardHeader(
        shard=0, plan_hash="a" * 64, source_revision="b" * 40, prior={"model": "m"}, preprocessing={},
        fingerprint="c" * 64, output_dim=6, dim=4, uniformity=-1.5, reference={"shard": 1, "branch": "shard/1",
        "commit": "d" * 40, "fingerprint": "e" * 64}, residual=fit.residual, num_rows=3, tool_version="x",
        checksums={}, schema_version=SCHEMA_VERSION, alignment=fit.to_dict(), uniformity_native=-1.25,
        projection=projection)
    raw = rng.standard_normal((3, 4)).astype(np.float32)
    projected = basis.project(features) if basis else features[:, :4]
    return (ShardResult(header, np.array([0, 2, 5]), raw, fit.apply(raw)),
            AnchorOutputs(np.arange(12), features, projected, basis))


def test_a_v2_header_and_pca_basis_round_trip(tmp_path):
    result, anchors = _v2_pair()
    write_shard(tmp_path, result, anchors)
    back, back_anchors = read_shard(tmp_path, verify=True)
    assert back.header == result.header, "header"
    assert back.header.alignment["cv_residual"] == result.header.alignment["cv_residual"], "held-out residual"
    for name, array in anchors.basis.arrays().items():
        np.testing.assert_array_equal(back_anchors.basis.arrays()[name], array, err_msg=f"basis {name}")
    assert len(back.header.checksums) == 10, "the basis tensors have no checksums"
    with ShardReader(tmp_path) as shard:
        assert shard.anchors.basis is not None, "read in ranges: no basis"


def test_a_damaged_pca_basis_is_refused(tmp_path):
    result, anchors = _v2_pair()
    write_shard(tmp_path, result, anchors)
    path = tmp_path / ANCHORS_FILE
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + length])["basis.components"]["data_offsets"]
    data[8 + length + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardFileError, match="tensor 'basis.components' does not match its checksum"):
        read_shard(tmp_path, verify=True)


def test_a_pca_header_without_its_basis_is_not_written(tmp_path):
    result, anchors = _v2_pair()
    anchors.basis = None
    with pytest.raises(ShardFileError, match="PCA basis"):
        write_shard(tmp_path, result, anchors)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"schema_version": SCHEMA_VERSION + 1}, "newer coopt-hub"),
        ({"projection": "umap"}, "projection is 'umap', not one of random, pca"),
        ({"schema_version": 1}, "version 1 header records no alignment"),
    ],
)
def test_headers_this_release_cannot_read_are_refused_with_the_reason(change, words):
    result, _ = _v2_pair()
    with pytest.raises(ValueError, match=words):
        ShardHeader.from_dict({**result.header.to_dict(), **change})


def test_a_v2_header_needs_every_v2_field():
    result, _ = _v2_pair()
    data = result.header.to_dict()
    del data["uniformity_native"]
    with pytest.raises(ValueError, match="lacks uniformity_native"):
        ShardHeader.from_dict(data)


def test_a_v2_header_reads_as_an_fp32_shard():
    result, _ = _v2_pair()
    data = result.header.to_dict()
    del data["precision"], data["precision_deviation"]
    header = ShardHeader.from_dict({**data, "schema_version": 2})
    assert header.precision == "fp32", "before version 3 every prior ran in fp32"
    assert header.precision_deviation is None, "an fp32 shard has no deviation"
    with pytest.raises(ValueError, match="lacks precision, precision_deviation"):
        ShardHeader.from_dict(data)  # version 3 needs them


def test_a_v3_header_records_its_precision_and_deviation(tmp_path):
    result, anchors = _v2_pair()
    deviation = {"max_cosine_distance": 0.004, "mean_cosine_distance": 0.001, "anchors": 12}
    result.header = ShardHeader.from_dict({**result.header.to_dict(), "precision": "bf16",
                                           "precision_deviation": deviation})
    write_shard(tmp_path, result, anchors)
    back, _ = read_shard(tmp_path, verify=True)
    assert back.header.schema_version == SCHEMA_VERSION == 3, "schema version"
    assert (back.header.precision, back.header.precision_deviation) == ("bf16", deviation), "precision record"
    with pytest.raises(ValueError, match="precision_deviation is recorded for an fp32 shard"):
        ShardHeader.from_dict({**back.header.to_dict(), "precision": "fp32"})
