"""The balancer's client side: a lean HTTP/1.1 protocol for the proxy path, aiohttp for the rest.

Profiling (BENCHMARKS.md, issue 12) showed aiohttp's request cycle (request and response
objects, middleware, router, response writer) to be the largest cost per proxied request, so
proxied requests are parsed by ``httptools`` (llhttp, the parser Node and uvicorn use) in
``ProxyProtocol`` and answered with one ``transport.write`` of the head (and a buffered body).
The balancer's own routes (``FrontEnd.own_paths``) and requests the lean path does not take
(absolute-form or percent-encoded targets, upgrades, expectations other than 100-continue) are
handed to aiohttp's ``RequestHandler`` with the connection, from that request on, so they keep
aiohttp's routing, limits and error handling. ``ConnectionGuard`` caps and times out both kinds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Protocol

import httptools
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from lb_upstream import BodyPieces

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024  # request line and headers; more is answered 431
BODY_HIGH_WATER = 256 * 1024  # pause reading the client while this much of its body waits for the backend
MAX_PIPELINED = 32  # parsed requests waiting behind the one being served; more pauses reading
TRACK_LIMIT = 64 * 1024  # raw bytes kept to hand a connection to aiohttp mid-stream (see ProxyProtocol)


class ClientRequest(Protocol):
    """What the proxy reads of a client request: an aiohttp ``web.Request`` or a ``ProxyRequest``."""

    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> MultiMapping[str]: ...
    @property
    def raw_path(self) -> str: ...
    @property
    def rel_url(self) -> URL: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def scheme(self) -> str: ...
    @property
    def content_length(self) -> int | None: ...
    @property
    def body_exists(self) -> bool: ...
    @property
    def content(self) -> BodySource: ...


class BodySource(Protocol):
    def iter_chunked(self, n: int) -> AsyncIterator[bytes]: ...


class Relayed(Protocol):
    """A backend's answer as the proxy hands it over: whole (``body``) or still to stream."""

    @property
    def status(self) -> int: ...
    @property
    def reason(self) -> str: ...
    @property
    def headers(self) -> CIMultiDict[str]: ...
    @property
    def body(self) -> bytes | None: ...
    @property
    def content_length(self) -> int | None: ...

    def pieces(self) -> AsyncIterator[bytes]: ...
    def finished(self) -> None: ...
    def failed(self, exc: Exception) -> None: ...
    def abandoned(self) -> None: ...


Reply = web.Response | Relayed


@dataclass
class FrontEnd:
    """What the client side needs from the application (``app[FRONT_END]``)."""

    guard: ConnectionGuard
    serve: Callable[[ClientRequest], Awaitable[Reply]]  # never raises: errors come back as responses
    own_paths: frozenset[str]  # served by aiohttp's router, never proxied


FRONT_END = web.AppKey("front_end", FrontEnd)


class HandOver(Exception):
    """Raised from a parser callback: this request (and the connection from here on) goes to aiohttp."""


class HeadTooLarge(Exception):
    """Raised from a parser callback: the request head passed ``MAX_HEAD_BYTES``."""


# --------------------------------------------------------------------------- requests


class RequestBody(BodyPieces):
    """A request body as the parser delivers it, read once by the proxy with flow control."""

    __slots__ = ()

    def __init__(self, conn: ProxyProtocol | None) -> None:
        if conn is None:  # EMPTY_BODY: finished at once, never fed
            super().__init__(_nothing, _nothing, BODY_HIGH_WATER)
        else:
            super().__init__(functools.partial(conn.pause, "body"), functools.partial(conn.resume, "body"),
                             BODY_HIGH_WATER)

    def cut_short(self, error: BaseException) -> Exception:
        return ConnectionResetError(f"client connection lost mid-body: {error}")

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """Pieces as they arrive (each at most what one read delivered); ConnectionResetError if the client left."""
        return self.pieces()


def _nothing() -> None:
    """The flow control of a body that never receives a piece."""


EMPTY_BODY = RequestBody(None)
EMPTY_BODY.finish()


