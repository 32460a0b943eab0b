"""HubServer: the storage, the API and the HTTP server wired together, in the foreground or a thread."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from coopt_hub.server.api import HubApi
from coopt_hub.server.auth import Auth, load_url_key
from coopt_hub.server.http import HubHTTPServer
from coopt_hub.server.storage import HubStorage

DEFAULT_MAX_BODY_BYTES = 1024**3
URL_KEY_FILE = "upload-url.key"


class HubServer:
    """A Hub-compatible server over a root directory; everything it serves lives on disk there.

        with HubServer(root, tokens=["t"]) as hub:
            os.environ.update(hub.env())

    Without tokens, one random token is made up (see `token`). Port 0 picks a free port.
    """

    def __init__(
        self,
        root: str | Path,
        tokens: Iterable[str] | Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        if tokens is None:
            tokens = [f"hub_{secrets.token_urlsafe(24)}"]
        tokens = dict(tokens) if isinstance(tokens, Mapping) else list(tokens)
        self.root = Path(root)
        self.token = next(iter(tokens), None)
        self.api = HubApi(HubStorage(self.root), Auth(tokens, load_url_key(self.root / URL_KEY_FILE)))
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self._httpd: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def bytes_sent(self) -> int:
        """Response body bytes served since start: what clients downloaded (file and API answers)."""
        return self._httpd.body_bytes_sent if self._httpd is not None else 0

    def env(self) -> dict[str, str]:
        """What a client process needs: this endpoint, a token, and LFS uploads kept off Xet."""
        return {"HF_ENDPOINT": self.endpoint, "HF_TOKEN": self.token or "", "HF_HUB_DISABLE_XET": "1"}

    def bind(self) -> HubServer:
        self._httpd = HubHTTPServer((self.host, self.port), self.api.dispatch, self.max_body_bytes)
        self.port = self._httpd.server_address[1]
        return self

    def start(self) -> HubServer:
        """Serve in a daemon thread; returns once the port accepts connections."""
        if self._httpd is None:
            self.bind()
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="coopt-hub-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        if self._httpd is None:
            self.bind()
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.close_connections()
        self._httpd.server_close()
        self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
