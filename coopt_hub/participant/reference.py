"""The reference a participant aligns to: the pushed shard of this plan whose prior has the lowest V."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.hub.client import Hub


@dataclass(frozen=True)
class Reference:
    """The pushed shard whose prior has the lowest uniformity: the space every shard aligns to."""

    shard: int
    commit: str
    fingerprint: str
    uniformity: float

    @property
    def branch(self) -> str:
        return shard_branch(self.shard)

    def to_header(self) -> dict[str, Any]:
        return {"shard": self.shard, "branch": self.branch, "commit": self.commit, "fingerprint": self.fingerprint}


def find_reference(hub: Hub, repo: str, plan: Plan, shard: int, own_uniformity: float) -> Reference | None:
    """The pushed shard of this plan with the lowest V (ties: lowest shard), None when this prior is better.

    Shard `shard`'s own branch is left out: its content is what this run replaces.
    """
    branches, _ = hub.refs(repo)
    best: Reference | None = None
    for name, commit in sorted(branches.items()):
        prefix, _, number = name.partition("/")
        if prefix != "shard" or not number.isdigit() or int(number) == shard or int(number) >= plan.num_shards:
            continue
        report = hub.read_json(repo, remote_paths(int(number)).report, commit)
        if not report or report.get("plan_hash") != plan.plan_hash or not _is_number(report.get("uniformity")):
            continue
        candidate = Reference(int(number), commit, str(report.get("fingerprint")), float(report["uniformity"]))
        if best is None or (candidate.uniformity, candidate.shard) < (best.uniformity, best.shard):
            best = candidate
    if best is None or own_uniformity < best.uniformity:
        return None
    return best


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
