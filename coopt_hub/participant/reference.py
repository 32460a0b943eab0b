"""The reference a participant aligns to, and the alignment that takes its shard into that space.

Priors are judged on what they stored, never on what they say about themselves: the anchor outputs
of every pushed shard of this plan (on its branch or in a pull request), with this shard's own, are ranked by uniformity V in the common
space with noise-like priors flagged (core/quality.rank_priors), on the anchors all of them decoded.
The best is the reference; a noise-like prior is never chosen without a warning naming it. The
alignment T_k is chosen on the anchors by held-out error (core/align.select_alignment).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coopt_hub.core.align import AlignmentFit, select_alignment
from coopt_hub.core.layout import shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import Progress
from coopt_hub.core.quality import PriorRanking, PriorScore, rank_priors
from coopt_hub.core.shardfile import AnchorOutputs
from coopt_hub.errors import PlanError, ShardFileError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.contributions import find_contributions
from coopt_hub.hub.repo import read_manifest, read_shard_anchors

# Neighbours compared per anchor by the noise flag (rank_priors' k), fewer when the anchors are few.
AGREEMENT_NEIGHBOURS = 10
ALIGNMENT_FOLDS = 5


@dataclass(frozen=True, eq=False)
class PushedShard:
    """A shard of this plan as pushed to its branch: its prior and its stored anchor outputs."""

    shard: int
    commit: str
    fingerprint: str
    anchors: AnchorOutputs

    @property
    def name(self) -> str:
        """Its name in a ranking: its branch, as merge names priors too."""
        return shard_branch(self.shard)

    def to_header(self) -> dict[str, Any]:
        return {"shard": self.shard, "branch": shard_branch(self.shard), "commit": self.commit,
                "fingerprint": self.fingerprint}


def pushed_shards(hub: Hub, repo: str, plan: Plan, shard: int, progress: Progress) -> list[PushedShard]:
    """Every other shard of this plan with usable anchor outputs, by shard number: of each, the newest
    contribution (its branch, an open pull request, or what main's latest merge took) whose anchors
    read and fit the plan; the ones passed over get a note.

    Shard `shard`'s own contributions are left out: their content is what this run replaces.
    """
    manifest = read_manifest(hub, repo, "main")
    merged = {s.shard: s.commit for s in manifest.shards} if manifest else {}
    pushed = []
    for k, candidates in find_contributions(hub, repo, plan.num_shards, merged).items():
        if k == shard:
            continue
        for candidate in candidates:
            try:
                header, anchors = read_shard_anchors(hub, repo, plan, k, candidate.commit)
            except ShardFileError as err:
                progress.info(f"Shard {k} in {candidate.describe()} is not considered as a reference: {err}")
                continue
            pushed.append(PushedShard(k, candidate.commit, header.fingerprint, anchors))
            break
    return pushed


@dataclass(frozen=True)
class ReferenceChoice:
    """The ranking of every pushed prior and this one, and what it chose."""

    reference: PushedShard | None  # None: this shard is its own reference
    ranking: PriorRanking
    own: PriorScore
    chosen: PriorScore

    def to_dict(self) -> dict[str, Any]:
        return self.ranking.to_dict()


def rank_stored_anchors(plan: Plan, anchors: Mapping[str, AnchorOutputs]) -> PriorRanking:
    """Rank priors by their stored anchor outputs (name -> outputs; names are shard branches), on the
    anchor ids all of them decoded."""
    shared = _shared_anchor_ids(list(anchors.values()))
    if shared.size < 2:
        raise PlanError(f"The shards share {shared.size} decoded anchors; priors cannot be compared on them.",
                        hint="Every shard must have labeled the plan's anchors; check the source images.")
    return rank_priors({name: _features(outputs, shared) for name, outputs in anchors.items()},
                       dim=plan.dim, t=plan.temperature, k=min(AGREEMENT_NEIGHBOURS, shared.size - 1))


def choose_reference(plan: Plan, shard: int, anchors: AnchorOutputs, pushed: list[PushedShard],
                     progress: Progress) -> ReferenceChoice:
    """Rank this prior and the pushed ones; the reference is the best that is not noise-like."""
    ranking = rank_stored_anchors(plan, {shard_branch(shard): anchors, **{p.name: p.anchors for p in pushed}})
    scores = {score.name: score for score in ranking.scores}
    chosen = scores[ranking.reference] if ranking.reference is not None else ranking.scores[0]
    own = scores[shard_branch(shard)]
    _warn_about_noise(ranking, own, chosen, progress)
    reference = next((p for p in pushed if p.name == chosen.name), None)
    return ReferenceChoice(reference=reference, ranking=ranking, own=own, chosen=chosen)


def _warn_about_noise(ranking: PriorRanking, own: PriorScore, chosen: PriorScore, progress: Progress) -> None:
    chance = f"chance {ranking.chance:.2f}, {ranking.k} neighbours"
    if ranking.reference is None:
        progress.warn(
            f"Every prior's anchor outputs look noise-like: none shares twice the chance number of neighbours "
            f"with another ({chance}). {chosen.name}, the lowest common-space V ({chosen.common_uniformity:.4f}), "
            "is the reference, but nothing shows that it knows more than noise."
        )
    elif own.noise_like:
        progress.warn(
            f"This prior's anchor outputs look like noise: they share at most {own.agreement:.2f} of their "
            f"neighbours with another prior's ({chance}). It is ranked after every other prior and aligned to "
            f"{chosen.name}; check the prior (weights, preprocessing)."
        )


def _shared_anchor_ids(all_anchors: list[AnchorOutputs]) -> np.ndarray:
    if not all_anchors:
        return np.zeros(0, dtype=np.int64)
    shared = all_anchors[0].ids
    for anchors in all_anchors[1:]:
        shared = np.intersect1d(shared, anchors.ids)
    return shared


def _features(anchors: AnchorOutputs, ids: np.ndarray) -> np.ndarray:
    """The native anchor outputs for `ids` (a sorted subset of the anchors' ids)."""
    return anchors.features[np.searchsorted(anchors.ids, ids)]


@dataclass(frozen=True)
class Alignment:
    """This shard's targets in the reference's space; in its own when it is the reference (fit None)."""

    reference: PushedShard | None
    targets: np.ndarray
    fit: AlignmentFit | None
    anchors: int  # shared with the reference, the rows the fit saw

    @property
    def residual(self) -> float:
        """In-sample relative residual on the shared anchors; 0 for the reference itself."""
        return 0.0 if self.fit is None else self.fit.residual


def align_to_reference(reference: PushedShard | None, raw: np.ndarray, anchors: AnchorOutputs) -> Alignment:
    """Map the raw targets of this shard into the reference's space, by the fit of its projected anchors
    to the reference's that predicts held-out anchors best.

    The fit reads nothing but what both shards store (projected anchors; raw targets), so a merge
    that must re-align the shard to another reference can do the same from the pushed files.
    """
    if reference is None:
        return Alignment(reference=None, targets=raw, fit=None, anchors=int(anchors.ids.size))
    common, own_rows, reference_rows = np.intersect1d(anchors.ids, reference.anchors.ids, return_indices=True)
    # Five folds unless the anchors are too few for them; select_alignment refuses fewer than 4.
    folds = max(2, min(ALIGNMENT_FOLDS, common.size // 2))
    fit = select_alignment(anchors.projected[own_rows], reference.anchors.projected[reference_rows], folds=folds)
    return Alignment(reference=reference, targets=fit.apply(raw), fit=fit, anchors=int(common.size))
