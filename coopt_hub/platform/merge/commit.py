"""Publishing a merge: one commit on main pinned to the head it was built from, then its vN tag,
safe against concurrent merges.
"""

from __future__ import annotations

import copy
import queue
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from huggingface_hub import CommitOperation, CommitOperationAdd, CommitOperationDelete

from coopt_hub.core import faults
from coopt_hub.core.layout import MANIFEST_PATH, MERGED_FOLDERS
from coopt_hub.core.manifest import Manifest, next_tag
from coopt_hub.core.plan import Plan
from coopt_hub.core.progress import Progress
from coopt_hub.core.shardfile import plain_text
from coopt_hub.errors import ConfigError, ConflictError, describe_error
from coopt_hub.hub.client import Hub
from coopt_hub.hub.repo import load_plan, read_manifest


@dataclass(frozen=True)
class MergeResult:
    repo: str
    tag: str
    commit: str
    created: bool  # False: main already held this merge
    manifest: Manifest


@dataclass(frozen=True)
class Publication:
    """What a merge publishes: the big files, uploaded once, and the small ones (manifest and card),
    which carry the version name and so are written for the name free when the commit is built."""

    plan: Plan
    uploads: list[tuple[Path, str]]  # (local file, path in the repo)
    draft: Manifest  # the manifest but for its tag
    card_for: Callable[[Manifest], str]
    message: str
    uploaded: dict[Path, CommitOperationAdd] = field(default_factory=dict)  # local file -> uploaded ahead

    def manifest(self, tag: str) -> Manifest:
        return replace(self.draft, tag=tag)

    def addition(self, local: Path, path: str) -> CommitOperationAdd:
        """The operation adding `local` as `path`: the one uploaded ahead, once (huggingface_hub's
        operations are not to be reused across commits), else a new one. A file uploaded ahead
        under a provisional name (a parquet file, named `-of-N` once all are written) is committed
        as `path`: the upload is of its content, which the name does not change."""
        early = self.uploaded.pop(local, None)
        if early is None:
            return CommitOperationAdd(path, str(local))
        if early.path_in_repo != path:
            early = copy.copy(early)  # keeps the upload's sha256 and state; its constructor would hash again
            early.path_in_repo = path
        return early


# Files uploading at once ahead of the commit. The first is the merged targets (2 GB at 1M x 512):
# with one upload at a time the parquet files queued behind it, and at 1M x 512 the merge then
# waited ~6 s after its last file for the uploads.
UPLOAD_WORKERS = 2


