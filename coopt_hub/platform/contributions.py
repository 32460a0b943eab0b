"""The platform's side of contributions by pull request: settling them after a merge. Those merged
are closed with a comment linking the new version, the others stay open with the reason. (Shards are
found wherever they were pushed by platform.status, and verified there by platform.verify.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from coopt_hub.core.manifest import Manifest
from coopt_hub.core.progress import Progress
from coopt_hub.hub.client import Hub
from coopt_hub.platform.status import CollaborationStatus
from coopt_hub.platform.verify import ShardVerification


@dataclass
class _Settlement:
    """What a merge says to one pull request."""

    merged: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def settle_pull_requests(hub: Hub, repo: str, status: CollaborationStatus, manifest: Manifest,
                         progress: Progress) -> None:
    """After the merge `manifest` (made from `status`): close each pull request it took a shard from,
    with a comment linking the version; comment on the others why they were not used (once per reason)."""
    link = f"{hub.endpoint.rstrip('/')}/datasets/{repo}/tree/{manifest.tag}"
    # By content: a merge that found main already holding these shards (taken from elsewhere) counts too.
    merged = {(s.shard, json.dumps(s.checksums, sort_keys=True)) for s in manifest.shards}
    settlements: dict[int, _Settlement] = {}
    for shard in status.shards:
        if shard.pull_request is not None:
            what = settlements.setdefault(shard.pull_request, _Settlement())
            checksums = json.dumps(shard.header.checksums, sort_keys=True) if shard.header else None
            if (shard.shard, checksums) in merged:
                what.merged.append(f"shard {shard.shard} ({shard.commit[:8]})")
            else:
                reason = "; ".join(shard.problems) or "not taken by this merge"
                what.rejected.append(f"shard {shard.shard} ({shard.commit[:8]}): {reason}")
        for passed in shard.passed_over:
            if passed.contribution.pull_request is not None:
                settlements.setdefault(passed.contribution.pull_request, _Settlement()).rejected.append(
                    f"shard {shard.shard} ({passed.contribution.commit[:8]}): {passed.reason}")
    for number, what in sorted(settlements.items()):
        _settle(hub, repo, number, what, progress, manifest.tag, link)


def report_failed_verification(hub: Hub, repo: str, status: CollaborationStatus,
                               results: Sequence[ShardVerification], progress: Progress) -> None:
    """A merge refused for failed verifications: each pull request whose shard failed is told why."""
    by_shard = {shard.shard: shard for shard in status.shards}
    for result in results:
        number = by_shard[result.shard].pull_request
        if number is not None and not result.passed:
            checks = "; ".join(f"{check.name} {check.status}: {check.message}" for check in result.problems())
            what = _Settlement(rejected=[f"shard {result.shard} ({str(result.commit)[:8]}): verification "
                                         f"{result.status} ({checks})"])
            _settle(hub, repo, number, what, progress)


def _settle(hub: Hub, repo: str, number: int, what: _Settlement, progress: Progress, tag: str | None = None,
            link: str | None = None) -> None:
    rejected = "".join(f"\n- not used: {line}" for line in what.rejected)
    if what.merged:
        hub.close(repo, number, f"Merged into {tag}: {', '.join(what.merged)}. See {link}{rejected}")
        progress.info(f"Closed pull request #{number} of {repo}: {', '.join(what.merged)} merged into {tag}.")
        return
    text = f"Not merged; this pull request stays open:{rejected}"
    if text not in hub.comments(repo, number):
        hub.comment(repo, number, text)
        progress.info(f"Pull request #{number} of {repo} stays open, not merged:{rejected}")
