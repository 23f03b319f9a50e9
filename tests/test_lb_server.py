"""The balancer's client side (lb_server.py): the lean llhttp path and its hand-over to aiohttp.

Raw sockets on loopback drive a balancer running in-process (as in test_load_balancer.py), so the
bytes on the wire (pipelining, malformed heads, chunked bodies, a client leaving mid-response) are
exactly the ones a test means. Responses are read back with h11.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable

import h11
from test_load_balancer import (
    RecordingBackend,
    async_test,
    make_config,
    raw_backend,
    read_head,
    running_lb,
)

from lb_server import MAX_HEAD_BYTES, GuardedHandler, message_offset


async def read_responses(reader: asyncio.StreamReader, count: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """``count`` responses from one connection, in order: (status, headers, body)."""
    conn = h11.Connection(h11.CLIENT)
    answers: list[tuple[int, dict[bytes, bytes], bytes]] = []
    for _ in range(count):
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "lb")]))  # h11 pairs each response
        conn.send(h11.EndOfMessage())
        status, headers, body = 0, {}, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        answers.append((status, headers, bytes(body)))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return answers


async def open_client(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


def get(path: bytes) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: lb\r\n\r\n" % path


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition the balancer reaches on its own (bounded), never a fixed sleep."""
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- hand-over and pipelining


@async_test
async def test_own_route_after_a_proxied_request_is_served_by_aiohttp_on_the_same_connection() -> None:
    backend = RecordingBackend()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(get(b"/first"))
        [(status, _, body)] = await read_responses(reader, 1)
        assert (status, body) == (200, b"resp-for GET /first HTTP/1.1")
        writer.write(get(b"/stats"))
        [(status, headers, body)] = await read_responses(reader, 1)
        assert status == 200 and json.loads(body)["strategy"] == "round_robin"
        assert headers[b"content-type"].startswith(b"application/json")
        writer.write(get(b"/after"))  # aiohttp now holds the connection and still proxies
        [(status, _, body)] = await read_responses(reader, 1)
        assert (status, body) == (200, b"resp-for GET /after HTTP/1.1")
        assert any(isinstance(conn, GuardedHandler) for conn in h.lb.guard.open)
        writer.close()
    assert backend.request_lines == [b"GET /first HTTP/1.1", b"GET /after HTTP/1.1"]


@async_test
async def test_pipelined_requests_are_answered_in_order_across_a_hand_over() -> None:
    backend = RecordingBackend()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        body = b'{"strategy": "least_connections"}'
        change = (
            b"POST /change_strategy HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
        )
        writer.write(get(b"/a") + get(b"/b?x=1") + change + get(b"/c"))  # one write: one read for the balancer
        answers = await read_responses(reader, 4)
        writer.close()
    assert [status for status, _, _ in answers] == [200] * 4
    assert [answers[i][2] for i in (0, 1, 3)] == [
        b"resp-for GET /a HTTP/1.1",
        b"resp-for GET /b?x=1 HTTP/1.1",
        b"resp-for GET /c HTTP/1.1",
    ]
    assert json.loads(answers[2][2]) == {"strategy": "least_connections"}


def test_hand_over_offset_is_where_llhttp_starts_the_request() -> None:
    raw = get(b"/a") + b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz" + get(b"/stats")
    assert message_offset(raw, 0) == 0
    assert raw[message_offset(raw, 1) :].startswith(b"POST /p")
    assert raw[message_offset(raw, 2) :] == get(b"/stats")


# --------------------------------------------------------------------------- errors the lean path answers itself


@async_test
async def test_malformed_request_gets_a_400_json_naming_the_problem_and_the_connection_closes() -> None:
    backend = RecordingBackend()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(get(b"/ok") + b"GET /x HTTP/1.1\r\nHost: lb\r\nNo Colon Here\r\n\r\n")
        answers = await read_responses(reader, 2)
        assert await reader.read() == b""  # closed after the error
        writer.close()
    (first, _, _), (status, headers, body) = answers
    assert first == 200
    assert status == 400 and headers[b"connection"] == b"close"
    error = json.loads(body)
    assert error["error"] == "bad_request" and "header" in error["message"].lower()
    assert backend.request_lines == [b"GET /ok HTTP/1.1"]


@async_test
async def test_oversized_request_head_gets_a_431_and_never_reaches_a_backend() -> None:
    backend = RecordingBackend()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        filler = b"".join(b"X-Filler-%d: %b\r\n" % (i, b"v" * 1000) for i in range(MAX_HEAD_BYTES // 1000 + 2))
        writer.write(b"GET / HTTP/1.1\r\nHost: lb\r\n" + filler + b"\r\n")
        [(status, _, body)] = await read_responses(reader, 1)
        writer.close()
    assert status == 431 and json.loads(body)["error"] == "request_header_fields_too_large"
    assert backend.heads == []


# --------------------------------------------------------------------------- bodies


async def chunked_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A backend that reads any framing with h11 and answers the body's length and SHA-256."""
    conn = h11.Connection(h11.SERVER)
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                answer = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
                writer.write(conn.send(h11.Response(status_code=200, headers=[("Content-Length", str(len(answer)))])))
                writer.write(conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage()))
                await writer.drain()
                conn.start_next_cycle()
                body.clear()
    except (ConnectionError, h11.ProtocolError):
        pass
    finally:
        writer.close()


@async_test
async def test_chunked_request_body_is_proxied_intact() -> None:
    payload = bytes(range(256)) * 300  # 76 800 bytes in uneven chunks, sent in several writes
    pieces = [payload[i : i + 7001] for i in range(0, len(payload), 7001)]
    async with raw_backend(chunked_echo) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: lb\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x;ext=1\r\n%b\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\nX-Trailer: t\r\n\r\n")
        [(status, _, body)] = await read_responses(reader, 1)
        writer.close()
    assert (status, body) == (200, b"%d %s" % (len(payload), hashlib.sha256(payload).hexdigest().encode()))


@async_test
async def test_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    async with raw_backend(chunked_echo) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(b"PUT /x HTTP/1.1\r\nHost: lb\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        async with asyncio.timeout(5):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        [(status, _, body)] = await read_responses(reader, 1)
        writer.close()
    assert (status, body) == (200, b"5 " + hashlib.sha256(b"hello").hexdigest().encode())


# --------------------------------------------------------------------------- a client leaving mid-response


@async_test
async def test_client_leaving_mid_response_closes_the_backend_connection_instead_of_pooling_it() -> None:
    started, backend_saw_close = asyncio.Event(), asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")
                await writer.drain()
                started.set()
                await asyncio.sleep(0)
        except ConnectionError:
            backend_saw_close.set()
        finally:
            writer.close()

    async with raw_backend(endless) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        writer.write(get(b"/big"))
        assert (await read_head(reader)).startswith(b"HTTP/1.1 200")
        await started.wait()
        writer.transport.abort()
        async with asyncio.timeout(5):
            await backend_saw_close.wait()
        backend = h.backend(url)
        await wait_until(lambda: backend.active == 0)
        assert not h.lb.upstream._idle.get(url)
        assert backend.failures == 0  # the client left; the backend did nothing wrong


@async_test
async def test_many_keep_alive_requests_reuse_one_backend_connection() -> None:
    backend = RecordingBackend()
    async with raw_backend(backend) as url, running_lb(make_config([url], checks=False)) as h:
        reader, writer = await open_client(h.url)
        for i in range(20):
            writer.write(get(b"/n%d" % i))
            [(status, _, _)] = await read_responses(reader, 1)
            assert status == 200
        writer.close()
        assert h.lb.upstream._idle[url][0].exchanges == 20