class ProxyRequest:
    """A parsed request on the lean path, with the attributes of ``web.Request`` the proxy reads."""

    __slots__ = ("method", "headers", "raw_path", "remote", "content_length", "body_exists", "content", "version",
                 "keep_alive", "expect_continue")  # fmt: skip
    scheme = "http"

    def __init__(
        self, method: str, target: str, headers: CIMultiDict[str], remote: str | None, version: str, keep_alive: bool
    ) -> None:
        self.method = method
        self.raw_path = target
        self.headers = headers
        self.remote = remote
        self.version = version
        self.keep_alive = keep_alive
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None else None  # llhttp has validated it
        self.body_exists = "Transfer-Encoding" in headers or bool(self.content_length)
        self.content: RequestBody = EMPTY_BODY
        self.expect_continue = False

    @property
    def rel_url(self) -> URL:
        return URL(self.raw_path, encoded=True)


def lean_path(target: bytes) -> str | None:
    """The path of an origin-form target the lean path may route by plain comparison, else None.

    Targets whose routing aiohttp would decide differently from a string compare (absolute form,
    ``//x``, percent-escapes, dot segments, a ``#fragment``, which aiohttp strips before routing) are
    left to aiohttp, which decides as it always did.
    """
    path = target.split(b"?", 1)[0]
    if path[:1] != b"/" or path[:2] == b"//" or b"%" in path or b"/." in path or b"\\" in path or b"#" in path:
        return None
    return path.decode("ascii", "surrogateescape")


class _BeginCounter:
    """Parser callbacks that only count message starts (used to find a request's offset)."""

    def __init__(self) -> None:
        self.count = 0

    def on_message_begin(self) -> None:
        self.count += 1


def message_begins(data: bytes) -> int:
    counter = _BeginCounter()
    try:
        httptools.HttpRequestParser(counter).feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        pass
    return counter.count


def message_offset(raw: bytes, index: int) -> int:
    """Where request number ``index`` (0-based) starts in ``raw``, which starts at a request boundary.

    llhttp does not report positions, so this asks it how many requests have begun in each prefix
    (a bisection, a few parses of at most ``TRACK_LIMIT`` bytes): the same parser draws the line.
    """
    lo, hi = 0, len(raw)
    while lo < hi:
        mid = (lo + hi) // 2
        if message_begins(raw[:mid]) > index:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


# --------------------------------------------------------------------------- writing responses

_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True).encode()
    return _date_cache[1]  # type: ignore[no-any-return]


NO_BODY_STATUSES = frozenset({204, 304})
OWN_FRAMING = frozenset({"content-length", "transfer-encoding", "connection"})


def response_head(
    version: str, status: int, reason: str, headers: Iterable[tuple[str, str]], framing: list[str]
) -> bytes:
    """Status line, headers (with a Date when the backend sent none) and the framing lines, encoded."""
    lines = [f"HTTP/{version} {status} {reason}"]
    dated = False
    for name, value in headers:
        lines.append(f"{name}: {value}")
        if not dated and len(name) == 4 and name.lower() == "date":
            dated = True
    if not dated:
        lines.append("Date: " + http_date().decode())
    lines += framing
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


def web_response_bytes(response: web.Response, request: ProxyRequest, framing: list[str]) -> bytes:
    """A complete ``web.Response`` (an error, a cached answer, a gateway refusal) on the wire."""
    body = response.body if isinstance(response.body, bytes) else b""
    headers = [(k, v) for k, v in response.headers.items() if k.lower() not in OWN_FRAMING]
    if response.status not in NO_BODY_STATUSES:
        framing.append(f"Content-Length: {len(body)}")
    head = response_head(request.version, response.status, response.reason, headers, framing)
    return head if request.method == "HEAD" or response.status in NO_BODY_STATUSES else head + body


# --------------------------------------------------------------------------- the lean protocol

HEAD, BUSY, IDLE = "head", "busy", "idle"


