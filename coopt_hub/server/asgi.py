"""The HTTP server: uvicorn's h11 protocol with deadlines, and the ASGI app in front of the API.

h11 parses strictly (one Content-Length or `chunked`, hex chunk sizes only, no bytes after a
chunk, bounded header size), so a request is either well framed or answered 400 and closed: no
body can be read two ways, as request smuggling behind a proxy needs. On top of it this module
adds what the server needs to stay up whatever arrives:

- a deadline for a request's headers (from the connection's start or the previous answer), so
  idle and trickling connections are closed instead of held;
- request bodies read as they arrive, refused with 413 the moment they pass the caller's limit
  (small without a valid token), and spooled to disk past 1 MiB;
- a body deadline (an idle timeout per read, and a minimum average rate over the whole body);
- the API run in a bounded pool of threads, at most MAX_IN_FLIGHT requests at once (503 beyond),
  and file answers streamed in 1 MiB pieces with a write timeout and a stop when the client goes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from coopt_hub.server.errors import HubError, bad_request
from coopt_hub.server.http import Body, Headers, Request, Response, error_response, too_large

logger = logging.getLogger("coopt_hub.server")

HEADER_TIMEOUT_S = 30.0  # for a whole request line and headers, however they trickle in
BODY_IDLE_TIMEOUT_S = 60.0  # between two pieces of a body
MIN_BODY_RATE = 64 * 1024  # bytes/s a body must average, past BODY_IDLE_TIMEOUT_S of grace
WRITE_TIMEOUT_S = 120.0  # for a client to take one piece of an answer
MAX_IN_FLIGHT = 256  # requests being read, run or answered at once; 503 beyond
API_THREADS = 16
READER_THREADS = 16
MAX_CONNECTIONS = 1024  # uvicorn answers 503 past this many open connections


SENDFILE = "coopt_hub.sendfile"  # the ASGI extension HubProtocol adds to each request's scope


class _Sized:
    """What h11 needs of a body piece sent by sendfile: its length."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length


class ClientGone(Exception):
    """The client closed the connection before its request was read."""


class HubProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's headers and JSON 400 answers.

    uvicorn's keep-alive timer restarts on every byte received, so a client sending one byte at a
    time would hold its connection forever; this deadline does not restart.
    """

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer: asyncio.TimerHandle | None = None
        self._expect_request(None)

    def on_response_complete(self) -> None:
        completed = self.cycle
        super().on_response_complete()  # may start the next, pipelined, request
        self._expect_request(completed)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        super().connection_lost(exc)

    def _expect_request(self, previous: object) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
        self._request_timer = self.loop.call_later(self.header_timeout_s, self._request_late, previous)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not None and self.cycle is not before:  # a request began; its app has not run yet
            self.cycle.scope.setdefault("extensions", {})[SENDFILE] = functools.partial(self._sendfile, self.cycle)

    async def _sendfile(self, cycle: Any, file: BinaryIO, offset: int, count: int) -> None:
        """Part of a response body straight from a file with sendfile(2): no copy through Python.

        h11 counts the bytes against Content-Length (a sized stand-in passes through it untouched);
        the kernel sends them once the transport's buffer is empty.
        """
        if cycle.disconnected or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.conn.send_with_data_passthrough(h11.Data(data=_Sized(count)))
        await self.loop.sendfile(self.transport, file, offset, count)

    def _request_late(self, previous: object) -> None:
        if self.cycle is previous and not self.transport.is_closing():
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # framing broke mid-body after the answer began: nothing to add
            return
        message = "Malformed HTTP request: it breaks HTTP/1.1 framing or header syntax."
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"x-error-code", b"BadRequest"), (b"x-error-message", message.encode()),
                   (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:
            pass
        self.transport.close()


class HubApp:
    """The ASGI application: spools each body under its route's limit, then runs the API in a thread."""

    def __init__(self, route: Callable[[Request], Any], spool_dir: Path, endpoint: Callable[[], str]):
        self._route = route
        self._spool_dir = spool_dir
        self._endpoint = endpoint
        self._api_pool = ThreadPoolExecutor(API_THREADS, thread_name_prefix="coopt-hub-api")
        self._reader_pool = ThreadPoolExecutor(READER_THREADS, thread_name_prefix="coopt-hub-read")
        self._in_flight = 0
        # Response body bytes served, for traffic accounting (e.g. what one participant downloaded);
        # only the event loop's thread adds to it.
        self.bytes_sent = 0

    def close(self) -> None:
        self._api_pool.shutdown(wait=False, cancel_futures=True)
        self._reader_pool.shutdown(wait=False, cancel_futures=True)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        headers = Headers(scope["headers"])
        request = Request(scope["method"], scope["raw_path"], scope["query_string"], headers, self._endpoint(),
                          Body(self._spool_dir))
        self._in_flight += 1
        try:
            response, body_read = await self._answer(request, receive)
        except ClientGone:
            return
        finally:
            self._in_flight -= 1
            request.body.discard()
        if not body_read:
            # The unread body would be parsed as the next request: close after answering instead.
            response.headers["Connection"] = "close"
        logger.info("%s %s %s", request.method, request.path, response.status)
        await self._send(scope, send, receive, response, head_only=request.method == "HEAD")

    async def _answer(self, request: Request, receive: Callable) -> tuple[Response, bool]:
        body_read = not _announces_body(request.headers)
        try:
            if self._in_flight > MAX_IN_FLIGHT:
                err = HubError(503, "The server is busy; retry in a moment.", "ServiceUnavailable")
                err.headers["Retry-After"] = "1"
                raise err
            if request.headers.get("Transfer-Encoding") is not None and request.headers.get("Content-Length"):
                # Allowed by RFC 9112 (chunked wins), but a proxy in front may frame it the other way.
                raise bad_request("A request must not carry both Transfer-Encoding and Content-Length.")
            route = self._route(request)
            if not body_read:
                await self._read_body(receive, request, route.body_limit)
                body_read = True
            response = await asyncio.get_running_loop().run_in_executor(self._api_pool, route.call)
        except HubError as err:
            response = error_response(err)
        except ClientGone:
            raise
        except Exception:  # noqa: BLE001 - a bug must cost one request, not the server
            logger.exception("Unhandled error for %s %s", request.method, request.path)
            response = error_response(
                HubError(500, "Internal server error; the server log has the details.", "InternalError"))
        return response, body_read

    async def _read_body(self, receive: Callable, request: Request, limit: int) -> None:
        declared = request.headers.get("Content-Length")
        declared_size = int(declared) if declared is not None else None  # h11 checked it is digits
        if declared_size is not None and declared_size > limit:
            raise too_large(limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_IDLE_TIMEOUT_S + (declared_size or limit) / MIN_BODY_RATE
        body = request.body
        while True:
            timeout = max(0.0, min(BODY_IDLE_TIMEOUT_S, deadline - loop.time()))
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise HubError(408, "The request body arrived too slowly; the connection was closed.",
                               "RequestTimeout") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            if body.size + len(chunk) > limit:
                raise too_large(limit)
            body.write(chunk)
            if not message.get("more_body", False):
                return

    async def _send(self, scope: dict, send: Callable, receive: Callable, response: Response,
                    head_only: bool) -> None:
        headers = {**response.headers, "Content-Length": str(response.content_length),
                   "X-Request-Id": uuid.uuid4().hex}
        start = {"type": "http.response.start", "status": response.status,
                 "headers": [(name.encode("latin-1"), value.encode("latin-1"))
                             for name, value in headers.items()]}
        if not await self._write(send, start):
            return
        if head_only or (response.stream is None and response.file is None):
            body = b"" if head_only else response.body
            if await self._write(send, {"type": "http.response.body", "body": body}):
                self.bytes_sent += len(body)
            return
        if response.file is not None:
            await self._sendfile(scope["extensions"][SENDFILE], send, response)
        else:
            await self._stream(send, receive, response)

    async def _sendfile(self, sendfile: Callable, send: Callable, response: Response) -> None:
        with open(response.file, "rb") as f:
            try:
                await asyncio.wait_for(sendfile(f, response.offset, response.length),
                                       WRITE_TIMEOUT_S + response.length / MIN_BODY_RATE)
            except (OSError, asyncio.TimeoutError):
                return  # the client went away or stalled: uvicorn closes the unfinished answer
        self.bytes_sent += response.length
        await self._write(send, {"type": "http.response.body", "body": b""})

    async def _stream(self, send: Callable, receive: Callable, response: Response) -> None:
        loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(_disconnected(receive))
        chunks = response.stream
        try:
            while not gone.done():
                try:
                    chunk = await loop.run_in_executor(self._reader_pool, next, chunks, b"")
                except Exception:  # noqa: BLE001 - the answer has begun: all we can do is stop it
                    logger.exception("Reading the answer to a request failed")
                    return
                more = bool(chunk)
                if not await self._write(send, {"type": "http.response.body", "body": chunk, "more_body": more}):
                    return
                self.bytes_sent += len(chunk)
                if not more:
                    return
        finally:
            gone.cancel()
            await loop.run_in_executor(self._reader_pool, chunks.close)

    async def _write(self, send: Callable, message: dict) -> bool:
        """Send, or give up on a client that does not read (uvicorn then closes the connection)."""
        try:
            await asyncio.wait_for(send(message), WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            return False
        return True


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _announces_body(headers: Headers) -> bool:
    return headers.get("Transfer-Encoding") is not None or (headers.get("Content-Length") or "0") != "0"
