"""HubServer: the storage, the API and the HTTP server (uvicorn) wired together, in the foreground or a thread."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import uvicorn

from coopt_hub.server.access import Grant, bare_grant
from coopt_hub.server.api import HubApi
from coopt_hub.server.asgi import HEADER_TIMEOUT_S, MAX_CONNECTIONS, HubApp, HubProtocol
from coopt_hub.server.auth import Auth, load_url_key
from coopt_hub.server.storage import HubStorage
from coopt_hub.server.tokens import DEFAULT_USER, TokenFile, check_grant, default_user, digest, generate_token

DEFAULT_MAX_BODY_BYTES = 1024**3
URL_KEY_FILE = "upload-url.key"
_MAX_HEADER_BYTES = 16 * 1024  # h11 checks it between reads, so a request may hold up to one read more
_BACKLOG = 1024


class HubServer:
    """A Hub-compatible server over a root directory; everything it serves lives on disk there.

        with HubServer(root, tokens=["t"]) as hub:
            os.environ.update(hub.env())

    `tokens`: plain tokens (each may write everywhere, main included, as user "coopt"), a mapping
    token -> user name (the same rights), or token -> Grant (a role and the repos it covers; see
    coopt_hub.server.access). `token_file`: more tokens in the format of coopt_hub.server.tokens,
    re-read whenever it changes. With neither, one random admin token is made up (see `token`).
    Port 0 picks a free port.
    `public_url` is the base of every link in answers (commit and upload URLs): set it to the
    address clients use when the server sits behind a reverse proxy. By default it is the bound
    address; the request's Host header is never used.
    """

    def __init__(
        self,
        root: str | Path,
        tokens: Iterable[str] | Mapping[str, str | Grant] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        public_url: str | None = None,
        token_file: str | Path | None = None,
    ):
        token_source = TokenFile(token_file) if token_file is not None else None
        grants = _grants(tokens, generate=token_source is None)
        self.root = Path(root)
        # The token printed for clients: the first one given, else the first in clear in the file.
        self.token = next(iter(grants), None) or (token_source.first_token if token_source else None)
        storage = HubStorage(self.root)
        auth = Auth(grants, token_source, load_url_key(self.root / URL_KEY_FILE))
        self.api = HubApi(storage, auth, max_body_bytes)
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.public_url = public_url.rstrip("/") if public_url else None
        self._app = HubApp(self.api.route, storage.spool_dir, lambda: self.endpoint)
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def new_token(self, role: str, repos: Sequence[str] = (), main: bool = False, user: str | None = None) -> str:
        """A new token for `role` on `repos` (all when empty), valid until this server object is
        gone: for programs that run their own hub (demos, tests). Tokens that must outlive the
        process belong in a token file (coopt_hub.server.tokens.add_token)."""
        token = generate_token()
        grant = Grant(user or default_user(digest(token)), role, tuple(repos), main)
        check_grant(grant)
        self.api.auth.add(token, grant)
        return token

    @property
    def bytes_sent(self) -> int:
        """Response body bytes served since start: what clients downloaded (file and API answers)."""
        return self._app.bytes_sent

    def env(self) -> dict[str, str]:
        """What a client process needs: this endpoint, a token when one is known in clear, and LFS
        uploads kept off Xet."""
        return {"HF_ENDPOINT": self.endpoint, **({"HF_TOKEN": self.token} if self.token else {}),
                "HF_HUB_DISABLE_XET": "1"}

    def bind(self) -> HubServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._socket = socket.create_server((self.host, self.port), family=family, backlog=_BACKLOG)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self._app, http=HubProtocol, lifespan="off", log_config=None, access_log=False,
            limit_concurrency=MAX_CONNECTIONS, backlog=_BACKLOG, timeout_keep_alive=int(HEADER_TIMEOUT_S),
            timeout_graceful_shutdown=5, h11_max_incomplete_event_size=_MAX_HEADER_BYTES, server_header=False,
        )
        self._server = uvicorn.Server(config)
        return self

    def start(self) -> HubServer:
        """Serve in a daemon thread; returns once the server answers."""
        if self._server is None:
            self.bind()
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="coopt-hub-server", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("The hub server failed to start; its log says why.")
            time.sleep(0.01)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (then KeyboardInterrupt is raised again)."""
        if self._server is None:
            self.bind()
        # This process exists to serve: whatever it writes under the root is for its user alone.
        os.umask(0o077)
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._close()

    def stop(self) -> None:
        if self._server is None:
            return
        if self._thread is not None:
            # uvicorn then closes idle keep-alive connections too: a stopped server answers no one.
            self._server.should_exit = True
            self._thread.join()
            self._thread = None
        self._close()

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._server = None
        self._app.close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _grants(tokens: Iterable[str] | Mapping[str, str | Grant] | None, generate: bool) -> dict[str, Grant]:
    if tokens is None:
        # The made-up token is the one the server's owner gets: it may do everything.
        return {generate_token(): Grant(DEFAULT_USER, "admin")} if generate else {}
    if not isinstance(tokens, Mapping):
        return {token: bare_grant(DEFAULT_USER) for token in tokens}
    return {token: grant if isinstance(grant, Grant) else bare_grant(grant) for token, grant in tokens.items()}
