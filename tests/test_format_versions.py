"""Files already pushed and published keep loading: fixtures written by coopt-hub 0.1.0 (shard file
schema and manifest version 1, before schema versions were recorded) are read by the current release."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from coopt_hub.core.manifest import Manifest
from coopt_hub.core.shardfile import read_shard

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
