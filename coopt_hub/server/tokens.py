"""The token file of `hub serve --token-file`: one token per line with what it may do, re-read
by the running server whenever the file changes.

    # Blank lines and lines starting with '#' are ignored.
    sha256:9f86d081...0f00a08  contribute  org/cats  user=alice
    sha256:60303ae2...3f5e7d2  write  org/*  main  user=ci
    sha256:fd61a03a...2ac0d1e  admin  user=owner
    my-plain-token

A line is `CREDENTIAL [ROLE [PATTERN ...] [main]] [user=NAME]`, fields separated by spaces:

- CREDENTIAL: `sha256:` and the sha256 (hex) of the token, as `coopt-hub hub token add` writes it,
  so the file reveals no token; or the token itself.
- ROLE: read, contribute, write or admin (coopt_hub.server.access says what each may do).
  A line without one is a bare token, as in files from before roles existed: write on every
  repo, main included.
- PATTERN: the repos the token covers, `namespace/name` with `*` and `?` as wildcards, matched
  case-insensitively; none: every repo.
- main: a write token may also push to and merge into main (admin always may).
- user=NAME: the name its commits, pull requests and comments carry, and whose pull requests a
  contribute token may push to. Default: `token-` and the first 8 hex digits of its hash (a bare
  line: `coopt`, as before).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coopt_hub.server.access import ROLES, Grant, bare_grant
from coopt_hub.server.errors import HubError
from coopt_hub.server.names import check_name

logger = logging.getLogger("coopt_hub.server")

DEFAULT_USER = "coopt"
HASH_PREFIX = "sha256:"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_MAIN = "main"


class TokenFileError(ValueError):
    """A token file line that cannot be read; the message names the file and the line."""


@dataclass(frozen=True)
class TokenLine:
    digest: bytes  # sha256 of the token
    grant: Grant
    token: str | None  # the token itself, when the line holds it in clear


@dataclass(frozen=True)
class NewToken:
    """A token just added to a token file: `token` exists nowhere else, so show it once."""

    token: str
    user: str
    line: str


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def generate_token() -> str:
    return f"hub_{secrets.token_urlsafe(32)}"


def default_user(token_digest: bytes) -> str:
    """A token's user name when none is given: stable, and distinct for every token, so that no
    two contributors own each other's pull requests by accident."""
    return f"token-{token_digest.hex()[:8]}"


def parse_tokens(text: str, source: str = "token file") -> list[TokenLine]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            try:
                entries.append(_parse_line(fields))
            except TokenFileError as err:
                raise TokenFileError(f"{source}, line {number}: {err}") from None
    return entries


def _parse_line(fields: list[str]) -> TokenLine:
    credential, *rest = fields
    if _HASH.match(credential):
        token, token_digest = None, bytes.fromhex(credential[len(HASH_PREFIX):])
    elif credential.startswith(HASH_PREFIX):
        raise TokenFileError(f"{HASH_PREFIX} must be followed by 64 lowercase hex digits (a token's sha256).")
    else:
        token, token_digest = credential, digest(credential)
    named = [field for field in rest if field.startswith("user=")]
    if len(named) > 1:
        raise TokenFileError("more than one user= on a line.")
    user = named[0][len("user="):] if named else None
    rest = [field for field in rest if not field.startswith("user=")]
    if not rest:
        return TokenLine(token_digest, check_grant(bare_grant(user or DEFAULT_USER)), token)
    role, *scope = rest
    patterns = tuple(field for field in scope if field != _MAIN)
    grant = Grant(user or default_user(token_digest), role, patterns, _MAIN in scope)
    return TokenLine(token_digest, check_grant(grant), token)


def check_grant(grant: Grant) -> Grant:
    """A grant that means what it says: a known role, repo patterns that can match a repo id, and a
    user name that can stand in git authors and discussions; TokenFileError otherwise."""
    if grant.role not in ROLES:
        raise TokenFileError(f"unknown role {grant.role!r}; expected one of {', '.join(ROLES)}.")
    if grant.main and grant.role != "write":
        raise TokenFileError(f"'main' is for the write role (admin always has it), not {grant.role!r}.")
    for pattern in grant.repos:
        if "/" not in pattern and pattern != "*":
            raise TokenFileError(f"repo pattern {pattern!r} must look like namespace/name (wildcards allowed).")
    try:
        check_name(grant.user, "user name")
    except HubError as err:
        raise TokenFileError(err.message) from None
    return grant


class TokenFile:
    """The tokens of a file as the server sees them: re-read when the file changes, so tokens added
    (or lines removed) apply to a running server. A file that no longer parses keeps the tokens
    last read, with a warning in the log, rather than locking everyone out."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._version: tuple | None = _version(self.path)
        self._load(parse_tokens(self.path.read_text(), str(self.path)))

    def grant(self, token_digest: bytes) -> Grant | None:
        try:
            version = _version(self.path)
        except OSError:
            version = None
        with self._lock:
            if version != self._version:
                self._version = version
                self._reload()
            return self._grants.get(token_digest)

    @property
    def first_token(self) -> str | None:
        """The first token the file holds in clear (what `hub serve` prints for clients), if any."""
        return self._first_token

    def _reload(self) -> None:
        try:
            self._load(parse_tokens(self.path.read_text(), str(self.path)))
        except (OSError, UnicodeDecodeError, TokenFileError) as err:
            logger.warning("Token file not reloaded (the tokens read before stay valid): %s", err)

    def _load(self, entries: list[TokenLine]) -> None:
        self._grants = {entry.digest: entry.grant for entry in entries}
        self._first_token = next((entry.token for entry in entries if entry.token), None)


def _version(path: Path) -> tuple:
    # os.replace gives the file a new inode: no two versions share all three.
    info = path.stat()
    return info.st_ino, info.st_mtime_ns, info.st_size


def add_token(path: str | Path, role: str, repos: Sequence[str] = (), main: bool = False,
              user: str | None = None) -> NewToken:
    """Make a new token for `role` on `repos` and add the sha256 of it to the token file at `path`
    (created 0600 if missing). Safe while a server uses the file: the new version replaces the old
    one in one rename, and concurrent additions wait for each other."""
    token = generate_token()
    token_digest = digest(token)
    fields = [HASH_PREFIX + token_digest.hex(), role, *repos, *([_MAIN] if main else []),
              f"user={user or default_user(token_digest)}"]
    line = " ".join(fields)
    [entry] = parse_tokens(line, "new token")  # the same checks as the server's
    path = Path(path)
    with _locked(path):
        old = path.read_text() if path.exists() else ""
        added = f"# added {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}\n{line}\n"
        text = old + ("\n" if old and not old.endswith("\n") else "") + added
        parse_tokens(text, str(path))  # refuse to extend a file the server could not read
        _replace(path, text)
    return NewToken(token, entry.grant.user, line)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock for changing `path`, held on a lock file beside it (the file itself is
    replaced, so a lock on it would guard only the version it was taken on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _replace(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
