"""The HTTP layer: raw-path parsing, bounded body reading, error rendering and file streaming.

Routing happens in coopt_hub.server.api; this module knows nothing about repos.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

from coopt_hub.server.errors import HubError, bad_request

logger = logging.getLogger("coopt_hub.server")

_CHUNK = 1024 * 1024
_RANGE = re.compile(r"^bytes=(\d{0,19})-(\d{0,19})$")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # streamed with sendfile instead of `body`
    offset: int = 0
    length: int | None = None  # of `file` or of `body`, for HEAD answers that carry no body

    @property
    def content_length(self) -> int:
        if self.length is not None:
            return self.length
        return len(self.body)


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def error_response(err: HubError) -> Response:
    # Header values must stay on one line and in latin-1; the body keeps the full message.
    header_message = " ".join(err.message.split()).encode("latin-1", "replace").decode("latin-1")
    headers = {"X-Error-Message": header_message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response({"error": err.message, **err.extra}, err.status, headers)


def ranged(size: int, range_header: str | None) -> tuple[int, int, int] | None:
    """(status, offset, length) for a single `bytes=` range; None to send the whole content.

    Multi-range, malformed and invalid headers are ignored (answering 200 is allowed); a range
    that starts past the end is 416.
    """
    match = _RANGE.match(range_header.strip()) if range_header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        length = min(int(last), size)
        return 206, size - length, length
    start = int(first)
    if last and int(last) < start:  # an invalid range is ignored, not refused (RFC 9110)
        return None
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        raise HubError(416, f"Range {range_header!r} not satisfiable for {size} bytes.", "RangeNotSatisfiable")
    return 206, start, end - start + 1


class Request:
    """One request as the API sees it: method, raw path segments, query, headers and a bounded body."""

    def __init__(self, handler: HubRequestHandler, method: str):
        self._handler = handler
        self.method = method
        raw_path, _, query = handler.path.partition("?")
        # Split BEFORE unquoting: a revision such as `shard%2F3` is one segment.
        self.segments = raw_path.split("/")[1:]
        self.query = parse_qs(query, keep_blank_values=True)
        self.headers: Message = handler.headers
        self.user: str | None = None
        host = self.headers.get("Host") or "%s:%s" % handler.server.server_address[:2]
        self.endpoint = f"http://{host}"

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in {"1", "true", "yes"}

    def body(self) -> bytes:
        return self._handler.read_body()

    def json(self) -> dict:
        try:
            data = json.loads(self.body() or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise bad_request(f"Malformed JSON body: {err}.") from None
        except RecursionError:  # json gives up on deep nesting this way, not with a JSONDecodeError
            raise bad_request("Malformed JSON body: nested too deeply.") from None
        if not isinstance(data, dict):
            raise bad_request("The JSON body must be an object.")
        return data

    def form_or_json(self) -> dict[str, list]:
        """paths-info sends a form; other clients send JSON. Both become name -> list of values."""
        content_type = (self.headers.get("Content-Type") or "").lower()
        if content_type.startswith("application/json"):
            return {key: value if isinstance(value, list) else [value] for key, value in self.json().items()}
        try:
            return parse_qs(self.body().decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            raise bad_request("Malformed form body.") from None

    def stream(self) -> Iterator[bytes]:
        return self._handler.iter_body(limit=None)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many clients (snapshot_download, the benchmark) open connections in bursts.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], dispatch: Callable[[Request], Response], max_body_bytes: int):
        self.dispatch = dispatch
        self.max_body_bytes = max_body_bytes
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        # Response body bytes served, for traffic accounting (e.g. what one participant downloaded).
        self.body_bytes_sent = 0
        self._traffic_lock = threading.Lock()
        super().__init__(address, HubRequestHandler)

    def count_sent(self, size: int) -> None:
        with self._traffic_lock:
            self.body_bytes_sent += size

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """End keep-alive connections too: a stopped server must not go on answering old clients."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client reuses connections
    server_version = "coopt-hub"
    # Seconds a connection may stay silent (idle keep-alive, stalled upload) before it is dropped,
    # so vanished clients do not pin threads forever.
    timeout = 300
    server: HubHTTPServer

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self._body_done = not self._announces_body()
        try:
            response = self.server.dispatch(Request(self, method))
        except HubError as err:
            response = error_response(err)
        except Exception:  # noqa: BLE001 - a bug must cost one request, not the server
            logger.exception("Unhandled error for %s %s", method, self.path.partition("?")[0])
            response = error_response(
                HubError(500, "Internal server error; the server log has the details.", "InternalError"))
        if not self._body_done:
            # The unread body would be parsed as the next request: drop the connection instead.
            self.close_connection = True
            response.headers["Connection"] = "close"
        try:
            self._send(response, head_only=method == "HEAD")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _announces_body(self) -> bool:
        return bool(self.headers.get("Content-Length", "0").strip() not in ("", "0")
                    or self.headers.get("Transfer-Encoding"))

    def _send(self, response: Response, head_only: bool) -> None:
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(response.content_length))
        self.end_headers()
        if head_only or response.status in (204, 304):
            return
        if response.file is None:
            self.wfile.write(response.body)
            self.server.count_sent(len(response.body))
            return
        with open(response.file, "rb") as f:
            remaining = response.content_length
            offset = response.offset
            while remaining > 0:
                sent = self.connection.sendfile(f, offset, remaining)
                if sent == 0:
                    raise ConnectionResetError("client went away during the download")
                self.server.count_sent(sent)
                offset += sent
                remaining -= sent

    # ---- request bodies --------------------------------------------------------------------

    def read_body(self) -> bytes:
        return b"".join(self.iter_body(limit=self.server.max_body_bytes))

    def iter_body(self, limit: int | None) -> Iterator[bytes]:
        if self._body_done:
            return
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            yield from self._chunked(limit)
        else:
            yield from self._sized(limit)
        self._body_done = True

    def _sized(self, limit: int | None) -> Iterator[bytes]:
        text = self.headers.get("Content-Length", "0").strip()
        if not text.isdigit() or len(text) > 19:
            raise bad_request("Invalid Content-Length header.")
        remaining = int(text)
        if limit is not None and remaining > limit:
            raise _too_large(limit)
        while remaining:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                raise bad_request("The request body ended early.")
            remaining -= len(chunk)
            yield chunk

    def _chunked(self, limit: int | None) -> Iterator[bytes]:
        total = 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                raise bad_request("Malformed chunked request body.") from None
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return
            total += size
            if limit is not None and total > limit:
                raise _too_large(limit)
            remaining = size
            while remaining:
                chunk = self.rfile.read(min(_CHUNK, remaining))
                if not chunk:
                    raise bad_request("The request body ended early.")
                remaining -= len(chunk)
                yield chunk
            self.rfile.readline(1024)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, an unknown method, oversized headers) as
        JSON errors like every other answer; an unknown method is a 405 rather than http.server's 501."""
        status = HTTPStatus(code)
        if status == HTTPStatus.NOT_IMPLEMENTED:
            status, message = HTTPStatus.METHOD_NOT_ALLOWED, f"Method {self.command!r} is not supported."
        self.close_connection = True
        code = status.name.title().replace("_", "")  # e.g. MethodNotAllowed, like the API's error codes
        response = error_response(HubError(status.value, message or status.phrase, code))
        response.headers["Connection"] = "close"
        self._send(response, head_only=self.command == "HEAD")

    # ---- logging: paths only, never query strings (signed URLs) or headers (tokens) ---------

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # A malformed request line is refused before http.server has set a path.
        path = getattr(self, "path", "")
        logger.info("%s %s %s", self.command, path.partition("?")[0], code)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


def _too_large(limit: int) -> HubError:
    return HubError(413, f"Request body larger than the server limit of {limit} bytes.", "PayloadTooLarge")

