"""Differential test of the balancer's HTTP/1.1 upstream client against h11 (issue 16).

A scripted backend (a raw asyncio server) answers each request path with exact bytes, written
in pieces cut where Hypothesis says, with a loop turn between pieces so each one reaches the
reader on its own. Hypothesis draws long sequences of responses: Content-Length, chunked with
extensions, upper-case and zero-padded sizes and trailers, close-delimited bodies, HTTP/1.0,
204/304 and HEAD without a body, 1xx interim responses, ``Connection: close`` mid-sequence and
backends that close an idle keep-alive connection without saying so. The same sequence is
requested twice: through the balancer (one instance for the whole run, so its pooled
connections are reused across sequences) and directly by a reference client built on h11.
Status, reason, every end-to-end header (order and repeats kept) and every body byte must match.

Differences that are the proxy's job and not compared: hop-by-hop and framing headers
(the balancer re-frames the body), ``Date`` and ``Server`` (aiohttp sets them when missing),
interim 1xx responses and trailers (not relayed, as nginx does not), and the
``Content-Type: application/octet-stream`` aiohttp adds to a body sent without one.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb_config import BackendSpec, CacheConfig, HealthCheckConfig, LBConfig
from load_balancer import GuardedRunner, build_app
from tests.services import free_port

BUFFER_BYTES = 64  # small, so both the buffered and the streamed body paths are exercised
NOT_COMPARED = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-length",
        "trailer",
        "te",
        "upgrade",
        "proxy-connection",
        "date",
        "server",
        "x-backend",
    }
)


# --------------------------------------------------------------------------- scripted responses


@dataclass
class Scripted:
    """One response: its exact bytes, where to cut them, and whether the backend closes after it."""

    method: str
    wire: bytes
    cuts: list[int]
    closes: bool
    close_before_next: bool = False  # the backend hangs up without reading the next request
    label: str = ""


@dataclass
class Script:
    responses: dict[bytes, Scripted] = field(default_factory=dict)
    seen: list[bytes] = field(default_factory=list)


TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
VALUE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 ,;=/._-"
HEADER_NAMES = ["X-A", "X-Dup", "Cache-Control", "Vary", "ETag", "Set-Cookie", "X-Empty"]
KINDS = ["length", "chunked", "close", "http10", "204", "304"]


def value(rng: random.Random) -> str:
    return "".join(rng.choices(VALUE_CHARS, k=rng.randint(0, 20))).strip()


@st.composite
def responses(draw: st.DrawFn) -> dict[str, Any]:
    """One response of any framing, as a dict of parts (rendered by ``render``).

    Hypothesis draws the shape (method, framing, connection handling, how many read boundaries);
    the details come from a seeded ``random.Random``: drawing every byte through Hypothesis cost
    ten times more than running the exchange, and a failure shrinks well on the shape alone.
    """
    method = draw(st.sampled_from(["GET", "HEAD"]))
    kind = draw(st.sampled_from(KINDS))
    rng = random.Random(draw(st.integers(0, 2**32)))
    status = {"204": 204, "304": 304}.get(kind) or rng.choice([200, 200, 201, 404, 500, 503])
    headers = [(rng.choice(HEADER_NAMES), value(rng)) for _ in range(rng.randint(0, 5))]
    if rng.random() < 0.5:
        headers.append(("Content-Type", rng.choice(["text/plain", "application/json", "image/png"])))
    size = rng.choice([0, rng.randint(1, 40), rng.randint(41, 400)])
    return {
        "method": method,
        "kind": kind,
        "status": status,
        "reason": rng.choice(["OK", "Fine Thanks", "X"]),
        "headers": headers,
        "body": b"" if kind in ("204", "304") else rng.randbytes(size),
        "interim": [rng.choice([100, 102, 103]) for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2])))],
        "chunks": [rng.randint(1, 50) for _ in range(rng.randint(1, 6))],
        "extensions": [rng.choice(["", ";a", ";name=val", ';q="x y"']) for _ in range(7)],
        "size_style": rng.choice(["lower", "upper", "padded"]),
        "trailers": [("X-T-" + "".join(rng.choices(TOKEN_CHARS, k=4)), value(rng)) for _ in range(rng.randint(0, 2))],
        "connection_close": draw(st.integers(0, 9)) == 0,
        "silent_close": draw(st.integers(0, 9)) == 0,
        "cuts": [rng.randint(1, 10_000) for _ in range(draw(st.integers(0, 4)))],
    }


def render(parts: dict[str, Any]) -> Scripted:
    """The exact bytes of a response described by ``responses()``."""
    kind, body, method = parts["kind"], parts["body"], parts["method"]
    version = "HTTP/1.0" if kind == "http10" else "HTTP/1.1"
    head = b"".join(b"HTTP/1.1 %d Interim\r\nLink: </x.css>; rel=preload\r\n\r\n" % code for code in parts["interim"])
    lines = [f"{version} {parts['status']} {parts['reason']}"]
    lines += [f"{name}: {value}" for name, value in parts["headers"]]
    closes = kind in ("close", "http10") or parts["connection_close"]
    if parts["connection_close"]:
        lines.append("Connection: close")
    payload = b""
    if kind in ("length", "http10", "304") and not (kind == "304" and not body):
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif kind == "chunked":
        if parts["trailers"]:
            lines.append("Trailer: " + ", ".join(name for name, _ in parts["trailers"]))
        lines.append("Transfer-Encoding: chunked")
        payload = chunked(body, parts)
    elif kind == "close":
        payload = body
    if method == "HEAD" or kind in ("204", "304"):
        payload = b""
    wire = head + ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
    label = f"{method} {kind} {parts['status']} body={len(body)}{' close' if closes else ''}"
    return Scripted(method, wire, sorted({c % (len(wire) + 1) for c in parts["cuts"]}), closes, label=label)


def chunked(body: bytes, parts: dict[str, Any]) -> bytes:
    """``body`` as chunks of the drawn sizes (the last one takes the rest), then trailers."""
    out, rest, sizes = [], body, list(parts["chunks"])
    exts = iter(parts["extensions"])
    while rest:
        size = sizes.pop(0) if len(sizes) > 1 else len(rest)
        piece, rest = rest[:size], rest[size:]
        out.append(size_line(len(piece), parts["size_style"]) + next(exts, "").encode() + b"\r\n" + piece + b"\r\n")
    out.append(size_line(0, parts["size_style"]) + next(exts, "").encode() + b"\r\n")
    out += [f"{name}: {value}\r\n".encode() for name, value in parts["trailers"]]
    return b"".join(out) + b"\r\n"


def size_line(size: int, style: str) -> bytes:
    text = {"lower": f"{size:x}", "upper": f"{size:X}", "padded": f"{size:04x}"}[style]
    return text.encode()


# --------------------------------------------------------------------------- the scripted backend


async def serve_script(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer each request with its scripted bytes, one piece per loop turn."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            script.seen.append(target)
            scripted = script.responses[target]
            start = 0
            for cut in [*scripted.cuts, len(scripted.wire)]:
                if cut > start:
                    writer.write(scripted.wire[start:cut])
                    await writer.drain()
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    start = cut
            if scripted.closes or scripted.close_before_next:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


# --------------------------------------------------------------------------- the reference client


@dataclass
class Seen:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class H11Client:
    """A keep-alive HTTP/1.1 client on h11 that reconnects when the server closed, like a browser."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: h11.Connection | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reused = False

    async def request(self, method: str, target: bytes) -> Seen:
        for _ in range(2):
            if self.conn is None:
                await self._connect()
            try:
                return await self._exchange(method, target)
            except (ConnectionError, EOFError):
                stale = self.reused
                await self.close()
                if not stale:
                    raise
            except BaseException:
                await self.close()  # never reuse a connection after a protocol error
                raise
        raise AssertionError("unreachable")

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn = h11.Connection(h11.CLIENT)
        self.reused = False

    async def _exchange(self, method: str, target: bytes) -> Seen:
        assert self.conn is not None and self.writer is not None and self.reader is not None
        request = h11.Request(method=method, target=target, headers=[("Host", "upstream")])
        self.writer.write(self.conn.send(request) + self.conn.send(h11.EndOfMessage()))
        got_response = closed = False
        seen: Seen | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(65536)
                if not data and not got_response:
                    raise EOFError("server closed before answering")
                closed = closed or not data
                self.conn.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                got_response = True
            elif isinstance(event, h11.Response):
                got_response = True
                seen = Seen(event.status_code, event.reason, list(event.headers), b"")
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected h11 event {event!r}")
        assert seen is not None
        seen.body = bytes(body)
        if closed or self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
            await self.close()  # MUST_CLOSE or CLOSED: this connection carries no further request
        else:
            self.conn.start_next_cycle()
            self.reused = True
        return seen

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.conn = self.reader = self.writer = None


