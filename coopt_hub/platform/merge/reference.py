"""The merge's reference prior, chosen from what every shard stored rather than what it says of itself.

Each merged shard's anchor outputs (anchors.safetensors, checked against its own checksums and its
header) are read first; uniformity in the common space and the noise flag are recomputed from the
native `features` on the anchor ids every shard has (core.quality.rank_priors). A shard's header
could claim any V; its stored outputs are what its targets were made from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from pathlib import Path

import numpy as np
from huggingface_hub.errors import RemoteEntryNotFoundError

from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import Progress
from coopt_hub.core.quality import NOISE_AGREEMENT_RATIO, PriorRanking, PriorScore, rank_priors
from coopt_hub.core.shardfile import AnchorOutputs, read_anchor_file
from coopt_hub.errors import ShardFileError, VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.platform.evaluate import ProjectedAnchors, paired_anchors
from coopt_hub.platform.status import ShardStatus

# Neighbours compared per anchor when ranking priors (core.quality's default), fewer on tiny anchor sets.
RANKING_NEIGHBOURS = 10


@dataclass(frozen=True)
class ReferenceChoice:
    """The prior every target is aligned to, the ranking it came from (names are shard branches),
    and each merged shard's stored anchor outputs."""

    reference: ShardStatus
    ranking: PriorRanking
    anchors: dict[int, AnchorOutputs]

    def score(self, shard: int) -> PriorScore:
        return next(s for s in self.ranking.scores if s.name == shard_branch(shard))

    def projected(self, shard: int) -> ProjectedAnchors:
        return ProjectedAnchors(self.anchors[shard].ids, self.anchors[shard].projected)

    def paired_anchors(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """`shard`'s projected anchor outputs and the reference's, on the anchor ids both have (rows paired)."""
        return paired_anchors(self.projected(shard), self.projected(self.reference.shard))


def choose_reference(
    hub: Hub, repo: str, plan: Plan, done: list[ShardStatus], workdir: Path, progress: Progress
) -> ReferenceChoice:
    """Rank the priors of `done` from their stored anchor outputs; the best that is not noise-like
    is the reference. A noise-like prior is never chosen silently: when every prior looks like
    noise, the lowest V is taken with a warning; noise-like priors merged anyway are named."""
    anchors = {status.shard: _stored_anchors(hub, repo, plan, status, workdir) for status in done}
    common = reduce(np.intersect1d, (outputs.ids for outputs in anchors.values()))
    if common.size < 2:
        raise VerificationError(
            f"The merged shards of {repo} share {common.size} anchor output(s); priors cannot be compared.",
            hint="Participants skipped different undecodable anchors; the platform should start a new plan "
                 "whose anchors all decode.",
        )
    features = {shard_branch(k): outputs.features[np.isin(outputs.ids, common)] for k, outputs in anchors.items()}
    ranking = rank_priors(features, dim=plan.dim, t=plan.temperature, k=min(RANKING_NEIGHBOURS, common.size - 1))
    by_branch = {status.branch: status for status in done}
    if ranking.reference is None:
        chosen = ranking.scores[0]
        shared = NOISE_AGREEMENT_RATIO * ranking.chance
        progress.warn(
            f"Every prior's anchor outputs look like noise (no two priors share {shared:.2f} of their anchors' "
            f"neighbours); aligning to {chosen.name} (lowest V in the common space) anyway. Check the priors "
            "before using this version."
        )
    else:
        chosen = next(s for s in ranking.scores if s.name == ranking.reference)
        noisy = [s.name for s in ranking.scores if s.noise_like]
        if noisy:
            progress.warn(
                f"The anchor outputs of {', '.join(noisy)} look like noise (their anchors' neighbours agree with "
                "no other prior's beyond chance): never the reference, merged as they are; the manifest and "
                "card flag them."
            )
    progress.info(f"Reference prior: {chosen.name} (V {chosen.common_uniformity:.4f} in the common space, "
                  f"recomputed from the {common.size} anchors every shard stored).")
    return ReferenceChoice(by_branch[chosen.name], ranking, anchors)


def _stored_anchors(hub: Hub, repo: str, plan: Plan, status: ShardStatus, workdir: Path) -> AnchorOutputs:
    """Shard `status`'s anchors file at its commit, checked: its checksums, the header status read, the plan's ids."""
    path = remote_paths(status.shard).anchors
    where = f"Shard {status.shard} ({status.branch}@{status.commit[:12]})"
    hint = f"That participant must run `coopt-hub optimize --shard {status.shard} --push` again."
    try:
        local = hub.download(repo, path, status.commit, local_dir=workdir / "anchors")
        header, anchors = read_anchor_file(local)
    except RemoteEntryNotFoundError as err:
        raise VerificationError(f"{where}: {path} is missing. Nothing was written.", hint=hint) from err
    except ShardFileError as err:
        raise VerificationError(f"{where}: {err} Nothing was written.", hint=err.hint) from err
    if header.to_dict() != status.header.to_dict():
        raise VerificationError(f"{where}: its anchors file carries another header than its targets file.",
                                hint=hint)
    if not np.isin(anchors.ids, np.asarray(plan.anchor_ids, dtype=np.int64)).all():
        raise VerificationError(f"{where}: its anchor outputs are not for the plan's anchor ids.", hint=hint)
    return anchors
