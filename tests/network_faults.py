"""Faults of the network around a hub, made for real: a relay that breaks one request at a chosen
moment, and the hub as a `coopt-hub hub serve` process that is killed with SIGKILL and started again."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent


# A proxy that breaks one request ------------------------------------------------------------------


@dataclass
class Strike:
    """Break the first request matching `method` and `path` (a regex on the raw request target) at
    `moment`: "mid-body" (half its body has reached the hub), "sent" (all of it has, no answer yet) or
    "answered" (the hub has answered; the client will never see it). The connection is then reset."""

    method: str
    path: str
    moment: str

    def __str__(self) -> str:
        return f"{self.method} {self.path} {self.moment}"


@dataclass
class _Armed:
    strike: Strike
    action: object
    fired: threading.Event = field(default_factory=threading.Event)


class Proxy:
    """A loopback HTTP/1.1 relay in front of a hub. Each connection carries one request and one answer
    at a time (clients do not pipeline), so the proxy knows exactly where a body or an answer stands."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._armed: list[_Armed] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, strike: Strike, action=lambda: None) -> _Armed:
        armed = _Armed(strike, action)
        with self._lock:
            self._armed.append(armed)
        return armed

    def close(self) -> None:
        self.listener.close()

    def _take(self, method: str, target: str) -> _Armed | None:
        with self._lock:
            for armed in self._armed:
                if armed.strike.method == method and re.search(armed.strike.path, target):
                    self._armed.remove(armed)
                    return armed
        return None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = None
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=60)
            from_client, from_upstream = client.makefile("rb"), upstream.makefile("rb")
            while True:
                head = _read_head(from_client)
                if head is None:
                    return
                method, target = head.split(b" ", 2)[:2]
                method, target = method.decode(), target.decode("latin-1")
                armed = self._take(method, target)
                upstream.sendall(head)
                body = _body_length(head)
                if armed and armed.strike.moment == "mid-body":
                    _copy(from_client, upstream, max(1, body // 2))
                    return self._fire(armed)
                _copy_body(from_client, upstream, head, body)
                if armed and armed.strike.moment == "sent":
                    return self._fire(armed)
                answer = _read_head(from_upstream)
                if answer is None:
                    return
                status = int(answer.split(b" ", 2)[1])
                length = 0 if method == "HEAD" or status in (204, 304) else _body_length(answer)
                payload = from_upstream.read(length)
                if armed and armed.strike.moment == "answered":
                    return self._fire(armed)
                client.sendall(answer + payload)
                if b"connection: close" in answer.lower() or b"connection: close" in head.lower():
                    return
        except (OSError, ValueError, IndexError):
            return  # the hub went away or the client did: the connection ends like a real one would
        finally:
            _reset(client)
            if upstream is not None:
                upstream.close()

    @staticmethod
    def _fire(armed: _Armed) -> None:
        armed.action()
        armed.fired.set()


def _read_head(stream) -> bytes | None:
    lines = []
    while True:
        line = stream.readline(65536)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _body_length(head: bytes) -> int:
    return int(_header(head, b"content-length") or 0)


def _copy(source, sink: socket.socket, count: int) -> None:
    while count > 0:
        block = source.read(min(count, 1 << 16))
        if not block:
            raise ValueError("the body ended early")
        sink.sendall(block)
        count -= len(block)


def _copy_body(source, sink: socket.socket, head: bytes, length: int) -> None:
    if b"chunked" not in (_header(head, b"transfer-encoding") or b"").lower():
        _copy(source, sink, length)
        return
    while True:
        size_line = source.readline(1024)
        sink.sendall(size_line)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while (trailer := source.readline(1024)) not in (b"\r\n", b"\n", b""):
                sink.sendall(trailer)
            sink.sendall(b"\r\n")
            return
        _copy(source, sink, size + 2)


def _reset(connection: socket.socket) -> None:
    """Close with RST, as a crashed peer or a broken network does, not with an orderly FIN."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    connection.close()


# The hub as a process -----------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on yet."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServedHub:
    """`coopt-hub hub serve` in its own process, killed with SIGKILL and started again on the same root and port."""

    def __init__(self, root: Path, token: str, port: int | None = None, public_url: str | None = None):
        """`public_url`: where clients reach it (a relay in front of it), for the links it hands out."""
        self.root, self.token, self.port = root, token, port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.public_url = public_url
        self.process: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> ServedHub:
        public = ["--public-url", self.public_url] if self.public_url else []
        self.process = subprocess.Popen(
            [str(BIN / "coopt-hub"), "hub", "serve", "--root", str(self.root), "--port", str(self.port),
             "--token", self.token, "--quiet", *public],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        exports = [self.process.stdout.readline() for _ in range(3)]  # printed once the port is bound
        assert all(line.startswith("export ") for line in exports), exports
        return self

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()
        self.kills += 1

    def kill_then_restart(self, down_s: float) -> None:
        """Kill now; come back after `down_s` seconds, during which connections are refused."""
        self.kill()
        threading.Timer(down_s, self.start).start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


def copy_repos(source_root: Path, target_root: Path, *repos: str) -> None:
    """Serve repos built on the session hub from another root: a repo is its directory."""
    for repo in repos:
        relative = Path("repos", "datasets", f"{repo}.git")
        shutil.copytree(source_root / relative, target_root / relative)
