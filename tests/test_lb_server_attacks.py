"""Attacks on the balancer's lean client side (lb_server.py) with raw sockets, a real balancer and a real backend.

The backend records every byte it receives on every connection, so a test can check that what
reached it is exactly the requests the balancer accepted, each framed once.
"""

from __future__ import annotations

import asyncio
import json
import socket

import h11
from test_lb_server import open_client, read_responses, wait_until
from test_load_balancer import Harness, async_test, make_config, raw_backend, raw_exchange, read_head, running_lb

from lb_server import TRACK_LIMIT, ProxyProtocol


class RawRecorder:
    """A keep-alive backend that parses requests with h11 (strict) and keeps the raw bytes of each connection."""

    def __init__(self, body: bytes = b"ok") -> None:
        self.raw: list[bytearray] = []
        self.requests: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self.errors: list[str] = []
        self.body = body

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.raw.append(raw)
        conn = h11.Connection(h11.SERVER)
        current: list[object] = []
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    raw += data
                    conn.receive_data(data)
                    if not data:
                        return
                elif isinstance(event, h11.Request):
                    current = [event.method, event.target, list(event.headers), bytearray()]
                elif isinstance(event, h11.Data):
                    current[3] += event.data  # type: ignore[operator]
                elif isinstance(event, h11.EndOfMessage):
                    method, target, headers, body = current
                    self.requests.append((method, target, headers, bytes(body)))  # type: ignore[arg-type]
                    head = h11.Response(status_code=200, headers=[("Content-Length", str(len(self.body)))])
                    writer.write(conn.send(head) + conn.send(h11.Data(data=self.body)) + conn.send(h11.EndOfMessage()))
                    await writer.drain()
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return
        except h11.ProtocolError as exc:
            self.errors.append(str(exc))
        except (ConnectionError, asyncio.CancelledError):  # the client or the test's server went away
            pass
        finally:
            writer.close()


def lean_connections(h: Harness) -> list[ProxyProtocol]:
    return [conn for conn in h.lb.guard.open if isinstance(conn, ProxyProtocol)]


# --------------------------------------------------------------------------- own routes


@async_test
async def test_own_route_with_a_fragment_is_served_by_the_balancer_not_proxied() -> None:
    """aiohttp strips a ``#fragment`` before routing, so ``/stats#x`` is the balancer's /stats; the
    lean path compared the raw path and sent it (fragment and all) to the backend instead."""
    backend = RawRecorder()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(b"GET /stats#x HTTP/1.1\r\nHost: lb\r\n\r\n")
        [(status, _, body)] = await read_responses(reader, 1)
        writer.write(b"POST /change_strategy#x HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\n\r\n")
        [(status2, _, _)] = await read_responses(reader, 1)
        writer.close()
    assert status == 200 and json.loads(body)["strategy"] == "round_robin"
    assert status2 == 415  # the admin route (loopback caller) looked at it, not a backend
    assert backend.requests == []


# --------------------------------------------------------------------------- resources


@async_test
async def test_client_that_never_reads_cannot_make_the_balancer_buffer_every_pipelined_answer() -> None:
    """Answers that fit in one write (buffered bodies, error and cached replies) were written without
    looking at the transport's high-water mark, and the pipeline queue drained as fast as the backend
    answered: 12 KB of pipelined GETs for 512 KB answers made the balancer hold 200 MB for a client
    that reads nothing (here 120 GETs for 256 KB answers: about 30 MB)."""
    size = 256 * 1024
    backend = RawRecorder(body=b"x" * size)
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(b"GET /big HTTP/1.1\r\nHost: lb\r\n\r\n" * 120)
        await writer.drain()
        [conn] = lean_connections(h)
        assert conn.transport is not None
        peak = 0
        for _ in range(20):  # a second: unbounded, it held all 30 MB by then
            await asyncio.sleep(0.05)
            peak = max(peak, conn.transport.get_write_buffer_size())
        assert peak < 4 * 1024 * 1024, f"{peak} bytes buffered for a client that reads nothing"
        assert len(backend.requests) < 60
        # once the client reads, every answer arrives, in order, intact
        answers = await read_responses(reader, 120)
        writer.close()
    assert all(status == 200 and len(body) == size for status, _, body in answers)
    assert len(backend.requests) == 120