class EarlyUpload:
    """Big files uploaded on UPLOAD_WORKERS threads while the merge goes on (Hub.preupload), each
    as soon as it is `add`ed, so that the commit adds them without uploading them then. Once an
    upload fails, the files not uploaded yet are left to the commit, which uploads them itself."""

    def __init__(self, hub: Hub, repo: str, files: Iterable[tuple[Path, str]] = ()):
        self._queue: queue.SimpleQueue[tuple[Path, str] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._added: list[tuple[Path, str]] = []
        self._uploaded: dict[Path, CommitOperationAdd] = {}
        self._error: Exception | None = None
        self._closed = False
        # Daemons: a merge that fails meanwhile exits without waiting for the uploads.
        self._threads = [threading.Thread(target=self._upload, args=(hub, repo), name=f"coopt-merge-upload-{k}",
                                          daemon=True) for k in range(UPLOAD_WORKERS)]
        for thread in self._threads:
            thread.start()
        for local, path in files:
            self.add(local, path)

    def add(self, local: Path, path: str) -> None:
        """Upload `local` (complete: it must not change from now on) as if at `path`; Publication
        commits it under its final name."""
        with self._lock:
            self._added.append((local, path))
        self._queue.put((local, path))

    def _upload(self, hub: Hub, repo: str) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue
            try:
                (operation,) = hub.preupload(repo, "main", [item])
            except Exception as err:  # noqa: BLE001 -- reported by operations(); the commit uploads the files
                with self._lock:
                    self._error = self._error or err
                continue
            with self._lock:
                self._uploaded[item[0]] = operation

    def operations(self, progress: Progress) -> dict[Path, CommitOperationAdd]:
        """Once every file added has been tried: local file -> its uploaded operation (none for a
        file whose upload failed, or was not tried after one had)."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            left = [path for local, path in self._added if local not in self._uploaded]
            _, message, _ = describe_error(self._error)
            progress.warn(f"Uploading {', '.join(left)} ahead of the commit failed ({message}); "
                          "the commit uploads it.")
        return dict(self._uploaded)


# A version tag: what huggingface.co and the embedded hub both take as a tag and a `revision=`, and
# never a full commit id, which it would shadow.
_TAG_NAME = re.compile(r"(?![0-9a-f]{40}$)[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def check_tag_free(repo: str, tag: str, tags: dict[str, str]) -> None:
    """Refuse, before anything is written, a tag name the Hub would refuse or one already taken."""
    if not _TAG_NAME.fullmatch(tag) or tag.endswith((".", ".lock")) or ".." in tag:
        raise ConfigError(f"--tag {tag!r} is not a usable version tag; nothing was written.",
                          hint=f"Use letters, digits, '.', '_' and '-' (e.g. {next_tag(tags)}), or omit --tag.")
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


def publish_merge(hub: Hub, repo: str, publication: Publication, tag: str | None, progress: Progress) -> MergeResult:
    """One commit on main with everything, then the tag (`tag`, or the next free vN); safe against
    concurrent merges."""
    for _ in range(hub.retry.attempts):
        build = _MainCommit(hub, repo, publication, tag)
        progress.info(f"Committing {len(publication.uploads)} data files to main.")
        # Plain text only: the title names a participant's prior, and hubs show titles in their pages.
        commit = hub.commit(repo, "main", build, message=plain_text(publication.message, limit=200))
        faults.reach("merge-tag")
        manifest = build.manifest
        if claim_tag(hub, repo, manifest.tag, commit):
            return MergeResult(repo, manifest.tag, commit, created=build.committed, manifest=manifest)
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


class _MainCommit:
    """The merge commit on main, built from the head Hub.commit gives it on each try. Afterwards
    `manifest` is the merge main holds and `committed` whether this commit put it there."""

    def __init__(self, hub: Hub, repo: str, publication: Publication, tag: str | None):
        self.hub, self.repo, self.publication, self.tag = hub, repo, publication, tag
        self.manifest: Manifest | None = None
        self.committed = False

    def __call__(self, head: str | None) -> list[CommitOperation] | None:
        self.committed = False
        _, tags = self.hub.refs(self.repo)
        current = read_manifest(self.hub, self.repo, head)
        draft = self.publication.draft
        there = current is not None and current.satisfies(draft.content_key, draft.verification)
        if there and tags.get(current.tag, head) == head:
            # This merge is already there (an earlier try, or a concurrent merge of the same
            # shards) and its version name is still its own.
            self.manifest = current
            return None
        self.manifest = self.publication.manifest(self.tag or next_tag(tags))
        if self.tag is not None:
            check_tag_free(self.repo, self.tag, tags)
        if load_plan(self.hub, self.repo, head).plan_hash != self.publication.plan.plan_hash:
            raise ConflictError(
                f"The plan on {self.repo}'s main changed during the merge; nothing was written.",
                hint="Check `coopt-hub status`, then run the merge again.",
            )
        operations = self._operations(head, self.manifest)
        self.committed = True
        return operations

    def _operations(self, head: str | None, manifest: Manifest) -> list[CommitOperation]:
        """Everything under the merged folders replaced by the uploads, and the manifest and card written."""
        card = self.publication.card_for(manifest)
        uploads = self.publication.uploads
        uploaded_paths = {path for _, path in uploads}
        stale = [path for path in self.hub.list_files(self.repo, head) if path.startswith(MERGED_FOLDERS)]
        return [
            *(CommitOperationDelete(path) for path in stale if path not in uploaded_paths),
            *(self.publication.addition(local, path) for local, path in uploads),
            CommitOperationAdd(MANIFEST_PATH, manifest.to_json().encode()),
            CommitOperationAdd("README.md", card.encode()),
        ]
