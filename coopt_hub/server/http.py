"""What the API sees of HTTP: a parsed request with its spooled body, and the response it returns.

The wire protocol (parsing, framing, keep-alive) belongs to uvicorn's strict h11 parser; see
coopt_hub.server.asgi for how requests reach the API. Routing happens in coopt_hub.server.api;
this module knows nothing about repos.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qs

from coopt_hub.server.access import Grant
from coopt_hub.server.errors import HubError, bad_request

# JSON bodies are parsed in memory, so they get a cap of their own below the body limit: only
# commits (NDJSON, read line by line) and LFS uploads (moved into place) can be larger.
MAX_JSON_BYTES = 16 * 1024 * 1024
_IN_MEMORY_BYTES = 1024 * 1024  # a body spills to a file under the root beyond this
_RANGE = re.compile(r"^bytes=(\d{1,19})?-(\d{1,19})?$")
_MAX_JSON_DEPTH = 64


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    # Streamed content instead of `body`, `length` bytes of it: pieces of a blob, or a file from
    # `offset` (sent with sendfile).
    stream: Iterator[bytes] | None = None
    file: Path | None = None
    offset: int = 0
    length: int | None = None

    @property
    def content_length(self) -> int:
        return self.length if self.length is not None else len(self.body)


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})


def error_response(err: HubError) -> Response:
    # Header values must stay on one line and in latin-1; the body keeps the full message.
    header_message = " ".join(err.message.split()).encode("latin-1", "replace").decode("latin-1")
    headers = {"X-Error-Message": header_message, **err.headers}
    if err.code:
        headers["X-Error-Code"] = err.code
    return json_response({"error": err.message, **err.extra}, err.status, headers)


def too_large(limit: int) -> HubError:
    return HubError(413, f"Request body larger than the server limit of {limit} bytes.", "PayloadTooLarge")


def ranged(size: int, range_header: str | None) -> tuple[int, int, int] | None:
    """(status, offset, length) for a single `bytes=` range; None to send the whole content.

    Multi-range and malformed headers are ignored (answering 200 is allowed, RFC 9110 14.2); a
    range that cannot be satisfied (starting past the end, or the last 0 bytes) is 416.
    """
    match = _RANGE.match(range_header.strip()) if range_header else None
    if match is None or match.group(1) is None and match.group(2) is None:
        return None
    first, last = match.groups()
    if first is None:  # suffix range: the last N bytes
        length = min(int(last), size)
        if length == 0:
            raise _unsatisfiable(range_header, size)
        return 206, size - length, length
    start = int(first)
    if last is not None and int(last) < start:  # an invalid range is ignored, not refused
        return None
    if start >= size:
        raise _unsatisfiable(range_header, size)
    end = min(int(last), size - 1) if last is not None else size - 1
    return 206, start, end - start + 1


def _unsatisfiable(range_header: str, size: int) -> HubError:
    err = HubError(416, f"Range {range_header[:100]!r} not satisfiable for {size} bytes.", "RangeNotSatisfiable")
    err.headers["Content-Range"] = f"bytes */{size}"
    return err


class Body:
    """A request body as it arrived: in memory while small, then in a 0600 file under the root."""

    def __init__(self, spool_dir: Path):
        self._spool_dir = spool_dir
        self._memory = bytearray()
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.size = 0
        self._digest = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._digest.update(chunk)
        if self._file is None and len(self._memory) + len(chunk) <= _IN_MEMORY_BYTES:
            self._memory += chunk
            return
        self._spill().write(chunk)

    def _spill(self) -> BinaryIO:
        if self._file is None:
            self._spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor, name = tempfile.mkstemp(dir=self._spool_dir, prefix="body-")  # mkstemp: mode 0600
            self.path = Path(name)
            self._file = os.fdopen(descriptor, "wb")
            self._file.write(self._memory)
            self._memory = bytearray()
        return self._file

    def sha256(self) -> str:
        """The hex sha256 of the body so far, hashed as it arrived: an LFS upload is checked against
        its oid without reading the spooled file back (a 2 GB upload took ~1.5 s more to answer)."""
        return self._digest.hexdigest()

    def on_disk(self) -> Path:
        """The body as a file (for moving into the LFS store without a copy)."""
        self._spill().flush()
        return self.path

    def open(self) -> BinaryIO:
        if self._file is None:
            return io.BytesIO(bytes(self._memory))
        self._file.flush()
        return open(self.path, "rb")

    def read(self, limit: int = MAX_JSON_BYTES) -> bytes:
        if self.size > limit:
            raise too_large(limit)
        with self.open() as f:
            return f.read()

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.path.unlink(missing_ok=True)


class Headers:
    """Request headers by case-insensitive name (the last value of a repeated one)."""

    def __init__(self, pairs: list[tuple[bytes, bytes]]):
        self._values = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in pairs}

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)


class Request:
    """One request as the API sees it: method, raw path segments, query, headers and its body."""

    def __init__(self, method: str, raw_path: bytes, query: bytes, headers: Headers, endpoint: str, body: Body):
        self.method = method
        # Split BEFORE unquoting: a revision such as `shard%2F3` is one segment.
        self.segments = raw_path.decode("latin-1").split("/")[1:]
        self.query = parse_qs(query.decode("latin-1"), keep_blank_values=True)
        self.headers = headers
        self.endpoint = endpoint  # the public base URL for links in answers: never the Host header
        self.body = body
        self.grant: Grant | None = None  # what the caller's token allows; None without a token
        self.user: str | None = None  # the token's user name

    @property
    def path(self) -> str:
        return "/" + "/".join(self.segments)

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in {"1", "true", "yes"}

    def json(self) -> dict:
        data = parse_json(self.body.read() or b"{}", "JSON body")  # no body at all: no fields
        if not isinstance(data, dict):
            raise bad_request("The JSON body must be an object.")
        return data

    def form_or_json(self) -> dict[str, list]:
        """paths-info sends a form; other clients send JSON. Both become name -> list of values."""
        content_type = (self.headers.get("Content-Type") or "").lower()
        if content_type.startswith("application/json"):
            return {key: value if isinstance(value, list) else [value] for key, value in self.json().items()}
        try:
            return parse_qs(self.body.read().decode(), keep_blank_values=True, max_num_fields=10_000)
        except (UnicodeDecodeError, ValueError):
            raise bad_request("Malformed form body.") from None


def parse_json(data: bytes, what: str) -> object:
    """json.loads, with every way it can fail on hostile input turned into a 400: deep nesting,
    integers of thousands of digits, and lone surrogates (which no file name or commit can hold)."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise bad_request(f"Malformed {what}: nested too deeply.") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, and int() past 4300 digits
        raise bad_request(f"Malformed {what}: {str(err)[:200]}.") from None
    _check_strings(value, what)
    return value


def _check_strings(value: object, what: str) -> None:
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > _MAX_JSON_DEPTH:
            raise bad_request(f"Malformed {what}: nested too deeply.")
        if isinstance(item, str):
            _check_text(item, what)
        elif isinstance(item, dict):
            pending.extend((key, depth + 1) for key in item)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)


def _check_text(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"Malformed {what}: it holds a lone surrogate, which is not valid UTF-8.") from None
    return text
