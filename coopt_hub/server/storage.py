"""On-disk storage: one bare git repository per Hub repo, plus its LFS objects.

Layout under the root:
    repos/{models|datasets|spaces}/{namespace}/{name}.git   bare git repo (dulwich)
        coopt-hub.json                                      repo settings (private, createdAt)
        coopt-hub.lock                                      flock held by every writer
        lfs/objects/{oid[:2]}/{oid[2:4]}/{oid}              LFS content, addressed by sha256
    trash/                                                  deleted repos, removed right after the move

Git holds LFS files as pointer blobs, as the Hub does. Every write (commit, branch, tag, delete)
happens under the repo's flock, so threads and processes sharing a root are serialized; objects
are written first and the ref is moved last with compare-and-swap, so a crash leaves at most
unreferenced objects behind, never a partial commit.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from dulwich.errors import NotGitRepository, NotTreeError
from dulwich.file import FileLocked
from dulwich.objects import Blob, Commit, Tag, Tree
from dulwich.diff_tree import tree_changes
from dulwich.object_store import tree_lookup_path
from dulwich.repo import Repo

from coopt_hub.server.discussions import DiscussionStore
from coopt_hub.server.errors import HubError, bad_request, entry_not_found, repo_not_found, revision_not_found
from coopt_hub.server.names import DEFAULT_BRANCH, PLURALS, RepoId, is_valid_ref_name, make_repo_id

# Which files go through LFS. Preupload answers "lfs" for files above the threshold, files
# whose name ends with one of these suffixes (data, weights, archives, media), and files whose
# first bytes contain a NUL byte; the initial .gitattributes records the same suffixes.
LFS_THRESHOLD = 10 * 1024 * 1024
LFS_SUFFIXES = (
    ".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".flac", ".gif", ".gz", ".h5", ".jpeg", ".jpg", ".joblib",
    ".model", ".mp3", ".mp4", ".msgpack", ".npy", ".npz", ".onnx", ".parquet", ".pickle", ".pkl", ".png",
    ".pt", ".pth", ".safetensors", ".tar", ".tfrecord", ".tflite", ".wav", ".webp", ".xz", ".zip", ".zst",
)

_LFS_POINTER = re.compile(rb"^version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_SHORT_ID = re.compile(r"^[0-9a-f]{7,39}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_POINTER_SIZE = 200
_ABANDONED_AFTER_S = 3600
_DIR_MODE = 0o040000
_FILE_MODE = 0o100644
_CHUNK = 1024 * 1024
MAX_EXPAND_COMMITS = 10_000
_MAX_CACHED_TREES = 50_000


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    return size > LFS_THRESHOLD or path.lower().endswith(LFS_SUFFIXES) or b"\x00" in sample


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def is_sha256(oid: object) -> bool:
    return isinstance(oid, str) and bool(_SHA256.match(oid))


def iso_date(timestamp: float) -> str:
    """The one date format huggingface_hub's parse_datetime reads."""
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Entry:
    """A file or folder of a commit's tree, in the shape of the Hub's tree entries."""

    path: str
    type: str  # "file" | "directory"
    oid: str  # git object id: blob sha1 (the LFS pointer's, for LFS files) or tree sha1
    size: int  # the real content size; 0 for folders
    lfs_oid: str | None = None
    pointer_size: int = 0

    def to_json(self) -> dict:
        data: dict = {"type": self.type, "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs_oid is not None:
            data["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": self.pointer_size}
        return data

    @property
    def etag(self) -> str:
        return self.lfs_oid or self.oid


@dataclass(frozen=True)
class CommitInfo:
    id: str
    title: str
    message: str
    author: str
    timestamp: int
    parents: tuple[str, ...] = ()


@dataclass(frozen=True)
class Change:
    """A file a commit changed, against its first parent."""

    kind: str  # "add" | "modify" | "delete"
    path: str


@dataclass(frozen=True)
class Ref:
    name: str  # "main", "shard/3", "v1", "refs/pr/1"
    ref: str  # "refs/heads/main"
    target: str  # the commit it points at (tags are peeled)


@dataclass(frozen=True)
class AddFile:
    path: str
    blob_id: str  # already in the object store (GitRepo.add_blob)


@dataclass(frozen=True)
class AddLfsFile:
    path: str
    oid: str
    size: int | None  # absent when the client copies an LFS file


@dataclass(frozen=True)
class DeleteFile:
    path: str


@dataclass(frozen=True)
class DeleteFolder:
    path: str


Operation = AddFile | AddLfsFile | DeleteFile | DeleteFolder


class _BlobSummaries:
    """(size, lfs oid, lfs size) per blob id, shared by all repos: blobs are content-addressed."""

    def __init__(self, capacity: int = 200_000):
        self._capacity = capacity
        self._items: OrderedDict[bytes, tuple[int, str | None, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sha: bytes) -> tuple[int, str | None, int] | None:
        with self._lock:
            item = self._items.get(sha)
            if item is not None:
                self._items.move_to_end(sha)
            return item

    def put(self, sha: bytes, item: tuple[int, str | None, int]) -> None:
        with self._lock:
            self._items[sha] = item
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)


_SUMMARIES = _BlobSummaries()


class GitRepo:
    """One Hub repo: reads are lock-free (git objects never change), writes take the repo lock."""

    def __init__(self, path: Path, repo_id: RepoId):
        self.path = path
        self.repo_id = repo_id
        self.git = Repo(str(path))

    # ---- settings --------------------------------------------------------------------------

    @property
    def settings(self) -> dict:
        return json.loads((self.path / "coopt-hub.json").read_text())

    @property
    def private(self) -> bool:
        return bool(self.settings.get("private"))

    def update_settings(self, **changes: object) -> None:
        with self.locked():
            _write_json_atomic(self.path / "coopt-hub.json", {**self.settings, **changes})

    # ---- revisions and refs ----------------------------------------------------------------

    def resolve(self, revision: str) -> str:
        """A full commit id (always that commit), then a branch, a tag (`refs/...` names taken
        literally), then an unambiguous short commit id of 7 or more hex digits."""
        if _HEX40.match(revision) and self._is_commit(revision.encode()):
            return revision
        names = [revision] if revision.startswith("refs/") else [f"refs/heads/{revision}", f"refs/tags/{revision}"]
        for name in names:
            if not _is_safe_ref(name):
                continue
            try:
                sha = self.git.refs[name.encode()]
            except KeyError:
                continue
            return self._peel(sha)
        commit = self._expand_short_id(revision)
        if commit is None:
            raise self._missing(revision)
        return commit

    def _expand_short_id(self, revision: str) -> str | None:
        if not _SHORT_ID.match(revision):
            return None
        try:
            names = os.listdir(self.path / "objects" / revision[:2])
        except FileNotFoundError:
            return None
        matches = [revision[:2] + name for name in names if name.startswith(revision[2:])]
        commits = [sha for sha in matches if _HEX40.match(sha) and self._is_commit(sha.encode())]
        return commits[0] if len(commits) == 1 else None

    def branch_head(self, revision: str) -> str:
        """Commits go to branches only: a tag or commit id is RevisionNotFound here."""
        head = self._read_ref(_branch_ref(revision))
        if head is None:
            raise self._missing(revision)
        return head

    def _missing(self, revision: str) -> HubError:
        """A repo deleted after it was opened has no refs at all: that is RepoNotFound, not a
        missing revision, so a client racing a delete gets the answer that is true."""
        if not (self.path / "coopt-hub.json").is_file():
            return repo_not_found()
        return revision_not_found(revision)

    def refs(self) -> dict[str, list[Ref]]:
        groups: dict[str, list[Ref]] = {"branches": [], "tags": [], "converts": [], "pullRequests": []}
        prefixes = [("refs/heads/", "branches"), ("refs/tags/", "tags"), ("refs/convert/", "converts"),
                    ("refs/pr/", "pullRequests")]
        for raw_name in sorted(self.git.refs.allkeys()):
            name = raw_name.decode()
            for prefix, group in prefixes:
                if name.startswith(prefix):
                    short = name[len(prefix):] if group in ("branches", "tags") else name
                    try:
                        target = self._peel(self.git.refs[raw_name])
                    except KeyError:
                        break
                    groups[group].append(Ref(short, name, target))
                    break
        return groups

    def _peel(self, sha: bytes) -> str:
        obj = self.git.object_store[sha]
        while isinstance(obj, Tag):
            obj = self.git.object_store[obj.object[1]]
        if not isinstance(obj, Commit):
            raise bad_request("Revision does not point at a commit.")
        return obj.id.decode()

    def _is_commit(self, sha: bytes) -> bool:
        try:
            return isinstance(self.git.object_store[sha], Commit)
        except KeyError:
            return False

    def commit_info(self, sha: str) -> CommitInfo:
        commit = self.git.object_store[sha.encode()]
        text = commit.message.decode("utf-8", "replace")
        title, _, body = text.partition("\n")
        author = commit.author.decode("utf-8", "replace").split(" <", 1)[0]
        parents = tuple(parent.decode() for parent in commit.parents)
        return CommitInfo(sha, title.strip(), body.strip("\n"), author, commit.commit_time, parents)

    def changes(self, sha: str) -> list[Change]:
        """The files commit `sha` changed against its first parent (all of them for a root commit)."""
        store = self.git.object_store
        commit = store[sha.encode()]
        parent_tree = store[commit.parents[0]].tree if commit.parents else None
        found = []
        for change in tree_changes(store, parent_tree, commit.tree):
            if change.type == "delete":
                found.append(Change("delete", change.old.path.decode()))
            elif change.type in ("add", "modify"):
                found.append(Change(change.type, change.new.path.decode()))
            else:  # a rename or a copy (not detected by default): the file at its new path
                found.append(Change("modify", change.new.path.decode()))
        return sorted(found, key=lambda item: item.path)

    def history(self, sha: str) -> Iterator[CommitInfo]:
        """Newest first."""
        for walk_entry in self.git.get_walker(include=[sha.encode()]):
            yield self.commit_info(walk_entry.commit.id.decode())

    def last_commits(self, sha: str, paths: list[str]) -> dict[str, CommitInfo]:
        """For each path, the newest commit from `sha` back that changed it (expanded tree entries).

        One first-parent walk serves every path, comparing each commit's entry with its parent's
        (untouched subtrees compare equal at the first level); it stops after MAX_EXPAND_COMMITS,
        and paths unchanged that far get the oldest commit seen.
        """
        lookup = _TreeLookup(self.git.object_store)
        pending = {path: path.encode().split(b"/") for path in dict.fromkeys(paths)}
        found: dict[str, CommitInfo] = {}
        commit = self.git.object_store[sha.encode()]
        for _ in range(MAX_EXPAND_COMMITS):
            parent = self.git.object_store[commit.parents[0]] if commit.parents else None
            if parent is None or parent.tree != commit.tree:
                changed = [path for path, parts in pending.items()
                           if parent is None or lookup(commit.tree, parts) != lookup(parent.tree, parts)]
                for path in changed:
                    found[path] = self.commit_info(commit.id.decode())
                    del pending[path]
            if not pending or parent is None:
                break
            commit = parent
        oldest = self.commit_info(commit.id.decode())
        return {**dict.fromkeys(pending, oldest), **found}

    # ---- trees and files -------------------------------------------------------------------

    def entry(self, commit: str, path: str) -> Entry | None:
        tree_id = self.git.object_store[commit.encode()].tree
        if not path:
            return Entry("", "directory", tree_id.decode(), 0)
        try:
            mode, sha = tree_lookup_path(self.git.object_store.__getitem__, tree_id, path.encode())
        except (KeyError, NotTreeError):
            return None
        return self._entry(path, mode, sha)

    def list_dir(self, commit: str, path: str, recursive: bool) -> list[Entry]:
        """Entries under the folder `path` ("" for the root); raises EntryNotFound if it is not a folder."""
        folder = self.entry(commit, path)
        if folder is None or folder.type != "directory":
            raise entry_not_found(path, commit)
        return list(self._walk(folder.oid.encode(), path, recursive))

    def files(self, commit: str) -> list[Entry]:
        return [e for e in self.list_dir(commit, "", recursive=True) if e.type == "file"]

    def _walk(self, tree_id: bytes, prefix: str, recursive: bool) -> Iterator[Entry]:
        for item in self.git.object_store[tree_id].iteritems():
            if item.mode == 0o160000:  # submodules never come from the Hub API
                continue
            path = f"{prefix}/{item.path.decode()}" if prefix else item.path.decode()
            entry = self._entry(path, item.mode, item.sha)
            yield entry
            if recursive and entry.type == "directory":
                yield from self._walk(item.sha, path, recursive)

    def _entry(self, path: str, mode: int, sha: bytes) -> Entry:
        if stat.S_ISDIR(mode):
            return Entry(path, "directory", sha.decode(), 0)
        size, lfs_oid, lfs_size = self._blob_summary(sha)
        if lfs_oid is not None:
            return Entry(path, "file", sha.decode(), lfs_size, lfs_oid, size)
        return Entry(path, "file", sha.decode(), size)

    def _blob_summary(self, sha: bytes) -> tuple[int, str | None, int]:
        summary = _SUMMARIES.get(sha)
        if summary is None:
            size = self._loose_blob_size(sha)
            if size is None or size <= _MAX_POINTER_SIZE:
                data = self.git.object_store[sha].as_raw_string()
                size = len(data)
                match = _LFS_POINTER.match(data) if size <= _MAX_POINTER_SIZE else None
                summary = (size, match.group(1).decode(), int(match.group(2))) if match else (size, None, 0)
            else:
                summary = (size, None, 0)
            _SUMMARIES.put(sha, summary)
        return summary

    def _loose_blob_size(self, sha: bytes) -> int | None:
        """Read the size from a loose object's header without inflating the whole blob."""
        hexsha = sha.decode()
        try:
            with open(self.path / "objects" / hexsha[:2] / hexsha[2:], "rb") as f:
                head = zlib.decompressobj().decompress(f.read(64), 64)
        except (OSError, zlib.error):
            return None
        kind, _, rest = head.partition(b" ")
        size, sep, _ = rest.partition(b"\0")
        return int(size) if kind == b"blob" and sep and size.isdigit() else None

    def read_blob(self, oid: str) -> bytes:
        return self.git.object_store[oid.encode()].as_raw_string()

    def read_file(self, commit: str, path: str, limit: int) -> bytes | None:
        """The content of file `path` at `commit`, regular or LFS; None when it is absent, a folder,
        larger than `limit` bytes, or an LFS file whose object is missing."""
        entry = self.entry(commit, path)
        if entry is None or entry.type != "file" or entry.size > limit:
            return None
        if entry.lfs_oid is None:
            return self.read_blob(entry.oid)
        try:
            return self.lfs_path(entry.lfs_oid).read_bytes()
        except FileNotFoundError:
            return None

    def add_blob(self, path: str, content: bytes) -> str:
        """Store a regular file's content; unreferenced until a commit names it."""
        if len(content) > LFS_THRESHOLD:
            raise bad_request(f"{path!r} has {len(content)} bytes: files above {LFS_THRESHOLD} bytes must go "
                              "through LFS (preupload answers 'lfs' for them).")
        blob = Blob.from_string(content)
        self._add_object(blob)
        return blob.id.decode()

    def iter_blob(self, oid: str, offset: int, length: int) -> Iterator[bytes]:
        """`length` bytes of a regular file from `offset`, inflated piece by piece from its loose
        object: a one-byte range never holds the whole blob in memory."""
        hexsha = oid
        try:
            handle = open(self.path / "objects" / hexsha[:2] / hexsha[2:], "rb")
        except FileNotFoundError:  # a packed object (git gc); regular files are small by construction
            yield self.read_blob(oid)[offset: offset + length]
            return
        with handle:
            skip, remaining, header = offset, length, True
            for piece in _inflate(handle):
                if header:  # "blob <size>\0" precedes the content
                    piece, header = piece[piece.index(b"\0") + 1:], False
                if skip:
                    dropped = min(skip, len(piece))
                    piece, skip = piece[dropped:], skip - dropped
                if piece and remaining:
                    piece = piece[:remaining]
                    remaining -= len(piece)
                    yield piece
                if not remaining:
                    return

    # ---- LFS objects -----------------------------------------------------------------------

    def lfs_path(self, oid: str) -> Path:
        return self.path / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    def has_lfs(self, oid: str, size: int | None = None) -> bool:
        try:
            actual = self.lfs_path(oid).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    def receive_lfs(self, oid: str, size: int, upload: Path, sha256: str) -> None:
        """Move an upload (a spooled request body on the same disk) into the store, only if its
        bytes hash to `oid`: content-addressed, so never overwritten wrongly. `sha256`: the
        upload's digest, taken as its bytes arrived (http.Body.sha256)."""
        received = upload.stat().st_size
        if received != size:
            raise bad_request(f"LFS upload of {oid} has {received} bytes, expected {size}.")
        if sha256 != oid:
            raise bad_request(f"LFS upload does not match its oid {oid} (got sha256 {sha256}).")
        final = self.lfs_path(oid)
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(upload, final)

    # ---- writes ----------------------------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive per-repo lock across threads and processes (flock on a fresh descriptor)."""
        lock_path = self.path / "coopt-hub.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the repo directory itself is gone
            raise repo_not_found() from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Deleted while we waited (the directory moved to trash), perhaps even re-created under
            # the same name: then our lock is on another repo's file and guards nothing.
            try:
                same_repo = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_repo = False
            if not same_repo:
                raise repo_not_found()
            yield
        finally:
            os.close(fd)

    def commit(self, revision: str, operations: list[Operation], summary: str, description: str,
               parent_commit: str | None, author: str) -> str:
        with self.locked():
            head = self.branch_head(revision)
            if parent_commit is not None and not head.startswith(parent_commit):  # 7+ hex digits will do
                # The second sentence is the Hub's, which clients look for.
                raise HubError(412, "A commit has happened since parentCommit. The branch was updated since you opened "
                               "this page. Please refresh and try again.", "PreconditionFailed")
            oid = self._build(head, operations, summary, description, author, revision)
            self._move_ref(_branch_ref(revision), head, oid)
            if revision.startswith("refs/pr/"):
                self._record_pr_commit(int(revision.rsplit("/", 1)[1]), oid, summary, author)
            return oid

    def commit_pull_request(self, base: str, operations: list[Operation], summary: str, description: str,
                            parent_commit: str | None, author: str) -> tuple[int, str]:
        """Open a pull request on branch `base` holding one commit: (its number, the commit id).
        It starts from `parent_commit` when given, else from the head of `base`."""
        with self.locked():
            start = self.branch_head(base)
            if parent_commit is not None:
                start = self.resolve(parent_commit)
            oid = self._build(start, operations, summary, description, author, base)
            records = self.discussions.load()
            record = self.discussions.new(records, summary, description, author, True, base, start)
            self._move_ref(f"refs/pr/{record['num']}", None, oid)
            self.discussions.event(record, "commit", author, {"subject": summary, "oid": oid})
            self.discussions.save(records)
            return record["num"], oid

    def _build(self, head: str, operations: list[Operation], summary: str, description: str, author: str,
               revision: str) -> str:
        """Write the commit of `operations` on top of `head` (objects only; no ref moves)."""
        for op in operations:
            if isinstance(op, AddLfsFile) and not self.has_lfs(op.oid, op.size):
                raise bad_request(f"LFS object {op.oid} for {op.path!r} was not uploaded (or has another size).")
        root = _MutableTree(self, self.git.object_store[head.encode()].tree)
        for op in operations:
            self._apply(root, op, revision)
        message = summary if not description else f"{summary}\n\n{description}"
        commit = _new_commit(root.write(), [head.encode()], message, author)
        self._add_object(commit)
        return commit.id.decode()

    def _record_pr_commit(self, num: int, oid: str, summary: str, author: str) -> None:
        records = self.discussions.load()
        record = self.discussions.get(records, num)
        self.discussions.event(record, "commit", author, {"subject": summary, "oid": oid})
        self.discussions.save(records)

    # ---- discussions and pull requests -----------------------------------------------------

    @property
    def discussions(self) -> DiscussionStore:
        return DiscussionStore(self.path / "discussions.json", iso_date)

    def open_discussion(self, title: str, description: str, author: str, pull_request: bool) -> int:
        """A discussion, or an empty draft pull request on main (as create_pull_request makes)."""
        with self.locked():
            records = self.discussions.load()
            base, start = (DEFAULT_BRANCH, self.branch_head(DEFAULT_BRANCH)) if pull_request else (None, None)
            record = self.discussions.new(records, title, description, author, pull_request, base, start,
                                          status="draft" if pull_request else "open")
            if pull_request:
                self._move_ref(f"refs/pr/{record['num']}", None, start)
            self.discussions.save(records)
            return record["num"]

    def change_discussion(self, num: int, change: Callable[[DiscussionStore, dict], dict]) -> dict:
        """Apply `change(store, record)` under the lock; returns the event it made."""
        with self.locked():
            records = self.discussions.load()
            event = change(self.discussions, self.discussions.get(records, num))
            self.discussions.save(records)
            return event

    def pull_request_conflicts(self, record: dict) -> list[str]:
        if not record["isPullRequest"] or record["status"] == "merged":
            return []
        return _conflicts(*self._pr_changes(record))

    def _pr_changes(self, record: dict) -> tuple[dict, dict]:
        """(path -> (mode, sha) or None) changed by the PR, and by its base since the PR started."""
        store = self.git.object_store
        start = store[record["baseCommit"].encode()].tree
        pr_tree = store[self.git.refs[f"refs/pr/{record['num']}".encode()]].tree
        base_tree = store[self.branch_head(record["base"]).encode()].tree
        return _changed(store, start, pr_tree), _changed(store, start, base_tree)

    def merge_pull_request(self, num: int, author: str, comment: str | None) -> dict:
        """Apply the PR's changes onto its base in a merge commit; 409 when both changed a file."""
        with self.locked():
            records = self.discussions.load()
            record = self.discussions.get(records, num)
            if not record["isPullRequest"] or record["status"] not in ("open", "draft"):
                raise HubError(409, f"#{num} is not an open pull request.", "Conflict")
            ours, theirs = self._pr_changes(record)
            conflicts = _conflicts(ours, theirs)
            if conflicts:
                raise HubError(409, f"Pull request #{num} conflicts with {record['base']} on: {', '.join(conflicts)}.",
                               "Conflict")
            head = self.branch_head(record["base"])
            root = _MutableTree(self, self.git.object_store[head.encode()].tree)
            for path, item in ours.items():
                root.put_or_remove(path, item)
            pr_head = self.git.refs[f"refs/pr/{num}".encode()]
            commit = _new_commit(root.write(), [head.encode(), pr_head], f"Merge pull request #{num}: "
                                 f"{record['title']}", author)
            self._add_object(commit)
            self._move_ref(f"refs/heads/{record['base']}", head, commit.id.decode())
            if comment:
                self.discussions.comment(record, comment, author)
            record["status"], record["mergeCommitId"] = "merged", commit.id.decode()
            event = self.discussions.event(record, "status-change", author, {"status": "merged"})
            self.discussions.save(records)
            return event

    def _apply(self, root: _MutableTree, op: Operation, revision: str) -> None:
        if isinstance(op, AddFile):
            root.put(op.path, op.blob_id.encode())
        elif isinstance(op, AddLfsFile):
            size = op.size if op.size is not None else self.lfs_path(op.oid).stat().st_size
            blob = Blob.from_string(lfs_pointer(op.oid, size))
            self._add_object(blob)
            root.put(op.path, blob.id)
        elif isinstance(op, DeleteFile):
            root.remove(op.path, folder=False, revision=revision)
        else:
            root.remove(op.path, folder=True, revision=revision)

    def create_branch(self, branch: str, target: str) -> None:
        ref = f"refs/heads/{branch}"
        with self.locked():
            self._check_ref_free(ref, f"Branch {branch!r}")
            self._move_ref(ref, None, target)

    def delete_branch(self, branch: str) -> None:
        if branch == DEFAULT_BRANCH:
            raise HubError(403, f"Cannot delete refs/heads/{DEFAULT_BRANCH}: it is the default branch.", "Forbidden")
        self._delete_ref(f"refs/heads/{branch}", branch, "branch")

    def squash(self, revision: str, message: str, author: str) -> str:
        """The Hub's super-squash: the branch (or pull request) becomes one commit holding its
        current files. The old commits stay in the store, so ids and tags that pin them still work."""
        with self.locked():
            head = self.branch_head(revision)
            commit = _new_commit(self.git.object_store[head.encode()].tree, [], message, author)
            self._add_object(commit)
            self._move_ref(_branch_ref(revision), head, commit.id.decode())
            return commit.id.decode()

    def create_tag(self, tag: str, target: str, message: str | None, author: str) -> None:
        ref = f"refs/tags/{tag}"
        with self.locked():
            self._check_ref_free(ref, f"Tag {tag!r}")
            sha = target
            if message:  # an annotated tag keeps the message, as `git tag -m` does
                tag_object = Tag()
                tag_object.name = tag.encode()
                tag_object.object = (Commit, target.encode())
                tag_object.message = message.encode() + (b"" if message.endswith("\n") else b"\n")
                tag_object.tagger = _identity(author)
                tag_object.tag_time = int(time.time())
                tag_object.tag_timezone = 0
                self._add_object(tag_object)
                sha = tag_object.id.decode()
            self._move_ref(ref, None, sha)

    def delete_tag(self, tag: str) -> None:
        self._delete_ref(f"refs/tags/{tag}", tag, "tag")

    def _delete_ref(self, ref: str, name: str, kind: str) -> None:
        with self.locked():
            current = self._read_ref(ref)
            if current is None:  # "Invalid rev id" is the Hub's wording
                raise HubError(404, f"Invalid rev id: {name!r} is not a {kind} of this repo.", "RevisionNotFound")
            if not self.git.refs.remove_if_equals(ref.encode(), current.encode()):
                raise HubError(409, f"{name!r} moved while being deleted; retry.", "Conflict")

    def _read_ref(self, ref: str) -> str | None:
        if not _is_safe_ref(ref):
            return None
        try:
            return self.git.refs[ref.encode()].decode()
        except KeyError:
            return None

    def _check_ref_free(self, ref: str, what: str) -> None:
        """git cannot hold both `shard` and `shard/3`: one would be a file, the other a folder. And
        a branch and a tag must not share a name: revisions resolve to the branch first, so a
        branch named like a published tag would silently move it."""
        if self._read_ref(ref) is not None:
            raise HubError(409, f"Reference {ref} already exists.", "Conflict")
        kind, _, name = ref[len("refs/"):].partition("/")
        twin = {"heads": ("tag", "refs/tags/"), "tags": ("branch", "refs/heads/")}.get(kind)
        if twin is not None and self._read_ref(twin[1] + name) is not None:
            raise HubError(409, f"{what} would share its name with the {twin[0]} {name!r}.", "Conflict")
        for existing in self.git.refs.allkeys():
            other = existing.decode()
            if other.startswith(ref + "/") or ref.startswith(other + "/"):
                raise HubError(409, f"{what} conflicts with the existing ref {other!r}.", "Conflict")

    def _move_ref(self, ref: str, old: str | None, new: str) -> None:
        """Compare-and-swap; a stale lock file can only be a crashed writer's since we hold the repo lock."""
        for attempt in range(2):
            try:
                if old is None:
                    moved = self.git.refs.add_if_new(ref.encode(), new.encode())
                else:
                    moved = self.git.refs.set_if_equals(ref.encode(), old.encode(), new.encode())
                break
            except FileLocked:
                if attempt:
                    raise
                _remove_stale_lock(self.path / ref)
        if not moved:
            raise HubError(409, f"{ref} moved concurrently; retry.", "Conflict")

    def _add_object(self, obj: Blob | Tree | Commit | Tag) -> None:
        try:
            self.git.object_store.add_object(obj)
        except FileLocked:
            hexsha = obj.id.decode()
            _remove_stale_lock(self.path / "objects" / hexsha[:2] / hexsha[2:])
            self.git.object_store.add_object(obj)


class _MutableTree:
    """A folder being edited for one commit; untouched subfolders keep their tree ids."""

    def __init__(self, repo: GitRepo, tree_id: bytes | None):
        self.repo = repo
        self.entries: dict[bytes, tuple[int, bytes] | _MutableTree] = {}
        if tree_id is not None:
            for item in repo.git.object_store[tree_id].iteritems():
                self.entries[item.path] = (item.mode, item.sha)

    def put(self, path: str, blob_id: bytes) -> None:
        *folders, name = path.encode().split(b"/")
        node = self._folder(folders, create=True, path=path)
        existing = node.entries.get(name)
        if isinstance(existing, _MutableTree) or (existing is not None and stat.S_ISDIR(existing[0])):
            raise bad_request(f"Cannot add file {path!r}: a folder with that path exists.")
        node.entries[name] = (_FILE_MODE, blob_id)

    def remove(self, path: str, folder: bool, revision: str) -> None:
        *folders, name = path.encode().split(b"/")
        node = self._folder(folders, create=False, path=path)
        existing = node.entries.get(name) if node is not None else None
        if existing is None:  # the Hub's wording, which huggingface_hub looks for to add a hint
            raise HubError(404, f"A file with this name doesn't exist: {path!r} at revision {revision!r}.",
                           "EntryNotFound")
        is_folder = isinstance(existing, _MutableTree) or stat.S_ISDIR(existing[0])
        if folder and not is_folder:
            raise bad_request(f"Cannot delete {path!r} as a folder: it is a file.")
        del node.entries[name]  # a file deletion naming a folder deletes the folder, as on the Hub

    def put_or_remove(self, path: str, item: tuple[int, bytes] | None) -> None:
        """Set `path` to a merged-in file, or drop it (a file the other side deleted)."""
        *folders, name = path.encode().split(b"/")
        if item is not None:
            self._folder(folders, create=True, path=path).entries[name] = item
            return
        node = self._folder(folders, create=False, path=path)
        if node is not None:
            node.entries.pop(name, None)

    def _folder(self, parts: list[bytes], create: bool, path: str) -> _MutableTree | None:
        node = self
        for part in parts:
            child = node.entries.get(part)
            if child is None:
                if not create:
                    return None
                child = _MutableTree(self.repo, None)
            elif not isinstance(child, _MutableTree):
                if not stat.S_ISDIR(child[0]):
                    raise bad_request(f"Cannot use {path!r}: {part.decode()!r} is a file, not a folder.")
                child = _MutableTree(self.repo, child[1])
            node.entries[part] = child
            node = child
        return node

    def write(self) -> bytes:
        """Write changed folders bottom-up; folders left empty disappear, as git has no empty folders."""
        tree = Tree()
        for name, value in self.entries.items():
            if isinstance(value, _MutableTree):
                if not value.entries:
                    continue
                tree.add(name, _DIR_MODE, value.write())
            else:
                tree.add(name, value[0], value[1])
        self.repo._add_object(tree)
        return tree.id


class HubStorage:
    """All repos under one root directory."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.repos_dir = self.root / "repos"
        self.trash_dir = self.root / "trash"
        self.spool_dir = self.root / "tmp"  # request bodies past 1 MiB; on the LFS store's disk
        # Private repos live here too: nobody but the server's user may even list the root.
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for folder in (self.repos_dir, self.trash_dir, self.spool_dir):
            folder.mkdir(mode=0o700, exist_ok=True)
        self._sweep_trash()

    def _sweep_trash(self) -> None:
        """Finish deletions and drop creations a crash interrupted.

        Another process may share this root and be creating a repo right now, so a staging dir is
        removed only once it is clearly abandoned; removing a deleted repo twice is harmless.
        """
        for leftover in [*self.trash_dir.iterdir(), *self.spool_dir.iterdir()]:
            try:
                abandoned = time.time() - leftover.stat().st_mtime > _ABANDONED_AFTER_S
            except FileNotFoundError:
                continue
            if leftover.name.startswith("deleted-") or abandoned:
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)

    def repo_path(self, repo_id: RepoId) -> Path:
        return self.repos_dir / PLURALS[repo_id.type] / repo_id.namespace / f"{repo_id.name}.git"

    def open(self, repo_id: RepoId) -> GitRepo:
        """Repo ids are case-insensitive, as on the Hub: `Org/DS` opens `org/ds` under its own spelling."""
        found = self._find(repo_id)
        try:
            if found is not None:
                return GitRepo(self.repo_path(found), found)
        except NotGitRepository:  # deleted between the check and the open
            pass
        raise repo_not_found()

    def _find(self, repo_id: RepoId) -> RepoId | None:
        if (self.repo_path(repo_id) / "coopt-hub.json").is_file():
            return repo_id
        wanted = (repo_id.namespace.lower(), repo_id.name.lower())
        for candidate in self.list_repos(repo_id.type, namespace=repo_id.namespace):
            if (candidate.namespace.lower(), candidate.name.lower()) == wanted:
                return candidate
        return None

    def list_repos(self, repo_type: str, namespace: str | None = None) -> list[RepoId]:
        """Every repo of a type (of one namespace, matched case-insensitively), sorted by id."""
        type_dir = self.repos_dir / PLURALS[repo_type]
        found = []
        for namespace_dir in sorted(type_dir.iterdir()) if type_dir.is_dir() else []:
            if namespace is not None and namespace_dir.name.lower() != namespace.lower():
                continue
            for repo_dir in sorted(namespace_dir.glob("*.git")):
                if (repo_dir / "coopt-hub.json").is_file():
                    found.append(RepoId(repo_type, namespace_dir.name, repo_dir.name[: -len(".git")]))
        return found

    def is_private(self, repo_id: RepoId) -> bool:
        """Read from the settings alone, without opening the git repository: for listings."""
        return bool(json.loads((self.repo_path(repo_id) / "coopt-hub.json").read_text()).get("private"))

    def exists(self, repo: tuple[str, str, str]) -> bool:
        """Whether (type, namespace, name) names a repo on disk right now."""
        try:
            repo_id = make_repo_id(*repo)
        except HubError:
            return False
        return self._find(repo_id) is not None

    def create(self, repo_id: RepoId, private: bool, author: str, files: dict[str, bytes] | None = None) -> None:
        """Build the repo in trash/ and rename it into place: it appears whole or not at all. Its
        initial commit holds .gitattributes and `files` (top-level names)."""
        final = self.repo_path(repo_id)
        if final.exists() or self._find(repo_id) is not None:
            raise _repo_exists(repo_id)
        staging = self.trash_dir / f"new-{uuid.uuid4().hex}"
        git = Repo.init_bare(str(staging), mkdir=True, default_branch=DEFAULT_BRANCH.encode())
        attributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
        tree = Tree()
        blobs = []
        for name, content in {".gitattributes": attributes.encode(), **(files or {})}.items():
            blobs.append(Blob.from_string(content))
            tree.add(name.encode(), _FILE_MODE, blobs[-1].id)
        commit = _new_commit(tree.id, [], "initial commit", author)
        for obj in (*blobs, tree, commit):
            git.object_store.add_object(obj)
        git.refs[f"refs/heads/{DEFAULT_BRANCH}".encode()] = commit.id
        git.close()
        _write_json_atomic(staging / "coopt-hub.json", {"private": bool(private), "createdAt": iso_date(time.time())})
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(staging, final)
        except OSError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise _repo_exists(repo_id) from err

    def move(self, source: RepoId, target: RepoId) -> None:
        """Rename a repo; its old name is free at once (no redirect is kept, unlike the Hub)."""
        repo = self.open(source)
        final = self.repo_path(target)
        exists = HubError(409, f"A {target.type} repository called {target.id} already exists.", "Conflict")
        if self._find(target) is not None:
            raise exists
        final.parent.mkdir(parents=True, exist_ok=True)
        with repo.locked():
            try:
                os.rename(repo.path, final)  # refused when another repo took the name meanwhile
            except OSError:
                raise exists from None

    def delete(self, repo_id: RepoId) -> None:
        repo = self.open(repo_id)
        doomed = self.trash_dir / f"deleted-{uuid.uuid4().hex}"
        with repo.locked():
            os.rename(repo.path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _repo_exists(repo_id: RepoId) -> HubError:
    return HubError(409, f"You already created this {repo_id.type} repo: {repo_id.id}.", "RepoExists")


def _branch_ref(revision: str) -> str:
    return revision if revision.startswith("refs/pr/") else f"refs/heads/{revision}"


def _is_safe_ref(ref: str) -> bool:
    for prefix in ("refs/heads/", "refs/tags/", "refs/pr/", "refs/convert/"):
        if ref.startswith(prefix):
            return is_valid_ref_name(ref[len(prefix):])
    return False


def _identity(user: str) -> bytes:
    return f"{user} <{user}@users.noreply.coopt-hub>".encode()


def _new_commit(tree_id: bytes, parents: list[bytes], message: str, author: str) -> Commit:
    commit = Commit()
    commit.tree = tree_id
    commit.parents = parents
    commit.author = commit.committer = _identity(author)
    commit.author_time = commit.commit_time = int(time.time())
    commit.author_timezone = commit.commit_timezone = 0
    commit.encoding = b"UTF-8"
    commit.message = message.encode()
    return commit


def _changed(store: object, old_tree: bytes, new_tree: bytes) -> dict[str, tuple[int, bytes] | None]:
    """Files that differ between two trees: path -> (mode, sha) in the new one, None if deleted."""
    changes: dict[str, tuple[int, bytes] | None] = {}
    for change in tree_changes(store, old_tree, new_tree):
        if change.old is not None and change.old.path is not None:
            changes[change.old.path.decode()] = None
        if change.new is not None and change.new.path is not None:
            changes[change.new.path.decode()] = (change.new.mode, change.new.sha)
    return changes


def _conflicts(ours: dict, theirs: dict) -> list[str]:
    """Paths both sides changed, differently (the same change on both sides merges cleanly)."""
    return sorted(path for path in ours.keys() & theirs.keys() if ours[path] != theirs[path])


class _TreeLookup:
    """Path -> object id in a tree, with each tree object read from disk once per walk."""

    def __init__(self, store: object):
        self._store = store
        self._trees: dict[bytes, dict[bytes, tuple[int, bytes]]] = {}

    def __call__(self, tree_id: bytes, parts: list[bytes]) -> bytes | None:
        for index, part in enumerate(parts):
            entries = self._trees.get(tree_id)
            if entries is None:
                if len(self._trees) > _MAX_CACHED_TREES:
                    self._trees.clear()
                entries = {item.path: (item.mode, item.sha) for item in self._store[tree_id].iteritems()}
                self._trees[tree_id] = entries
            item = entries.get(part)
            if item is None:
                return None
            if index < len(parts) - 1 and not stat.S_ISDIR(item[0]):
                return None
            tree_id = item[1]
        return tree_id


def _inflate(handle: BinaryIO) -> Iterator[bytes]:
    """A zlib stream's content in pieces of at most _CHUNK bytes, whatever its compression ratio."""
    inflater = zlib.decompressobj()
    while True:
        compressed = inflater.unconsumed_tail or handle.read(_CHUNK)
        if not compressed:
            if rest := inflater.flush():
                yield rest
            return
        piece = inflater.decompress(compressed, _CHUNK)
        if piece:
            yield piece


def _remove_stale_lock(target: Path) -> None:
    Path(f"{target}.lock").unlink(missing_ok=True)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
