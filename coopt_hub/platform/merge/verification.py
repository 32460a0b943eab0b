"""`merge --verify`: every shard checked against its declared prior (platform.verify) while its
downloaded files are at hand; the refusal names every shard that did not pass.
"""

from __future__ import annotations

from coopt_hub.core.manifest import MergeVerification
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import Progress
from coopt_hub.core.shardfile import AnchorOutputs, ShardResult
from coopt_hub.errors import VerificationError
from coopt_hub.hub.client import Hub
from coopt_hub.platform.card import prior_label
from coopt_hub.platform.status import ShardStatus
from coopt_hub.platform.verify import FAILED, PriorLoader, ShardVerification, Thresholds, failure_error, verify_shard

# `verify` draws each shard's sample with this seed, as `coopt-hub verify` does by default.
VERIFY_SEED = 0


class MergeVerifier:
    """`merge --verify`: each shard checked against its declared prior (platform.verify) while its
    downloaded files are at hand; the refusal comes after the last shard, naming every failure."""

    def __init__(self, hub: Hub, repo: str, plan: Plan, sample: int, progress: Progress):
        thresholds = Thresholds()
        self.record = MergeVerification(sample, VERIFY_SEED, thresholds.min_cosine, thresholds.tolerance)
        self.hub, self.repo, self.plan, self.progress = hub, repo, plan, progress
        self.thresholds = thresholds
        self.priors = PriorLoader()  # keeps the last prior loaded: shards often share one
        self.results: list[ShardVerification] = []

    def check(self, status: ShardStatus, result: ShardResult, anchors: AnchorOutputs) -> None:
        prior = prior_label(status.header.prior)
        self.progress.info(f"Shard {status.shard}: verifying with its declared prior {prior} "
                           f"({self.record.sample} images and all anchors re-encoded).")
        report = verify_shard(
            self.hub, self.repo, self.plan, status.shard, self.record.sample, self.record.seed,
            thresholds=self.thresholds, commit=status.commit, files=(result, anchors), priors=self.priors,
            progress=self.progress,
        )
        self.progress.info(f"Shard {status.shard}: verification {report.status}.")
        for check in report.problems():
            self.progress.info(f"Shard {status.shard}: {check.name} ({check.status}): {check.message}")
        self.results.append(report)

    def refuse_failures(self) -> None:
        error = failure_error(self.results, self.repo)
        if error is None:
            return
        if any(report.status == FAILED for report in self.results):
            hint = error.hint
        else:
            hint = (f"The declared weights are not available here. `coopt-hub verify {self.repo} --checkpoint-dir DIR` "
                    "checks with local copies of them; merging without --verify publishes the shards unverified.")
        raise VerificationError(f"{error} Nothing was written.", hint=hint)
