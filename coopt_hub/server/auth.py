"""Who is calling: bearer tokens (given at start or in a token file), and signed LFS upload URLs.

Tokens are kept only as sha256 digests, so neither memory dumps of the lookup table nor any log
or error message can reveal one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path

from coopt_hub.server.access import Grant
from coopt_hub.server.errors import HubError
from coopt_hub.server.tokens import TokenFile, digest

INVALID_TOKEN_MESSAGE = "Invalid credentials in Authorization header"  # the Hub's wording; the client keys on it


class Auth:
    def __init__(self, tokens: Mapping[str, Grant], token_file: TokenFile | None = None,
                 url_key: bytes | None = None):
        """`tokens`: token -> what it may do; `token_file`: more of them, re-read as it changes.
        `url_key`: the key that signs upload URLs (default: a new random one)."""
        self._grants = {digest(token): grant for token, grant in tokens.items() if token}
        self._token_file = token_file
        if not self._grants and token_file is None:
            raise ValueError("The server needs at least one non-empty token, or a token file.")
        # LFS PUTs carry no Authorization header (the client strips it), so the upload URL itself
        # is the credential: an HMAC over what it allows, valid for a limited time.
        self._url_key = url_key or secrets.token_bytes(32)

    def add(self, token: str, grant: Grant) -> None:
        self._grants[digest(token)] = grant

    def grant_for(self, authorization: str | None) -> Grant | None:
        """What the caller's token allows; None without a token; 401 for a token we do not know."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, INVALID_TOKEN_MESSAGE, "Unauthorized")
        token_digest = digest(token.strip())
        grant = self._grants.get(token_digest)
        if grant is None and self._token_file is not None:
            grant = self._token_file.grant(token_digest)
        if grant is None:
            raise HubError(401, INVALID_TOKEN_MESSAGE, "Unauthorized")
        return grant

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
