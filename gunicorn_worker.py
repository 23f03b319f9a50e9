"""gunicorn's threaded worker, made safe against slow and half-open clients.

gunicorn's ``sync`` worker serves one connection at a time, so two clients that trickle their
headers stall a two-worker deployment; its ``gthread`` worker hands a connection to a thread as
soon as the first byte arrives, and the thread then blocks until the whole request has come in,
so a few dozen such clients hold every thread (slowloris).

``BufferingThreadWorker`` reads every request without blocking, a piece each time the socket is
readable, and gives it to the application only once its head and body are complete; in between
the connection waits in the worker's poller and holds no thread. A connection that stays silent
is closed after gunicorn's ``keepalive`` seconds, and a request not complete within
``REQUEST_READ_TIMEOUT`` seconds (10; HAProxy's ``timeout http-request``) is answered 408.
Plain HTTP only: with TLS (gunicorn's ``--certfile``) it behaves as ``gthread``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
import ssl
import time

from gunicorn import util
from gunicorn.workers import gthread

REQUEST_READ_TIMEOUT = float(os.environ.get("REQUEST_READ_TIMEOUT") or 10)
MAX_HEAD_BYTES = 64 * 1024  # nginx allows 32 KiB of headers by default
MAX_BUFFERED_BODY = 1024 * 1024  # a larger body goes to the app unbuffered (which refuses > MAX_CONTENT_LENGTH)
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d+)[ \t]*$", re.IGNORECASE | re.MULTILINE)
_CHUNKED = re.compile(rb"^transfer-encoding[ \t]*:.*chunked", re.IGNORECASE | re.MULTILINE)
_EXPECT = re.compile(rb"^expect[ \t]*:", re.IGNORECASE | re.MULTILINE)


def chunked_body_end(body: bytes) -> int | None:
    """Length of a complete chunked body (last chunk and trailers included) at the start of ``body``."""
    pos = 0
    while True:
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            return None
        try:
            size = int(body[pos:line_end].split(b";", 1)[0].strip(), 16)
        except ValueError:
            return len(body)  # malformed: let the parser refuse it
        if size == 0:
            trailers_end = body.find(b"\r\n\r\n", line_end)
            if body[line_end:line_end + 4] == b"\r\n\r\n":
                return line_end + 4
            return None if trailers_end < 0 else trailers_end + 4
        pos = line_end + 2 + size + 2
        if pos > len(body):
            return None


def request_complete(data: bytes) -> bool:
    """Whether ``data`` holds a whole request the parser can read without waiting for the client.

    A malformed request counts as complete: the parser answers it with an error.
    """
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head, body = data[:head_end], data[head_end + 4:]
    if _EXPECT.search(head):
        return True  # the client waits for "100 Continue" before it sends the body
    if _CHUNKED.search(head):
        return len(body) > MAX_BUFFERED_BODY or chunked_body_end(body) is not None
    length = _CONTENT_LENGTH.search(head)
    if length is None:
        return True
    expected = int(length[1])
    return expected > MAX_BUFFERED_BODY or len(body) >= expected


@dataclasses.dataclass
class PendingRequest:
    """The bytes of one request read so far, and when it must be complete."""

    deadline: float
    data: bytearray = dataclasses.field(default_factory=bytearray)

    def read_available(self, sock: socket.socket) -> bool:
        """Append what the client has sent, without blocking; False once it has closed its side
        (a request sent before that is still answered)."""
        while True:
            try:
                chunk = sock.recv(64 * 1024, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            if not chunk:
                return False
            self.data += chunk
            if len(self.data) > MAX_HEAD_BYTES + MAX_BUFFERED_BODY:
                return True


def refuse(sock: socket.socket, status: str) -> None:
    """Best-effort error answer before closing: the client may not be reading."""
    try:
        sock.send(f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".encode(), socket.MSG_DONTWAIT)
    except OSError:
        pass


class QuickCloseConn(gthread.TConn):
    """A connection whose close never waits for the client.

    gunicorn's graceful close lingers up to 2 s reading until the client stops sending, in the
    worker's event loop: a client that keeps trickling bytes at a closing connection would stall
    every other connection of the worker for that long, once per connection.
    """

    def close(self, graceful: bool = False) -> None:
        if isinstance(self.sock, ssl.SSLSocket):  # TLS (run_system --ssl): gunicorn's own close
            super().close(graceful)
            return
        if graceful:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                while self.sock.recv(64 * 1024, socket.MSG_DONTWAIT):
                    pass  # what already arrived, so that the close sends FIN rather than RST
            except OSError:
                pass
        util.close(self.sock)


class BufferingThreadWorker(gthread.ThreadWorker):
    """``gthread`` whose threads only ever run complete requests (see the module docstring)."""

    def accept(self, listener: socket.socket) -> None:
        """gthread's accept, with connections that close without lingering."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(QuickCloseConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def handle(self, conn: gthread.TConn):  # noqa: ANN201 - gunicorn returns True, False or its _DEFER marker
        if self.cfg.is_ssl or conn.is_http2:
            return super().handle(conn)
        pending: PendingRequest | None = getattr(conn, "pending_request", None)
        if pending is None:
            pending = PendingRequest(deadline=time.monotonic() + REQUEST_READ_TIMEOUT)
            if conn.parser is not None:  # a kept-alive connection: bytes read ahead come first
                pending.data += conn.parser.unreader.take_buffered()
            conn.pending_request = pending
        try:
            peer_open = pending.read_available(conn.sock)
        except OSError:
            return False
        data = bytes(pending.data)
        if not request_complete(data):
            if not peer_open:
                return False
            if b"\r\n\r\n" not in data and len(data) > MAX_HEAD_BYTES:
                refuse(conn.sock, "431 Request Header Fields Too Large")
                return False
            if time.monotonic() < pending.deadline:
                return gthread._DEFER  # back to the poller, no thread held (gunicorn's own marker)
            self.log.info("closing %s: request not complete within %.0f s", conn.client, REQUEST_READ_TIMEOUT)
            refuse(conn.sock, "408 Request Timeout")
            return False
        conn.pending_request = None
        conn.data_ready = True  # no wait in gthread's handle: everything is here
        conn.init()
        conn.parser.unreader.unread(data)
        return super().handle(conn)
