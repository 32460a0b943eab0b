"""What counts as a valid repo id, file path and ref name, checked before anything touches the disk."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dulwich.refs import check_ref_format

from coopt_hub.server.errors import HubError, bad_request

DEFAULT_BRANCH = "main"

# The URL segment of each repo type (`/api/datasets/...`) and the prefix of its web URLs
# (`/datasets/org/ds/resolve/...`); models have none, as on the Hub.
PLURALS = {"model": "models", "dataset": "datasets", "space": "spaces"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
TYPES_BY_PLURAL = {plural: singular for singular, plural in PLURALS.items()}

# A model repo's web URL starts with its namespace, so a namespace must not be one of the other
# URL prefixes or routes would become ambiguous.
RESERVED_NAMESPACES = {"api", "datasets", "spaces", "models", "lfs-upload"}

# As on the Hub: '.' and '-' may not start a name (hidden files, options), '_' may (`__user__`).
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,95}$")
_FULL_COMMIT_ID = re.compile(r"^[0-9a-fA-F]{40}$")
_MAX_PATH_LENGTH = 4096
_MAX_PATH_DEPTH = 128  # folders nested deeper than this are refused before any recursive walk


@dataclass(frozen=True)
class RepoId:
    type: str  # "model" | "dataset" | "space"
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def web_path(self) -> str:
        return f"{URL_PREFIXES[self.type]}{self.id}"


def check_repo_type(repo_type: object) -> str:
    """Accept a singular type name (`dataset`); None means model, as in the client."""
    if repo_type is None:
        return "model"
    if not isinstance(repo_type, str) or repo_type not in PLURALS:
        raise bad_request(f"Unknown repo type {repo_type!r}; expected one of {sorted(PLURALS)}.")
    return repo_type


def check_name(name: object, what: str = "repo name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or "--" in name:
        raise bad_request(
            f"Invalid {what} {name!r}: use 1-96 letters, digits, '.', '_' or '-', starting with a letter, digit "
            "or '_', without '..' or '--'."
        )
    if name.endswith((".", "-", ".git")):
        raise bad_request(f"Invalid {what} {name!r}: it must not end with '.', '-' or '.git'.")
    return name


def make_repo_id(repo_type: object, namespace: object, name: object) -> RepoId:
    namespace = check_name(namespace, "namespace")
    if namespace.lower() in RESERVED_NAMESPACES:
        raise bad_request(f"Namespace {namespace!r} is reserved.")
    return RepoId(check_repo_type(repo_type), namespace, check_name(name))


def check_path(path: object) -> str:
    """A file or folder path inside a repo: relative, normalised, and never into `.git`."""
    if not isinstance(path, str) or not path:
        raise bad_request("Empty or non-string path in repo.")
    if len(path) > _MAX_PATH_LENGTH:
        raise bad_request(f"Path in repo longer than {_MAX_PATH_LENGTH} characters.")
    if path.count("/") >= _MAX_PATH_DEPTH:
        raise bad_request(f"Path in repo nested deeper than {_MAX_PATH_DEPTH} folders.")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in path):
        raise bad_request("Invalid path: it holds a lone surrogate, which is not valid UTF-8.")
    # Well-formed but not allowed in a repo: the Hub answers those 422. Backslashes are refused
    # although the Hub keeps them: a Windows client would read `..\\x` as a way out of its folder.
    if path.startswith("/") or "\\" in path or any(ord(ch) < 32 or ord(ch) == 127 for ch in path):
        raise _invalid_path(f"Invalid path {path!r}: it must be relative, with '/' separators and no control "
                            "characters.")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise _invalid_path(f"Invalid path {path!r}: empty, '.' and '..' components are not allowed.")
        if part.lower() == ".git":
            raise _invalid_path(f"Invalid path {path!r}: '.git' is reserved.")
    return path


def _invalid_path(message: str) -> HubError:
    return HubError(422, message, "UnprocessableEntity")


def is_valid_ref_name(name: str) -> bool:
    """Whether `name` (a branch or tag, `/` allowed) is a safe git ref component."""
    if not name or name.startswith(("-", "/", "refs/")) or len(name) > 255:
        return False
    if any(ord(ch) < 32 or ord(ch) == 127 or 0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        return False
    return check_ref_format(b"refs/heads/" + name.encode())


def check_ref_name(name: object, what: str = "branch") -> str:
    """A name for a new branch or tag. One that reads as a full commit id is refused: it would
    shadow that commit, and every pin by commit id (merges, manifests) would then lie."""
    if isinstance(name, str) and _FULL_COMMIT_ID.match(name):
        raise bad_request(f"Invalid {what} name {name!r}: a 40-hex-digit name would shadow the commit with that id.")
    if not isinstance(name, str) or not is_valid_ref_name(name):
        raise bad_request(
            f"Invalid {what} name {name!r}: it must be a valid git ref name (no spaces, '..', '~', '^', ':', "
            "'?', '*', '[', '\\', no leading '-', no trailing '/' or '.lock')."
        )
    return name