def comparable(seen: Seen, reference: Seen | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]], bytes]:
    headers = [(k, v) for k, v in seen.headers if k.decode() not in NOT_COMPARED]
    if reference is not None and not any(k == b"content-type" for k, _ in reference.headers):
        headers = [(k, v) for k, v in headers if (k, v) != (b"content-type", b"application/octet-stream")]
    return seen.status, seen.reason, headers, seen.body


# --------------------------------------------------------------------------- the run


@dataclass
class Rig:
    loop: asyncio.AbstractEventLoop
    script: Script
    backend_port: int
    lb_port: int
    through_lb: H11Client
    counter: Iterator[int]


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    loop = asyncio.new_event_loop()
    script = Script()

    async def start() -> tuple[asyncio.Server, web.AppRunner, int, int]:
        server = await asyncio.start_server(lambda r, w: serve_script(script, r, w), "127.0.0.1", 0)
        backend_port = server.sockets[0].getsockname()[1]
        config = LBConfig(
            backends=[BackendSpec(f"http://127.0.0.1:{backend_port}")],
            health_check=HealthCheckConfig(enabled=False),
            cache=CacheConfig(enabled=False),
            buffer_bytes=BUFFER_BYTES,
            read_timeout=10.0,
        )
        app = build_app(config)
        runner = GuardedRunner(app, access_log=None)
        await runner.setup()
        lb_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", lb_port).start()
        return server, runner, backend_port, lb_port

    server, runner, backend_port, lb_port = loop.run_until_complete(start())
    try:
        yield Rig(loop, script, backend_port, lb_port, H11Client(lb_port), itertools.count())
    finally:
        loop.run_until_complete(runner.cleanup())
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


