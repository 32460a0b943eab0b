"""Who is calling: bearer tokens the server was started with, and signed LFS upload URLs.

Tokens are kept only as sha256 digests, so neither memory dumps of the lookup table nor any log
or error message can reveal one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from coopt_hub.server.errors import HubError

DEFAULT_USER = "coopt"
INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the Hub's wording; the client keys on it


class Auth:
    def __init__(self, tokens: Iterable[str] | Mapping[str, str], url_key: bytes | None = None):
        """`tokens`: token strings (all acting as DEFAULT_USER) or a mapping token -> user name.
        `url_key`: the key that signs upload URLs (default: a new random one)."""
        pairs = tokens.items() if isinstance(tokens, Mapping) else ((token, DEFAULT_USER) for token in tokens)
        self._users = {_digest(token): user for token, user in pairs if token}
        if not self._users:
            raise ValueError("The server needs at least one non-empty token.")
        # LFS PUTs carry no Authorization header (the client strips it), so the upload URL itself
        # is the credential: an HMAC over what it allows, valid for a limited time.
        self._url_key = url_key or secrets.token_bytes(32)

    def user_for(self, authorization: str | None) -> str | None:
        """The user behind an Authorization header; None without one; 401 for a token we do not know."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, INVALID_TOKEN_MESSAGE, "Unauthorized")
        user = self._users.get(_digest(token.strip()))
        if user is None:
            raise HubError(401, INVALID_TOKEN_MESSAGE, "Unauthorized")
        return user

    def sign(self, *parts: str, lifetime_s: int = 24 * 3600) -> tuple[int, str]:
        expires = int(time.time()) + lifetime_s
        return expires, self._signature(expires, parts)

    def check_signature(self, expires: str, signature: str, *parts: str) -> None:
        if not (expires.isascii() and expires.isdigit() and len(expires) < 19) or int(expires) < time.time():
            raise HubError(403, "This upload URL has expired; ask the batch endpoint for a new one.", "Forbidden")
        if not signature.isascii() or not hmac.compare_digest(signature, self._signature(int(expires), parts)):
            raise HubError(403, "Invalid upload URL signature.", "Forbidden")

    def _signature(self, expires: int, parts: tuple[str, ...]) -> str:
        message = "\n".join((str(expires), *parts)).encode()
        return hmac.new(self._url_key, message, hashlib.sha256).hexdigest()


def load_url_key(path: Path) -> bytes:
    """The upload-URL signing key kept under the server root (mode 0600), made on first start, so
    that upload URLs handed out before a restart still work after it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key)
    try:
        os.link(partial, path)  # first writer wins when two servers start on one root
    except FileExistsError:
        pass
    finally:
        partial.unlink()
    return path.read_bytes()


def require_user(user: str | None) -> str:
    if user is None:
        raise HubError(
            401,
            "Authentication required: this request writes, so send a token the server knows "
            "(set HF_TOKEN to one of the tokens `coopt-hub hub serve` prints).",
            "Unauthorized",
        )
    return user


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
