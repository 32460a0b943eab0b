"""Where a shard's results can be: its branch shard/{k}, open pull requests that carry its files
(how participants without write access contribute, as on huggingface.co), and the commit a merge
published. Each place holding the shard's targets file is a candidate; the same file in several
places is one candidate. Which one counts (the newest that passes the checks) is for the caller.

Only the Hub's own calls are used (refs with pull requests, the open pull requests, paths-info
with each file's last commit), so the answer is the same from huggingface.co and the embedded hub.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from coopt_hub.core.layout import remote_paths, shard_branch
from coopt_hub.hub.client import Hub


@dataclass(frozen=True)
class Contribution:
    """Shard `shard`'s files as `commit` holds them, found on `origin`."""

    shard: int
    commit: str
    origin: str  # "shard/3", "pull request #4" or "merged"
    date: datetime  # when its targets file was last committed
    oid: str  # the targets file's content id
    pull_request: int | None = None
    author: str | None = None

    def describe(self) -> str:
        by = f" by {self.author}" if self.author else ""
        return f"{self.origin}{by} ({self.commit[:8]}, {self.date:%Y-%m-%d %H:%M})"

    def to_dict(self) -> dict:
        return {"origin": self.origin, "commit": self.commit, "date": self.date.isoformat(),
                "pull_request": self.pull_request, "author": self.author}


def find_contributions(hub: Hub, repo: str, num_shards: int, merged: Mapping[int, str] | None = None,
                       branches: Mapping[str, str] | None = None) -> dict[int, list[Contribution]]:
    """Every candidate of each shard that has one, newest first. `merged`: shard -> the commit main's
    latest merge took it from (its pull request may be closed since); `branches` (name -> head), when
    the caller has read them already."""
    branches = hub.refs(repo)[0] if branches is None else branches
    found: list[Contribution] = []
    for k in range(num_shards):
        if shard_branch(k) in branches:
            found += _read(hub, repo, branches[shard_branch(k)], [k], shard_branch(k))
    heads = hub.pull_request_heads(repo)
    everything = list(range(num_shards))
    for pr in hub.open_pull_requests(repo):
        if pr.number in heads:
            found += _read(hub, repo, heads[pr.number], everything, f"pull request #{pr.number}", pr.number, pr.author)
    for k, commit in (merged or {}).items():
        if 0 <= k < num_shards:
            found += _read(hub, repo, commit, [k], "merged")
    return _distinct(found)


def own_pull_request(hub: Hub, repo: str, shard: int, author: str) -> Contribution | None:
    """The newest open pull request of `author` that carries shard `shard`'s files, if any."""
    heads = hub.pull_request_heads(repo)
    mine = [pr for pr in hub.open_pull_requests(repo, author=author) if pr.number in heads]
    for pr in reversed(mine):
        found = _read(hub, repo, heads[pr.number], [shard], f"pull request #{pr.number}", pr.number, pr.author)
        if found:
            return found[0]
    return None


def _read(hub: Hub, repo: str, commit: str, shards: list[int], origin: str, pull_request: int | None = None,
          author: str | None = None) -> list[Contribution]:
    """The candidates among `shards` whose targets file `commit` holds."""
    paths = {remote_paths(k).targets: k for k in shards}
    versions = hub.file_versions(repo, commit, list(paths))
    return [Contribution(paths[path], commit, origin, version.date, version.oid, pull_request, author)
            for path, version in versions.items() if path in paths]


def _distinct(found: list[Contribution]) -> dict[int, list[Contribution]]:
    """By shard, newest first; one candidate per targets file (the first place found: branch, pull
    request, merge). A pull request made from a main that holds shard files repeats them."""
    by_shard: dict[int, dict[str, Contribution]] = {}
    for contribution in found:
        by_shard.setdefault(contribution.shard, {}).setdefault(contribution.oid, contribution)
    def age(c: Contribution) -> tuple:
        return c.date, -1 if c.pull_request is None else c.pull_request

    return {k: sorted(seen.values(), key=age, reverse=True) for k, seen in sorted(by_shard.items())}
