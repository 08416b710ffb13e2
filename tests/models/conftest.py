"""A real HTTP server on 127.0.0.1 for the download tests: serves one file, honours Range, records requests."""
from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FileServer(ThreadingHTTPServer):
    """Serves `payload` at /ckpt.pth (404 elsewhere). Knobs: honour_range, cut_after (bytes sent, then close),
    restart_as_206 (a Range answered with the whole file, labelled as such), fail_with (an HTTP error status),
    wrong_range ((start, end): every request answered with 206 and those bytes, whatever it asked for)."""

    def __init__(self, payload: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.payload = payload
        self.honour_range = True
        self.cut_after: int | None = None
        self.restart_as_206 = False
        self.fail_with: int | None = None
        self.wrong_range: tuple[int, int] | None = None
        self.ranges: list[str | None] = []  # the Range header of each request, None when absent
        self.bytes_sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/ckpt.pth"


class _Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        if self.path != "/ckpt.pth" or srv.fail_with:
            self.send_error(srv.fail_with or 404)
            return
        if srv.wrong_range:
            start, end = srv.wrong_range
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(srv.payload)}")
            self.send_header("Content-Length", str(end - start))
            self.end_headers()
            self.wfile.write(srv.payload[start:end])
            return
        start = 0
        if srv.honour_range and self.headers.get("Range") and not srv.restart_as_206:
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
        if start >= len(srv.payload):
            self.send_error(416)  # Range Not Satisfiable, as real servers answer
            return
        body = srv.payload[start:]
        partial = start or (srv.restart_as_206 and self.headers.get("Range"))
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(srv.payload) - 1}/{len(srv.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = body if srv.cut_after is None else body[: srv.cut_after]
        srv.bytes_sent += len(sent)  # counted before sending: the client may finish before this thread resumes
        self.wfile.write(sent)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def serve():
    """serve(payload) -> a running FileServer; all are shut down after the test."""
    servers = []

    def start(payload: bytes) -> FileServer:
        srv = FileServer(payload)
        # A short poll interval so that shutdown() at teardown returns at once.
        threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def silent_url():
    """A URL whose server accepts the connection (kernel backlog) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/ckpt.pth"
    sock.close()


@pytest.fixture
def closed_url():
    """A URL on a loopback port nobody listens on: the connection is refused, as when offline."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}/ckpt.pth"