@async_test
async def test_client_that_reads_nothing_is_closed_after_send_timeout_and_frees_its_slot() -> None:
    """A busy connection is never evicted at the cap, so a client that asks for a large answer and
    never reads it held its slot for ever: 1000 of them locked everyone out. After ``send_timeout``
    with none of its bytes taken, the connection is aborted (nginx's send_timeout)."""
    backend = RawRecorder(body=b"x" * (8 * 1024 * 1024))
    config = {"checks": False, "send_timeout": 0.5, "max_connections": 2}
    async with raw_backend(backend) as url, running_lb(make_config([url], **config)) as h:
        stalled = []
        for _ in range(2):  # every slot held by a client that reads nothing
            reader, writer = await open_client(h.url)
            writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            writer.write(b"GET /big HTTP/1.1\r\nHost: lb\r\n\r\n")
            stalled.append((reader, writer))
        await wait_until(lambda: len(backend.requests) == 2)
        await wait_until(lambda: h.lb.guard.send_timeouts == 2)
        assert not h.lb.guard.open
        for _, writer in stalled:
            writer.close()
        reader, writer = await open_client(h.url)  # a slot is free again
        writer.write(b"GET /stats HTTP/1.1\r\nHost: lb\r\n\r\n")
        [(status, _, body)] = await read_responses(reader, 1)
        writer.close()
    assert status == 200 and json.loads(body)["connections"]["send_timeouts"] == 2


@async_test
async def test_a_slow_reader_that_keeps_reading_is_not_cut_off() -> None:
    """Progress resets the send timeout: a client taking a large answer in small steady reads gets all of it,
    though the balancer's write buffer never empties in between."""
    size = 12 * 1024 * 1024
    backend = RawRecorder(body=b"y" * size)
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False, send_timeout=1.0)) as h:
        reader, writer = await open_client(h.url)
        writer.write(b"GET /big HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        await wait_until(lambda: any(c.transport is not None and c.transport.get_write_buffer_size()
                                     for c in lean_connections(h)))
        received = bytearray()
        while chunk := await reader.read(64 * 1024):
            received += chunk
            await asyncio.sleep(0.002)  # a slow client: at most ~30 MB/s, each read well inside the timeout
        writer.close()
        assert h.lb.guard.send_timeouts == 0
    assert len(received) > size and received.endswith(b"y" * size)


# --------------------------------------------------------------------------- request bodies


@async_test
async def test_malformed_chunked_body_is_answered_400_and_closes_not_499() -> None:
    """The parser's 400 for a malformed chunk was queued behind the request, which the proxy then
    answered itself (499 "client closed request", without Connection: close) before the connection
    was closed; the client sent a bad body and must be told so."""
    backend = RawRecorder()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(b"POST /u HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await wait_until(lambda: bool(backend.raw) and b"hello" in backend.raw[0])
        writer.write(b"5\r\nworldXX0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: lb\r\n\r\n")
        [(status, headers, body)] = await read_responses(reader, 1)
        assert await reader.read() == b""
        writer.close()
        await wait_until(lambda: not h.lb.upstream._idle.get(url) and h.backend(url).active == 0)
    assert status == 400 and headers[b"connection"] == b"close"
    assert json.loads(body)["error"] == "bad_request"
    assert backend.requests == []  # the cut-off upload never looked complete to the backend


@async_test
async def test_bytes_kept_for_a_hand_over_stay_bounded_when_reads_never_end_between_requests() -> None:
    """The raw bytes kept to find a hand-over offset were dropped past TRACK_LIMIT only inside a
    large body: a keep-alive client whose reads always end mid-request (pipelining, or writes that
    straddle requests) made the balancer keep every byte of the connection, and a later hand-over
    bisected all of them with llhttp on the event loop."""
    backend = RawRecorder()
    request = b"GET /x HTTP/1.1\r\nHost: lb\r\n\r\n"
    count = 8000  # 248 KB in all
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)

        async def read_all() -> None:
            seen = 0
            while seen < count:
                seen += (await reader.read(1 << 16)).count(b"HTTP/1.1 200")

        answers = asyncio.create_task(read_all())
        stream = request * count
        writer.write(stream[:5])  # every later write ends five bytes into a request
        [conn] = lean_connections(h)
        peak = 0
        for start in range(5, len(stream) - len(request), len(request)):
            writer.write(stream[start : start + len(request)])
            await writer.drain()
            await asyncio.sleep(0.0002)
            peak = max(peak, len(conn._raw or b""))
        writer.write(stream[start + len(request) :])
        async with asyncio.timeout(10):
            await answers
        writer.write(b"GET /stats HTTP/1.1\r\nHost: lb\r\n\r\n")  # at a boundary again: handed over as usual
        [(status, _, body)] = await read_responses(reader, 1)
        writer.close()
    assert peak <= TRACK_LIMIT + 64 * 1024, f"{peak} raw bytes kept"
    assert status == 200 and json.loads(body)["strategy"] == "round_robin"
    assert len(backend.requests) == count


# --------------------------------------------------------------------------- responses


@async_test
async def test_backend_header_with_a_nul_is_never_relayed() -> None:
    """RFC 9110 (5.5): a field value with CR, LF or NUL must be rejected. Bare CR and LF already
    were (they would split the client's head); a NUL reached the client, whose parser may end the
    value (or the line) there."""

    async def nul_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Evil: a\x00Set-Cookie: s=1\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with raw_backend(nul_header) as url, running_lb(make_config([url], checks=False, retries=0)) as h:
        out = await raw_exchange(h.url, b"GET /x HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 502 ")
    assert b"\x00" not in out and b"X-Evil" not in out
