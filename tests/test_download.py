"""Each participant downloads only its own shard: bytes counted by the server itself."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from coopt_hub.platform.init import initialize

_spec = importlib.util.spec_from_file_location("download_bench", Path(__file__).parents[1] / "benchmarks/download.py")
download_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(download_bench)


def test_each_participant_fetches_close_to_its_share(hub, hub_server, new_repo_id, tmp_path):
    source, repo = new_repo_id("noise"), new_repo_id("noise-coopt")
    source_bytes = download_bench.publish_noise_source(source, row_groups=12, rows_per_group=40, size=64)
    plan = initialize(hub, repo, source=source, source_revision=None, split="train", image_column="image",
                      shards=3, anchors=6, dim=8, seed=1, temperature=2.0).plan
    assert plan.granularity == "row_group"

    fetched = download_bench.participant_bytes(hub_server, repo, 3, tmp_path)
    for shard, nbytes in enumerate(fetched):
        share = source_bytes * len(plan.shard_ids(shard)) / plan.num_rows
        # its own row groups, the anchors file, footers and the plan: never the other shards' data
        assert 0.9 * share < nbytes < 1.2 * share, (shard, nbytes, share)
    assert sum(fetched) < 1.2 * source_bytes, (fetched, source_bytes)
