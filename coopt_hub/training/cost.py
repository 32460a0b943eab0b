"""What the targets of a merged version cost to make: the participants' labelling seconds.

Each participant's report.json (on its shard branch, at the commit the manifest merged) records
the seconds spent encoding the shard and the anchors with its prior, and fitting its alignment.
Their sum is the compute that a CoOpt student's clock owes before its first step, when the
comparison includes the cost of labelling (`compare --include-labeling-cost`). The seconds were
measured on the participants' machines, not on the one that trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from coopt_hub.core.layout import MANIFEST_PATH, remote_paths
from coopt_hub.core.manifest import Manifest
from coopt_hub.hub.client import Hub
from coopt_hub.training.data import TrainingDataError


@dataclass(frozen=True)
class ShardCost:
    shard: int
    commit: str
    labeling_seconds: float
    alignment_seconds: float

    @property
    def seconds(self) -> float:
        return self.labeling_seconds + self.alignment_seconds


@dataclass(frozen=True)
class LabelingCost:
    repo: str
    commit: str  # of the merged version
    shards: tuple[ShardCost, ...]

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shards)


def labeling_cost(repo: str, revision: str, token: str | None = None) -> LabelingCost:
    """The labelling and alignment seconds of every shard merged into `repo`@`revision`."""
    hub = Hub(token=token)
    commit = hub.head(repo, revision) or revision
    manifest = Manifest.from_dict(json.loads(hub.download(repo, MANIFEST_PATH, commit).read_text()))
    return LabelingCost(repo, commit, tuple(_shard_cost(hub, repo, shard.shard, shard.commit)
                                            for shard in manifest.shards))


def _shard_cost(hub: Hub, repo: str, shard: int, commit: str) -> ShardCost:
    path = remote_paths(shard).report
    report = hub.read_json(repo, path, commit) or {}
    timings = report.get("timings") or {}
    if "labeling_s" not in timings:
        raise TrainingDataError(
            f"shard {shard}'s report ({path} at {commit[:12]}) records no labelling seconds",
            hint=f"Compare without --include-labeling-cost, or relabel the shard: "
                 f"`coopt-hub optimize {repo} --shard {shard} --model MODEL --push` records them.",
        )
    return ShardCost(shard, commit, float(timings["labeling_s"]), float(timings.get("alignment_s", 0.0)))
