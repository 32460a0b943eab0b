"""Publishing a merge: one commit on main pinned to the head it was built from, then its vN tag,
safe against concurrent merges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete

from coopt_hub.core import faults
from coopt_hub.core.layout import MANIFEST_PATH, MERGED_FOLDERS
from coopt_hub.core.manifest import Manifest, next_tag
from coopt_hub.core.plan import Plan
from coopt_hub.errors import ConflictError
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_plan, read_manifest


def check_tag_free(repo: str, tag: str, tags: dict[str, str]) -> None:
    if tag in tags:
        raise ConflictError(
            f"Tag {tag} already exists in {repo} (commit {tags[tag][:12]}); nothing was written.",
            hint=f"Omit --tag to take the next free version ({next_tag(tags)}), or pass another name.",
        )


def claim_tag(hub: Hub, repo: str, tag: str, commit: str) -> bool:
    """Point `tag` at `commit`; False when another commit already holds that tag."""
    try:
        hub.create_tag(repo, tag, commit, f"coopt-hub merge {tag}")
    except ConflictError:
        _, tags = hub.refs(repo)
        return tags.get(tag) == commit
    return True


def publish_merge(
    hub: Hub,
    repo: str,
    plan: Plan,
    uploads: list[tuple[Path, str]],
    manifest_for: Callable[[str], Manifest],
    card_for: Callable[[Manifest], str],
    tag: str | None,
    message: str,
    progress: Callable[[str], None],
) -> MergeResult:
    """One commit on main with everything, then the tag; safe against concurrent merges.

    The small files (manifest, card) carry the version name, so they are rebuilt on every try from
    the tags that exist then; the big files are uploaded once and reused.
    """
    uploaded_paths = {path for _, path in uploads}
    wanted = manifest_for("")
    for _ in range(hub.retry.attempts):
        state: dict[str, Any] = {"manifest": None, "committed": False}

        def build(head: str | None):
            state["committed"] = False
            _, tags = hub.refs(repo)
            current = read_manifest(hub, repo, head)
            there = current is not None and current.satisfies(wanted.content_key, wanted.verification)
            if there and tags.get(current.tag, head) == head:
                # This merge is already there (an earlier try, or a concurrent merge of the same
                # shards) and its version name is still its own.
                state["manifest"] = current
                return None
            manifest = manifest_for(tag or next_tag(tags))
            state["manifest"] = manifest
            if tag is not None:
                check_tag_free(repo, tag, tags)
            if load_plan(hub, repo, head).plan_hash != plan.plan_hash:
                raise ConflictError(
                    f"The plan on {repo}'s main changed during the merge; nothing was written.",
                    hint="Check `coopt-hub status`, then run the merge again.",
                )
            card = card_for(manifest)
            stale = [path for path in hub.list_files(repo, head) if path.startswith(MERGED_FOLDERS)]
            state["committed"] = True
            return [
                *(CommitOperationDelete(path) for path in stale if path not in uploaded_paths),
                *(CommitOperationAdd(path, str(local)) for local, path in uploads),
                CommitOperationAdd(MANIFEST_PATH, manifest.to_json().encode()),
                CommitOperationAdd("README.md", card.encode()),
            ]

        progress(f"Committing {len(uploads)} data files to main.")
        commit = hub.commit(repo, "main", build, message=message)
        faults.reach("merge-tag")
        manifest = state["manifest"]
        if claim_tag(hub, repo, manifest.tag, commit):
            return MergeResult(repo, manifest.tag, commit, created=state["committed"], manifest=manifest)
        if tag is not None:
            raise ConflictError(
                f"Tag {tag} was taken by a concurrent merge; main holds this merge untagged at {commit[:12]}.",
                hint="Run the merge again with another --tag (or none): it tags the commit without re-uploading.",
            )
        # Another merge tagged this version between our commit and our tag: the next try renames
        # ours in a small follow-up commit (the data files are already there).
    raise ConflictError(
        f"Could not claim a version tag on {repo} after {hub.retry.attempts} tries: other merges keep taking them.",
        hint="Run the merge again when the other merges have finished.",
    )


@dataclass(frozen=True)
class MergeResult:
    repo: str
    tag: str
    commit: str
    created: bool  # False: main already held this merge
    manifest: Manifest