async def run_sequence(rig: Rig, sequence: list[Scripted]) -> None:
    number = next(rig.counter)
    targets = [b"/s%d/%d" % (number, i) for i in range(len(sequence))]
    rig.script.responses.update(zip(targets, sequence, strict=True))
    reference = H11Client(rig.backend_port)
    try:
        for index, (target, scripted) in enumerate(zip(targets, sequence, strict=True)):
            try:
                via_lb = await rig.through_lb.request(scripted.method, target)
                direct = await reference.request(scripted.method, target)
                assert comparable(via_lb, direct) == comparable(direct)
            except BaseException as exc:
                history = "\n".join(f"  #{i} {s.label}: {s.wire!r}" for i, s in enumerate(sequence[: index + 1]))
                exc.add_note(f"response #{index} of the sequence failed; the sequence so far:\n{history}")
                raise
    finally:
        await reference.close()
        for target in targets:
            rig.script.responses.pop(target, None)


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(st.lists(responses(), min_size=1, max_size=12))
def test_balancer_relays_every_framing_like_the_reference_client(rig: Rig, drawn: list[dict[str, Any]]) -> None:
    sequence = []
    for parts in drawn:
        scripted = render(parts)
        scripted.close_before_next = parts["silent_close"] and not scripted.closes
        sequence.append(scripted)
    rig.loop.run_until_complete(asyncio.wait_for(run_sequence(rig, sequence), 30))
