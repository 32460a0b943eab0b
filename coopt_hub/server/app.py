"""HubServer: the storage, the API and the HTTP server (uvicorn) wired together, in the foreground or a thread."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import uvicorn

from coopt_hub.server.api import HubApi
from coopt_hub.server.asgi import HEADER_TIMEOUT_S, MAX_CONNECTIONS, HubApp, HubProtocol
from coopt_hub.server.auth import Auth, load_url_key
from coopt_hub.server.storage import HubStorage

DEFAULT_MAX_BODY_BYTES = 1024**3
URL_KEY_FILE = "upload-url.key"
_MAX_HEADER_BYTES = 16 * 1024  # h11 checks it between reads, so a request may hold up to one read more
_BACKLOG = 1024


class HubServer:
    """A Hub-compatible server over a root directory; everything it serves lives on disk there.

        with HubServer(root, tokens=["t"]) as hub:
            os.environ.update(hub.env())

    Without tokens, one random token is made up (see `token`). Port 0 picks a free port.
    `public_url` is the base of every link in answers (commit and upload URLs): set it to the
    address clients use when the server sits behind a reverse proxy. By default it is the bound
    address; the request's Host header is never used.
    """

    def __init__(
        self,
        root: str | Path,
        tokens: Iterable[str] | Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        public_url: str | None = None,
    ):
        if tokens is None:
            tokens = [f"hub_{secrets.token_urlsafe(24)}"]
        tokens = dict(tokens) if isinstance(tokens, Mapping) else list(tokens)
        self.root = Path(root)
        self.token = next(iter(tokens), None)
        storage = HubStorage(self.root)
        self.api = HubApi(storage, Auth(tokens, load_url_key(self.root / URL_KEY_FILE)), max_body_bytes)
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

    @property
    def bytes_sent(self) -> int:
        """Response body bytes served since start: what clients downloaded (file and API answers)."""
        return self._app.bytes_sent

    def env(self) -> dict[str, str]:
        """What a client process needs: this endpoint, a token, and LFS uploads kept off Xet."""
        return {"HF_ENDPOINT": self.endpoint, "HF_TOKEN": self.token or "", "HF_HUB_DISABLE_XET": "1"}

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
