"""Checks on a repo as the hub stores it, read from its directory with dulwich."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def assert_whole(root: Path, repo: str) -> None:
    """Every ref of `repo` on disk points at a commit whose whole history is present, each LFS file
    included with its exact bytes: no dangling ref, no partial commit."""
    from dulwich.objects import Commit, Tag
    from dulwich.repo import Repo

    path = root / "repos" / "datasets" / f"{repo}.git"
    git = Repo(str(path))
    try:
        assert not list((path / "refs").rglob("*.lock")), "a ref lock was left behind"
        seen: set[bytes] = set()
        for name, sha in git.get_refs().items():
            obj = git[sha]
            while isinstance(obj, Tag):
                obj = git[obj.object[1]]
            assert isinstance(obj, Commit), f"{name!r} does not point at a commit"
            for entry in git.get_walker(include=[obj.id]):
                _assert_tree(git, git[entry.commit.tree], path, seen)
    finally:
        git.close()


def _assert_tree(git, tree, repo_path: Path, seen: set[bytes]) -> None:
    from dulwich.objects import Tree

    if tree.id in seen:
        return
    seen.add(tree.id)
    for item in tree.items():
        obj = git[item.sha]  # KeyError: an object the commit needs is missing
        if isinstance(obj, Tree):
            _assert_tree(git, obj, repo_path, seen)
            continue
        pointer = re.fullmatch(rb"version https://git-lfs.github.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n",
                               obj.data)
        if pointer:
            oid = pointer[1].decode()
            content = (repo_path / "lfs" / "objects" / oid[:2] / oid[2:4] / oid).read_bytes()
            assert len(content) == int(pointer[2]), f"{item.path!r}: its LFS file has the wrong size"
            assert hashlib.sha256(content).hexdigest() == oid, f"{item.path!r}: its LFS file has the wrong bytes"
