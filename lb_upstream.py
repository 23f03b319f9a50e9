"""The balancer's HTTP/1.1 client to its backends: keep-alive connections, response parsing, pool.

A hand-written client instead of aiohttp's: profiling showed the generic client to be most of
the proxy's CPU time per request, and the balancer needs only plain HTTP/1.1. It is held to a
reference by tests/test_lb_differential.py (h11, random response sequences on reused connections).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Protocol

log = logging.getLogger(__name__)

STREAM_HIGH_WATER = 1024 * 1024  # pause reading a backend when this much body waits for a slow client
MAX_HEAD_BYTES = 64 * 1024
FRAMING_HEADERS = frozenset({"connection", "content-length", "transfer-encoding"})


class Endpoint(Protocol):
    """What the pool needs to know of a backend (``load_balancer.Backend`` is one)."""

    url: str
    host: str
    port: int
    tls: bool
    netloc: str


class UpstreamError(Exception):
    """The backend connection failed; ``sent`` is False only when it was never established."""

    def __init__(self, message: str, sent: bool = True, stale: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.stale = stale  # a reused keep-alive connection closed before any byte of the answer


class BodyPieces:
    """A body handed, piece by piece as a protocol reads it, to the one task that relays it; with flow
    control: past ``high_water`` queued bytes the source's reading is paused, at half it resumes.
    Backend responses (``UpstreamResponse``) and client request bodies (lb_server) both use it."""

    __slots__ = ("_pause", "_resume", "_high_water", "_pieces", "_queued", "_waiter", "complete", "error")

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None], high_water: int) -> None:
        self._pause, self._resume, self._high_water = pause, resume, high_water
        self._pieces: deque[bytes] = deque()
        self._queued = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> None:
        self._pieces.append(data)
        self._queued += len(data)
        if self._queued > self._high_water:
            self._pause()
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        """The body ended (``error``: cut short); the first call decides."""
        if not self.complete:
            self.complete, self.error = True, error
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def cut_short(self, error: BaseException) -> Exception:
        """What the reader raises when the body ended with ``error``."""
        return UpstreamError(f"body cut short: {error}")

    async def pieces(self, timeout: float | None = None) -> AsyncIterator[bytes]:
        """Pieces as they arrive (each what one read delivered); ``cut_short`` if the body ended early,
        UpstreamError if ``timeout`` seconds pass without a piece."""
        while True:
            if self._pieces:
                data = self._pieces.popleft()
                self._queued -= len(data)
                if self._queued <= self._high_water // 2:
                    self._resume()
                yield data
            elif self.complete:
                if self.error is not None:
                    raise self.cut_short(self.error)
                return
            else:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    async with asyncio.timeout(timeout):
                        await self._waiter
                except TimeoutError:
                    raise UpstreamError(f"no body data for {timeout}s") from None
                finally:
                    self._waiter = None


class UpstreamResponse(BodyPieces):
    """Status, headers and either the whole (small) body or a stream of body pieces."""

    __slots__ = ("conn", "status", "reason", "headers", "content_length", "connection", "body")

    def __init__(self, conn: UpstreamConnection, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        super().__init__(conn.pause_reading, conn.resume_reading, STREAM_HIGH_WATER)
        self.conn = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length: int | None = None
        self.connection: str | None = None
        self.body: bytes | None = None

    def chunks(self, read_timeout: float) -> AsyncIterator[bytes]:
        """Yield body pieces as they arrive; raise UpstreamError if the body is cut short or stalls."""
        return self.pieces(read_timeout)


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a backend, parsing responses as bytes arrive.

    A hand-written client instead of aiohttp's: profiling showed the generic client to be
    most of the proxy's CPU time per request, and the balancer needs only plain HTTP/1.1.
    """

    def __init__(self, buffer_limit: int) -> None:
        self.buffer_limit = buffer_limit
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._buf = bytearray()
        self.exchanges = 0  # requests started on this connection; more than one means it was reused
        self._done = True  # no request in flight: any byte the backend sends now is unsolicited
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._reset_exchange(head_request=False, waiter=None)

    def _reset_exchange(self, head_request: bool, waiter: asyncio.Future[UpstreamResponse] | None) -> None:
        """Every piece of per-response parser state, in one place, so no exchange inherits another's.

        The chunked decoder used to keep ``_remaining`` from the previous response on a reused
        connection (issue 16); any new field of the parser belongs here.
        """
        self._head_request = head_request
        self._head_waiter = waiter
        self._response: UpstreamResponse | None = None
        self._framing = ""
        self._remaining = 0
        self._keep_alive = False
        self._received = False  # any byte of this exchange's response seen yet

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._done:  # no request in flight: never let these bytes become the next client's response
            log.debug("closing a backend connection that sent %d unsolicited bytes", len(data))
            self._buf.clear()
            self.close()
            return
        self._received = True
        self._buf += data
        try:
            self._process()
        except (ValueError, IndexError) as exc:
            self._fail(UpstreamError(f"malformed response from backend: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._framing == "close" and self._response is not None and not self._done and exc is None:
            self._finish_body()  # a clean EOF ends a close-delimited body; a reset does not
        # A reused connection that the backend closed before any byte of the answer is the
        # keep-alive race (the backend's idle timeout fired as the request left): stale, not failed.
        stale = self.exchanges > 1 and not self._received
        self._fail(UpstreamError(f"connection closed by backend ({exc or 'EOF'})", stale=stale))
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_exception(UpstreamError("connection lost while sending"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # used by the proxy

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def idle_clean(self) -> bool:
        """Open, nothing in flight and nothing buffered: safe to carry a new request."""
        return self._done and not self._buf and self.usable

    def start(self, head: bytes, head_request: bool) -> None:
        """Send the request head and get ready to parse the response."""
        if not self.idle_clean:
            self.close()
            raise UpstreamError("backend connection is not clean to reuse", sent=False)
        self._reset_exchange(head_request, asyncio.get_running_loop().create_future())
        self._done = False
        self.exchanges += 1
        assert self.transport is not None  # idle_clean: open
        self.transport.write(head)

    async def send_body(self, chunks: AsyncIterator[bytes], chunked: bool) -> None:
        async for chunk in chunks:
            if not self.usable:
                raise UpstreamError("backend closed the connection while the body was sent")
            if chunk:
                self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)  # type: ignore[union-attr]
            if self._write_paused:
                self._drain_waiter = asyncio.get_running_loop().create_future()
                await self._drain_waiter
        if chunked and self.usable:
            self.transport.write(b"0\r\n\r\n")  # type: ignore[union-attr]

    async def response(self, read_timeout: float) -> UpstreamResponse:
        """Wait for the response head (and a small body); a plain timer is cheaper than asyncio.timeout."""
        waiter = self._head_waiter
        assert waiter is not None
        if waiter.done():
            return waiter.result()
        timer = asyncio.get_running_loop().call_later(read_timeout, self._time_out, read_timeout)
        try:
            return await waiter
        finally:
            timer.cancel()

    def _time_out(self, seconds: float) -> None:
        self._fail(UpstreamError(f"no response within {seconds}s"))
        self.close()

    @property
    def reusable(self) -> bool:
        return self._done and self._keep_alive and not self._buf and self.usable

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()  # abandoned mid-request: nobody will await the response any more
        if self.transport is not None:
            self.transport.close()

    # parsing

    def _process(self) -> None:
        if self._response is None and not self._parse_head():
            return
        if self._done:
            return
        if self._framing == "length-buffered":
            self._take_buffered()
        elif self._framing == "length":
            self._take_length()
        elif self._framing == "chunked":
            self._take_chunks()
        elif self._framing == "close" and self._buf:
            self._stream(bytes(self._buf))
            self._buf.clear()

    def _parse_head(self) -> bool:
        """Parse a status line and headers (skipping 1xx); return True once a response has started."""
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise ValueError("response head too large")
                return False
            head = bytes(self._buf[:end])
            del self._buf[: end + 4]
            if b"\x00" in head:  # RFC 9110 5.5: reject, never relay (a client's parser may cut the line there)
                raise ValueError("NUL in the response head")
            lines = head.decode("utf-8", "replace").split("\r\n")
            if any("\n" in line or "\r" in line for line in lines):  # never relayed: it would split the client's head
                raise ValueError("bare CR or LF in the response head")
            version, _, rest = lines[0].partition(" ")
            code, _, reason = rest.partition(" ")
            if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not (code.isascii() and code.isdigit()):
                raise ValueError(f"bad status line {lines[0][:40]!r}")
            status = int(code)
            if status < 100:
                raise ValueError(f"bad status code {status}")
            if status < 200:
                continue  # interim (1xx): the final response follows on the same connection
            headers = []
            fields: dict[str, str] = {}  # the few framing headers, lower-cased, read in the same pass
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise ValueError(f"bad header line {line[:40]!r}")
                value = value.strip()
                headers.append((name, value))
                lower = name.lower()
                if lower in FRAMING_HEADERS:
                    fields[lower] = f"{fields[lower]}, {value}" if lower in fields else value
            self._begin(UpstreamResponse(self, status, reason, headers), version, fields)
            return True

    def _begin(self, response: UpstreamResponse, version: str, fields: dict[str, str]) -> None:
        """Decide how the body is framed and whether to hand over the head now or with the body."""
        self._response = response
        response.connection = fields.get("connection")
        connection = fields.get("connection", "").lower()
        self._keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
        length = fields.get("content-length")
        if length is not None:
            if "," in length:  # repeated Content-Length: tolerable only if every value agrees, never kept alive
                values = {v.strip() for v in length.split(",")}
                if len(values) != 1:
                    raise ValueError(f"conflicting Content-Length values {length!r}")
                length = values.pop()
                self._keep_alive = False
            if not (length.isascii() and length.isdigit()):
                raise ValueError(f"invalid Content-Length {length!r}")
            response.content_length = int(length)
        te = fields.get("transfer-encoding")
        if te is not None:  # it overrides Content-Length; having both smells of smuggling, so do not reuse
            response.content_length = None
            if length is not None:
                self._keep_alive = False
        if self._head_request or response.status in (204, 304):
            self._framing = "none"
        elif te is not None:
            if te.rsplit(",", 1)[-1].strip().lower() == "chunked":
                self._framing = "chunked"
            else:  # a final coding other than chunked: the body runs until the backend closes
                self._framing = "close"
                self._keep_alive = False
        elif length is not None:
            self._framing = "length"
            self._remaining = int(length)
        else:
            self._framing = "close"
            self._keep_alive = False
        if self._framing == "none":
            response.body = b""
            self._finish_body()
        elif self._framing == "length" and self._remaining <= self.buffer_limit:
            self._framing = "length-buffered"
            self._take_buffered()
        else:
            self._deliver_head()

    def _take_buffered(self) -> None:
        if len(self._buf) >= self._remaining:
            assert self._response is not None
            self._response.body = bytes(self._buf[: self._remaining])
            del self._buf[: self._remaining]
            self._finish_body()

    def _take_length(self) -> None:
        if self._buf:
            piece = bytes(self._buf[: self._remaining])
            del self._buf[: len(piece)]
            self._remaining -= len(piece)
            self._stream(piece)
        if self._remaining == 0:
            self._finish_body()

    def _take_chunks(self) -> None:
        """Decode ``Transfer-Encoding: chunked`` as far as the buffer allows."""
        while not self._done:
            if self._remaining > 0:
                if not self._buf:
                    return
                piece = bytes(self._buf[: self._remaining])
                del self._buf[: len(piece)]
                self._remaining -= len(piece)
                self._stream(piece)
                if self._remaining:
                    return
                self._remaining = -2  # expect the CRLF after the data
            line_end = self._buf.find(b"\r\n")
            if line_end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise ValueError("chunk-size or trailer line too long")
                return
            line = bytes(self._buf[:line_end])
            del self._buf[: line_end + 2]
            if self._remaining == -2:
                self._remaining = 0
                if line:
                    raise ValueError("missing CRLF after chunk data")
            elif self._remaining == -1:  # trailer section: ends with an empty line
                if not line:
                    self._finish_body()
            else:
                size = chunk_size(line)
                self._remaining = size if size else -1

    def _stream(self, piece: bytes) -> None:
        if piece and self._response is not None:
            self._response.feed(piece)

    def _deliver_head(self) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(self._response)  # type: ignore[arg-type]

    def _finish_body(self) -> None:
        self._done = True
        self._deliver_head()
        if self._response is not None:
            self._response.finish()

    def _fail(self, error: UpstreamError) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(error)
        elif self._response is not None and not self._done:
            self._response.finish(error)


HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


def chunk_size(line: bytes) -> int:
    """The size of a chunk-size line (extensions ignored); strict, unlike ``int(x, 16)``,
    which would take ``0x1f``, ``+1f``, ``-1`` or ``1_f``."""
    digits = line.split(b";", 1)[0].rstrip(b" \t")
    if not digits or len(digits) > 16 or not HEX_DIGITS.issuperset(digits):
        raise ValueError(f"bad chunk size line {line[:40]!r}")
    return int(digits, 16)


class UpstreamPool:
    """Idle keep-alive connections per backend, reused most-recent first."""

    def __init__(
        self, connect_timeout: float, buffer_limit: int, max_idle: int = 256, idle_seconds: float = 30.0
    ) -> None:
        self.connect_timeout = connect_timeout
        self.buffer_limit = buffer_limit
        self.max_idle = max_idle
        self.idle_seconds = idle_seconds
        self._idle: dict[str, list[UpstreamConnection]] = {}

    async def acquire(self, backend: Endpoint, fresh: bool = False) -> UpstreamConnection:
        """An idle connection to ``backend`` (unless ``fresh``) or a new one; a failed connect raises ``sent=False``."""
        idle = self._idle.get(backend.url)
        loop = asyncio.get_running_loop()
        while idle and not fresh:
            conn = idle.pop()
            if conn.idle_clean and loop.time() - conn.idle_since < self.idle_seconds:
                return conn
            conn.close()
        tls = ssl.create_default_context() if backend.tls else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self.buffer_limit), backend.host, backend.port, ssl=tls
                )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(
                f"cannot connect to {backend.netloc}: {exc or type(exc).__name__}", sent=False
            ) from None
        return conn

    def release(self, backend: Endpoint, conn: UpstreamConnection) -> None:
        idle = self._idle.setdefault(backend.url, [])
        if conn.reusable and len(idle) < self.max_idle:
            conn.idle_since = asyncio.get_running_loop().time()
            idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
