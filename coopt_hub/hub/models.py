"""Model repos on a hub: `coopt-hub hub import-model` puts a model's files (a folder, or its entry in
the local hf cache) into a hub in one commit, so that a team without huggingface.co can serve
priors' weights from its own hub (`--weights-endpoint`).

Hub (client.py) speaks of dataset repos; the few calls a model repo needs are made here, through its
retry policy. An import is safe to rerun: files the repo already holds with the same content are not
sent again, and when it holds them all no commit is made.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd
from huggingface_hub.hf_api import RepoFile

from coopt_hub.core import faults
from coopt_hub.errors import ConfigError
from coopt_hub.hub.client import Hub

MODEL = "model"
# Bookkeeping of the tools that wrote the folder (`hf download --local-dir` keeps its own in .cache/),
# not files of the model.
_NOT_MODEL_FILES = (".cache", ".git")


@dataclass(frozen=True)
class ImportResult:
    repo_id: str
    endpoint: str
    commit: str
    files: tuple[str, ...]  # every file of the import, as paths in the repo
    sent: tuple[str, ...]  # those the repo did not hold yet with this content
    created: bool  # a commit was made (False: the repo held every file already)


def local_model_folder(repo_id: str, source: Path | None = None, revision: str = "main") -> Path:
    """The folder whose files are imported: `source` itself, or REPO_ID's snapshot at `revision` in an hf
    cache (`source` is the cache folder, e.g. ~/.cache/huggingface/hub, or the repo's entry in it;
    None: this machine's cache)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.file_download import repo_folder_name

    entry = repo_folder_name(repo_id=repo_id, repo_type=MODEL)  # models--ORG--NAME
    if source is None:
        cache = Path(constants.HF_HUB_CACHE)
    elif (source / entry).is_dir():
        cache = source
    elif source.name == entry:
        cache = source.parent
    elif source.is_dir():
        return source
    else:
        raise ConfigError(f"{source} is not a folder.",
                          hint="Pass --from a folder of the model's files, or an hf cache folder that holds it.")
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError as err:
        raise ConfigError(f"The hf cache {cache} holds no snapshot of {repo_id} at {revision}.",
                          hint=f"Download it first where its hub is reachable (`hf download {repo_id}`), or pass "
                          "--from the folder that holds its files.") from err


def model_files(folder: Path) -> dict[str, Path]:
    """Path in the repo -> local file, for every file under `folder` (a cache snapshot's links followed)."""
    files = {}
    for root, directories, names in os.walk(folder, followlinks=True):
        directories[:] = sorted(d for d in directories if d not in _NOT_MODEL_FILES)
        for name in sorted(names):
            local = Path(root, name)
            files[local.relative_to(folder).as_posix()] = local
    return files


def import_model(hub: Hub, repo_id: str, folder: Path, private: bool = False) -> ImportResult:
    """Make the model repo `repo_id` on `hub` hold every file of `folder`, in one commit on main."""
    files = model_files(folder)
    if not files:
        raise ConfigError(f"{folder} holds no files to import.",
                          hint="Pass --from the folder of the model's files (config and weights).")
    hub.with_retries(f"create model repo {repo_id}",
                     lambda: hub.api.create_repo(repo_id, repo_type=MODEL, private=private, exist_ok=True))
    commit = _ImportCommit(hub, repo_id, files, f"Import {repo_id} ({len(files)} files) with coopt-hub")
    head = hub.with_retries(f"commit to model repo {repo_id}", commit)
    return ImportResult(repo_id=repo_id, endpoint=hub.endpoint, commit=head, files=tuple(files),
                        sent=commit.sent, created=commit.created)


class _ImportCommit:
    """One try of the import: the files main lacks, committed on top of the head they were compared with.

    A retry compares again with the fresh head, so an import whose commit went through before the
    connection dropped sends nothing the second time. `created` stays True then, as for a first try.
    """

    def __init__(self, hub: Hub, repo_id: str, files: dict[str, Path], message: str):
        self.hub, self.repo_id, self.files, self.message = hub, repo_id, files, message
        self.hashes = _LocalHashes()
        self.sent: tuple[str, ...] = ()
        self.created = False

    def __call__(self) -> str:
        api = self.hub.api
        head = api.repo_info(self.repo_id, repo_type=MODEL).sha
        remote = {} if head is None else {
            entry.path: entry for entry in api.list_repo_tree(self.repo_id, revision=head, recursive=True,
                                                              repo_type=MODEL)
            if isinstance(entry, RepoFile)
        }
        missing = tuple(path for path, local in self.files.items() if not self._holds(remote.get(path), local))
        if not missing:
            return head
        self.sent, self.created = missing, True
        faults.reach("commit")
        operations = [CommitOperationAdd(path, str(self.files[path])) for path in missing]
        info = api.create_commit(self.repo_id, operations, commit_message=self.message, revision="main",
                                 parent_commit=head, repo_type=MODEL)
        return info.oid

    def _holds(self, entry: RepoFile | None, local: Path) -> bool:
        if entry is None or entry.size != local.stat().st_size:
            return False
        if entry.lfs is not None:
            return entry.lfs.sha256 == self.hashes.sha256(local)
        return entry.blob_id == self.hashes.git_blob(local)


class _LocalHashes:
    """File hashes as the Hub states them (sha256 of LFS files, git blob ids of the others), each computed once."""

    def __init__(self):
        self._known: dict[tuple[str, Path], str] = {}

    def sha256(self, path: Path) -> str:
        return self._hash("sha256", path, b"")

    def git_blob(self, path: Path) -> str:
        return self._hash("sha1", path, f"blob {path.stat().st_size}\0".encode())

    def _hash(self, algorithm: str, path: Path, header: bytes) -> str:
        if (algorithm, path) not in self._known:
            digest = hashlib.new(algorithm, header)
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            self._known[algorithm, path] = digest.hexdigest()
        return self._known[algorithm, path]
