"""The reference a participant aligns to: the pushed shard of this plan whose prior has the lowest V,
and the alignment T_k fitted on the anchors both labeled, which takes this shard into its space."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from coopt_hub.core.align import AlignmentWarning, apply_alignment, fit_alignment
from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.errors import PlanError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import read_reference_anchors


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


@dataclass(frozen=True)
class Alignment:
    """This shard's targets in the reference's space; in its own when it is the reference."""

    reference: Reference | None
    targets: np.ndarray
    residual: float  # relative fit residual on the shared anchors; 0 for the reference itself


def align_to_reference(
    hub: Hub, repo: str, plan: Plan, shard: int, own_uniformity: float,
    raw: np.ndarray, anchor_ids: np.ndarray, projected_anchors: np.ndarray,
) -> Alignment:
    """Align the raw targets f @ W of shard `shard` to the reference, fitted on the anchors both decoded.

    Fewer anchors than target dimensions make the fit under-determined (ridge-regularised); the
    caller tells the participant so in its own words, so AlignmentWarning is not raised here.
    """
    reference = find_reference(hub, repo, plan, shard, own_uniformity)
    if reference is None:
        return Alignment(reference=None, targets=raw, residual=0.0)
    reference_ids, reference_projected = read_reference_anchors(
        hub, repo, plan, reference.shard, reference.commit, reference.fingerprint
    )
    common, own_rows, reference_rows = np.intersect1d(anchor_ids, reference_ids, return_indices=True)
    if common.size < 2:
        raise PlanError(f"Shard {reference.shard}'s anchors and this shard's share {common.size} decodable rows.",
                        hint="Both must have labeled the plan's anchors; check the source images.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AlignmentWarning)
        transform, residual = fit_alignment(projected_anchors[own_rows], reference_projected[reference_rows])
    return Alignment(reference=reference, targets=apply_alignment(raw, transform), residual=float(residual))