class ProxyProtocol(asyncio.Protocol):
    """One client connection on the lean path: parse with llhttp, proxy, write the answer.

    Requests are parsed as bytes arrive and answered in order (pipelining), one at a time. The
    first request that aiohttp must serve hands the connection over: once the requests before it
    are answered, aiohttp's handler takes the transport and the bytes from that request's first
    byte on. To know where that is, the bytes since the last point the parser was between requests
    are kept (``_raw``); past ``TRACK_LIMIT`` (a large request body, or a pipelining client whose
    reads never end between requests) they are dropped until a read ends between requests again,
    and a request for aiohttp in that stretch closes the connection after the answers before it
    instead (a pipelining client resends unanswered requests on a new connection).
    """

    def __init__(self, server: GuardedServer) -> None:
        self.server = server
        self.front = server.front
        self.guard = server.front.guard
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.state = HEAD
        self.deadline = 0.0
        self._loop = asyncio.get_running_loop()
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._parsing: ProxyRequest | None = None  # the request whose body is being parsed
        self._in_message = False
        self._queue: deque[ProxyRequest | bytes] = deque()  # requests to answer, or a final error to write
        self._task: asyncio.Task[None] | None = None
        self._raw: bytearray | None = bytearray()
        self._begun = 0  # requests begun within _raw
        self._handover_at: int | None = None  # offset in _raw of the request aiohttp takes
        self._closing = False  # answer what is queued, then close
        self._paused: set[str] = set()
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple | list) and peer else None
        self.deadline = self._loop.time() + self.guard.head_timeout
        self.server.proxies[self] = None
        self.guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.closed(self)
        self.server.proxies.pop(self, None)
        self.transport = None
        gone = exc or ConnectionResetError("client closed the connection")
        if self._parsing is not None:
            self._parsing.content.finish(gone)
        for item in self._queue:
            if isinstance(item, ProxyRequest):
                item.content.finish(gone)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("client closed the connection"))

    def eof_received(self) -> bool:
        self._closing = True  # half-closed: answer what was asked, then close
        if self._parsing is not None:  # nothing more can come: a body cut short fails its request
            self._parsing.content.finish(ConnectionResetError("client closed its side mid-body"))
            self._parsing = None
        if self._task is None:
            self._finish_connection()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.state is IDLE:  # first byte of the next request: its head has head_timeout to finish
            self.state = HEAD
            self.deadline = self._loop.time() + self.guard.head_timeout
        if self._raw is not None:
            self._raw += data
        parser = self._parser
        if parser is None:  # handing over or finished: aiohttp gets these bytes, or nobody
            if self._raw is not None and len(self._raw) > TRACK_LIMIT:
                self.pause("handover")
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._stopped(exc.__context__)
        except httptools.HttpParserUpgrade:
            self._stopped(HandOver())  # on_headers_complete already queued the hand-over
        except httptools.HttpParserError as exc:
            self._stopped(exc)
        if not self._in_message and self._parser is not None:
            if self._raw is None:
                self._raw = bytearray()  # between requests at the end of a read: a fresh boundary
            else:
                self._raw.clear()
            self._begun = 0
        elif self._raw is not None and len(self._raw) > TRACK_LIMIT:
            self._raw = None  # a large body, or reads that keep ending mid-request: wait for the next boundary

    # parser callbacks

    def on_message_begin(self) -> None:
        self._in_message = True
        self._begun += 1
        self._url = b""
        self._headers = []
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        path = lean_path(self._url)
        if path is None or path in self.front.own_paths or parser.should_upgrade():
            raise HandOver
        headers = CIMultiDict((k.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for k, v in self._headers)
        expect = headers.get("Expect")
        if expect is not None and expect.lower() != "100-continue":
            raise HandOver  # aiohttp answers 417 as before
        request = ProxyRequest(
            parser.get_method().decode("ascii"),
            self._url.decode("utf-8", "surrogateescape"),
            headers,
            self.remote,
            parser.get_http_version(),
            parser.should_keep_alive(),
        )
        if request.body_exists:
            request.content = RequestBody(self)
            request.expect_continue = expect is not None and request.version == "1.1"
            self._parsing = request
        self.state = BUSY
        self._enqueue(request)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.content.feed(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        if self._parsing is not None:
            self._parsing.content.finish()
            self._parsing = None

    # flow

    def _stopped(self, cause: BaseException | None) -> None:
        """The parser stopped: hand over, or queue the error that ends the connection."""
        self._parser = None
        if self._parsing is not None:
            self._parsing.content.finish(ConnectionResetError("malformed request body"))
            self._parsing = None
        if isinstance(cause, HandOver):
            if self._raw is None:
                log.info("closing a connection that pipelined a request for aiohttp behind a large body")
                self._enqueue(b"")
                return
            self._handover_at = message_offset(bytes(self._raw), self._begun - 1)
            self._enqueue(b"")
            return
        if isinstance(cause, HeadTooLarge):
            error = 431, "request_header_fields_too_large", f"the request head is over {MAX_HEAD_BYTES} bytes"
        else:
            error = 400, "bad_request", f"malformed request: {cause}"
        self._enqueue(self._error_bytes(*error))

    def _error_bytes(self, status: int, code: str, message: str) -> bytes:
        response = web.json_response({"error": code, "message": message}, status=status)
        request = ProxyRequest("GET", "/", CIMultiDict(), None, "1.1", False)
        return web_response_bytes(response, request, ["Connection: close"])

    def _enqueue(self, item: ProxyRequest | bytes) -> None:
        self._queue.append(item)
        if len(self._queue) > MAX_PIPELINED:
            self.pause("queue")
        if self._task is None:
            self._task = self._loop.create_task(self._serve_queue())

    async def _serve_queue(self) -> None:
        queue = self._queue
        try:
            while queue and self.transport is not None:
                item = queue[0]
                if isinstance(item, bytes):  # the end: an error to write, or the hand-over
                    queue.clear()
                    if item:
                        self.transport.write(item)
                    self._closing = True
                    break
                self.state = BUSY
                await self._answer(item)
                if not queue or queue[0] is not item:  # force_close() emptied the queue while it was answered
                    break
                queue.popleft()
                if self._write_paused and not await self._writable():  # the client reads slower than
                    break  # it pipelines: answer no more (the queue then pauses reading) until it catches up
                if len(queue) <= MAX_PIPELINED // 2:
                    self.resume("queue")
                if not item.keep_alive or item.content.error is not None:
                    self._closing = True
                    break
        except Exception:  # a bug: never leave the client waiting
            log.exception("unexpected error answering a client")
            self._closing = True
        finally:
            self._task = None
            if self.state is BUSY:
                self.state = IDLE
                self.deadline = self._loop.time() + self.guard.keepalive_timeout
            self._finish_connection()

    def _finish_connection(self) -> None:
        transport = self.transport
        if transport is None or self._queue and not self._closing:
            return
        if self._handover_at is not None:
            self._hand_over(transport, self._handover_at)
        elif self._closing:
            self._queue.clear()
            transport.close()

    def _hand_over(self, transport: asyncio.Transport, offset: int) -> None:
        assert self._raw is not None
        data = bytes(self._raw[offset:])
        self._raw = None
        self._handover_at = None
        self.guard.closed(self)
        self.server.proxies.pop(self, None)
        self.transport = None
        handler = self.server.aiohttp_handler()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)
        if self._paused:
            self._paused.clear()
            transport.resume_reading()

    async def _answer(self, request: ProxyRequest) -> None:
        transport = self.transport
        assert transport is not None
        if request.expect_continue:
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        reply = await self.front.serve(request)
        if self.transport is None:  # the client left while the backend answered
            if not isinstance(reply, web.Response):
                reply.abandoned()
            return
        if request.content.error is not None:  # the body failed: nothing more is read from this client
            malformed = self._queue[-1]  # when the parser refused the body, its 400 is queued last
            if isinstance(malformed, bytes) and malformed:
                if not isinstance(reply, web.Response):
                    reply.abandoned()
                request.keep_alive = False
                transport.write(malformed)  # the answer to this request, in place of the proxy's
                return
        close = self._closing or not request.keep_alive or not request.content.complete
        framing = ["Connection: close"] if close else []
        if request.keep_alive and not close and request.version == "1.0":
            framing.append("Connection: keep-alive")
        if close:
            request.keep_alive = False
        if isinstance(reply, web.Response):
            transport.write(web_response_bytes(reply, request, framing))
            return
        await self._relay(transport, request, reply, framing)

    async def _relay(
        self, transport: asyncio.Transport, request: ProxyRequest, reply: Relayed, framing: list[str]
    ) -> None:
        status = reply.status
        if request.method == "HEAD" or status in NO_BODY_STATUSES:
            if request.method == "HEAD" and reply.content_length is not None and status not in NO_BODY_STATUSES:
                framing.append(f"Content-Length: {reply.content_length}")
            transport.write(response_head(request.version, status, reply.reason, reply.headers.items(), framing))
            reply.finished()
            return
        body = reply.body
        if body is not None:
            framing.append(f"Content-Length: {len(body)}")
            transport.write(response_head(request.version, status, reply.reason, reply.headers.items(), framing) + body)
            return
        chunked = False
        if reply.content_length is not None:
            framing.append(f"Content-Length: {reply.content_length}")
        elif request.version == "1.1":
            framing.append("Transfer-Encoding: chunked")
            chunked = True
        elif request.keep_alive:  # HTTP/1.0 without a length: the body ends when the connection does
            framing = ["Connection: close"]
            request.keep_alive = False
        transport.write(response_head(request.version, status, reply.reason, reply.headers.items(), framing))
        await self._pump(transport, request, reply, chunked)

    async def _pump(self, transport: asyncio.Transport, request: ProxyRequest, reply: Relayed, chunked: bool) -> None:
        try:
            async for piece in reply.pieces():
                if self.transport is None:
                    raise ConnectionResetError("client closed the connection")
                transport.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                if self._write_paused and not await self._writable():
                    raise ConnectionResetError("client closed the connection")
        except ConnectionError:
            log.info("client went away while a response was streamed to it")
            reply.abandoned()
            request.keep_alive = False
            return
        except Exception as exc:  # the backend failed mid-body: cut the client off so it cannot look complete
            reply.failed(exc)
            request.keep_alive = False
            transport.abort()
            return
        if chunked:
            transport.write(b"0\r\n\r\n")
        reply.finished()

    # flow control and shutdown

    async def _writable(self) -> bool:
        """Wait for the transport to drop below its write high-water mark; False if the client left."""
        self._drain = self._loop.create_future()
        try:
            await self._drain
        except ConnectionError:
            return False
        finally:
            self._drain = None
        return True

    def pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None:
                self.transport.resume_reading()

    def close(self) -> None:
        """Graceful shutdown: answer what is in progress, then close; close now if idle."""
        self._closing = True
        if self._task is None and not self._in_message:
            self._handover_at = None
            self._finish_connection()

    async def wait_idle(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    def force_close(self) -> None:
        self._queue.clear()
        self._handover_at = None
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- connection limits


class Guarded(Protocol):
    """A client connection as the guard sees it: its state, its deadline, a way to close it."""

    state: str
    deadline: float

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...
    def force_close(self) -> None: ...


class ConnectionGuard:
    """Caps client connections and times out slow request heads and idle keep-alive connections.

    HAProxy's model: ``maxconn``, ``timeout http-request`` (the whole head must arrive within
    ``request_head_timeout`` of its first byte) and ``timeout http-keep-alive``. At the cap, a
    new connection takes the place of the oldest one still waiting for a request head (a
    slowloris client holds exactly such connections), so trickling clients cannot lock out a
    normal one; only when every connection is busy with a request is the new one closed.
    Deadlines are checked by one sweep a few times per timeout (at most every second) rather
    than a timer per request, which would cost every proxied request a timer to set and cancel.
    """

    def __init__(self, max_connections: int, head_timeout: float, keepalive_timeout: float,
                 send_timeout: float = 60.0) -> None:
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.send_timeout = send_timeout
        self.sweep_seconds = max(0.05, min(1.0, head_timeout / 4, keepalive_timeout / 4, send_timeout / 4))
        self.open: dict[Guarded, None] = {}  # insertion order: oldest first
        self._unsent: dict[Guarded, tuple[int, float]] = {}  # write buffer size last seen, and since when
        self.refused = 0
        self.evicted = 0
        self.head_timeouts = 0
        self.idle_timeouts = 0
        self.send_timeouts = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def opened(self, conn: Guarded) -> None:
        if len(self.open) >= self.max_connections:
            victim = next((h for h in self.open if h.state != BUSY), None)
            if victim is None:
                self.refused += 1
                conn.force_close()
                return
            self.evicted += 1
            self.open.pop(victim, None)
            victim.force_close()
        self.open[conn] = None
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.sweep_seconds, self._sweep)

    def closed(self, conn: Guarded) -> None:
        self.open.pop(conn, None)
        self._unsent.pop(conn, None)

    def _sweep(self) -> None:
        """Close connections past their deadline; runs while any connection is open."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [h for h in self.open if h.state != BUSY and now >= h.deadline]:
            transport = conn.transport
            if (
                conn.state == IDLE
                and isinstance(transport, asyncio.WriteTransport)
                and transport.get_write_buffer_size()
            ):
                conn.deadline = now + self.keepalive_timeout  # the last response is still being written
                continue
            if conn.state == HEAD:
                self.head_timeouts += 1
                log.info("closing a client connection whose request head did not arrive in time")
            else:
                self.idle_timeouts += 1
            self.open.pop(conn, None)
            conn.force_close()
        self._sweep_writes(now)
        if self.open:
            self._sweeper = loop.call_later(self.sweep_seconds, self._sweep)

    def _sweep_writes(self, now: float) -> None:
        """Close connections whose client has taken none of the bytes waiting for it for ``send_timeout``
        (nginx's ``send_timeout``): a client that never reads would otherwise hold its slot, busy and so
        never evicted, for ever. A write buffer that changed size between sweeps is progress."""
        unsent = self._unsent
        for conn in list(self.open):
            transport = conn.transport
            size = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
            if not size:
                if conn in unsent:
                    del unsent[conn]
                continue
            seen = unsent.get(conn)
            if seen is None or seen[0] != size:
                unsent[conn] = (size, now)
            elif now - seen[1] >= self.send_timeout:
                self.send_timeouts += 1
                log.info("closing a client connection that read nothing for %.0f s", self.send_timeout)
                self.open.pop(conn, None)
                del unsent[conn]
                conn.force_close()
                if isinstance(transport, asyncio.WriteTransport):  # close() waits for the buffer to drain: never
                    transport.abort()

    def stats(self) -> dict[str, int]:
        return {
            "open": len(self.open),
            "max": self.max_connections,
            "refused": self.refused,
            "evicted": self.evicted,
            "head_timeouts": self.head_timeouts,
            "idle_timeouts": self.idle_timeouts,
            "send_timeouts": self.send_timeouts,
        }


class GuardedHandler(RequestHandler):
    """aiohttp's connection handler with a state and a deadline for the guard: ``head`` (a
    request head is arriving), ``busy`` (a request is being served), ``idle`` (keep-alive)."""

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self.state = HEAD
        self.deadline = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.deadline = self._loop.time() + self.guard.head_timeout
        self.guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.state is IDLE:  # first byte of the next request: its head has head_timeout to finish
            self.state = HEAD
            self.deadline = self._loop.time() + self.guard.head_timeout
        super().data_received(data)

    def request_started(self) -> None:
        self.state = BUSY

    def request_finished(self) -> None:
        if self.state is BUSY:
            self.state = IDLE
            self.deadline = self._loop.time() + self.guard.keepalive_timeout


class GuardedServer(web.Server):
    """aiohttp's low-level server for the app; new connections start on the lean ``ProxyProtocol``."""

    def __init__(self, base: web.Server, front: FrontEnd) -> None:  # noqa: D107
        self.__dict__.update(vars(base))  # adopt the server aiohttp built for the app, every setting kept
        self.front = front
        self.proxies: dict[ProxyProtocol, None] = {}

    def __call__(self) -> ProxyProtocol:  # type: ignore[override]
        return ProxyProtocol(self)

    def aiohttp_handler(self) -> GuardedHandler:
        return GuardedHandler(self, loop=self._loop, guard=self.front.guard, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for conn in list(self.proxies):
            conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        busy = [conn.wait_idle() for conn in self.proxies]
        if busy:
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.gather(*busy, return_exceptions=True)
            except TimeoutError:
                log.warning("shutdown: %d client connections still busy after %ss; closing them", len(busy), timeout)
        for conn in list(self.proxies):
            conn.force_close()
        await super().shutdown(timeout)


class GuardedRunner(web.AppRunner):
    """``AppRunner`` serving the app through ``GuardedServer`` (needs ``app[FRONT_END]``)."""

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.app[FRONT_END])
