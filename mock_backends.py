"""Mock backend servers that the load balancer fronts in demos, tests and fault drills.

One command starts several small Flask apps, each on its own port and threaded werkzeug
server, that say who they are (``GET /``), report health (``GET /health``, switchable with
``POST /admin/health``), echo any request, and can be made slow (``?delay_ms=``), failing
(``?fail=1``) or cacheable (``?cache_control=``) per request, or slow for every request
(``POST /admin/delay``). ``GET /bytes?n=`` streams a large body for streaming tests.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

log = logging.getLogger(__name__)

DEFAULT_PORTS = (5001, 5002, 5003)
CHUNK = 64 * 1024
ECHO_BODY_LIMIT = 64 * 1024
MAX_DELAY_MS = 60_000


@dataclass
class BackendState:
    """Mutable per-backend switches, kept in ``app.extensions`` (not module globals)."""

    name: str
    port: int
    healthy: bool = True
    delay_ms: int = 0
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_request_id(self) -> int:
        with self.lock:
            return next(self.counter)


def _state() -> BackendState:
    from flask import current_app

    return current_app.extensions["mock_backend"]


def _int_arg(name: str, default: int, maximum: int) -> int:
    try:
        return max(0, min(int(request.args.get(name, default)), maximum))
    except ValueError:
        return default


def _error(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify(error=code, message=message), status


def _before() -> Any:
    """Apply the per-request and sticky fault switches before any route runs."""
    state = _state()
    delay = _int_arg("delay_ms", 0, MAX_DELAY_MS) + state.delay_ms
    if delay:
        time.sleep(delay / 1000)
    if request.args.get("fail") in ("1", "true"):
        return _error(500, "injected_failure", f"{state.name} failed on purpose (?fail=1)")
    return None


def _after(response: Response) -> Response:
    """Tag every answer with the backend's name and honour ``?cache_control=``."""
    response.headers["X-Served-By"] = _state().name
    cache_control = request.args.get("cache_control")
    if cache_control:
        response.headers["Cache-Control"] = cache_control
    return response


def identity() -> Response:
    state = _state()
    return jsonify(server=state.name, port=state.port, request_id=state.next_request_id())


def health() -> tuple[Response, int]:
    state = _state()
    status = 200 if state.healthy else 503
    return jsonify(status="ok" if state.healthy else "unhealthy", server=state.name), status


def set_health() -> Any:
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("healthy"), bool):
        return _error(400, "invalid_field", 'body must be JSON {"healthy": true|false}')
    state = _state()
    state.healthy = body["healthy"]
    return jsonify(server=state.name, healthy=state.healthy)


def set_delay() -> Any:
    body = request.get_json(silent=True)
    delay = body.get("delay_ms") if isinstance(body, dict) else None
    if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY_MS:
        return _error(400, "invalid_field", f'body must be JSON {{"delay_ms": 0..{MAX_DELAY_MS}}}')
    state = _state()
    state.delay_ms = delay
    return jsonify(server=state.name, delay_ms=state.delay_ms)


def stream_bytes() -> Response:
    """Stream ``n`` bytes (default 1 MiB, at most 1 GiB) in 64 KiB chunks."""
    size = _int_arg("n", 1 << 20, 1 << 30)

    def generate() -> Iterator[bytes]:
        block = b"x" * CHUNK
        remaining = size
        while remaining > 0:
            piece = block[: min(CHUNK, remaining)]
            remaining -= len(piece)
            yield piece

    response = Response(generate(), mimetype="application/octet-stream")
    response.headers["Content-Length"] = str(size)
    return response


def echo(path: str = "") -> Response:
    """Answer with what was received, so proxy tests can see headers, body and query."""
    state = _state()
    body = request.get_data(cache=False)
    return jsonify(
        server=state.name,
        port=state.port,
        request_id=state.next_request_id(),
        method=request.method,
        path=request.path,
        query=request.args.to_dict(flat=False),
        headers=dict(request.headers),
        body=body[:ECHO_BODY_LIMIT].decode("utf-8", "replace"),
        body_length=len(body),
        body_sha256=hashlib.sha256(body).hexdigest(),
        remote_addr=request.remote_addr,
    )


ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_app(name: str, port: int) -> Flask:
    """Application factory for one mock backend."""
    app = Flask(name)
    app.extensions["mock_backend"] = BackendState(name=name, port=port)
    app.before_request(_before)
    app.after_request(_after)
    app.add_url_rule("/", "identity", identity, methods=["GET", "HEAD"])
    app.add_url_rule("/", "echo_root", echo, methods=[m for m in ALL_METHODS if m not in ("GET", "HEAD")])
    app.add_url_rule("/health", "health", health, methods=["GET", "HEAD"])
    app.add_url_rule("/admin/health", "set_health", set_health, methods=["POST"])
    app.add_url_rule("/admin/delay", "set_delay", set_delay, methods=["POST"])
    app.add_url_rule("/bytes", "bytes", stream_bytes, methods=["GET", "HEAD"])
    app.add_url_rule("/<path:path>", "echo", echo, methods=ALL_METHODS)
    return app


class QuietHandler(WSGIRequestHandler):
    """Request handler that keeps connections alive and logs requests only at DEBUG."""

    protocol_version = "HTTP/1.1"

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            super().log_request(code, size)


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen ourselves, so a busy port is one clean ``OSError`` (werkzeug would exit)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"port {port} on {host} is already in use") from None
        raise
    return sock


def build_servers(host: str, ports: Sequence[int]) -> list[BaseWSGIServer]:
    """Bind every port first so that a busy one fails before any server starts."""
    sockets: list[socket.socket] = []
    try:
        for port in ports:
            sockets.append(listen(host, port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    servers = []
    for index, (port, sock) in enumerate(zip(ports, sockets, strict=True), start=1):
        app = create_app(f"backend-{index}", port)
        servers.append(make_server(host, port, app, threaded=True, request_handler=QuietHandler, fd=sock.fileno()))
        sock.close()  # the server holds its own duplicate of the descriptor
    return servers


def serve(servers: Sequence[BaseWSGIServer]) -> None:
    """Serve until SIGINT/SIGTERM, then stop every server and return."""
    # The handler takes no lock (an Event's lock may be held by the very code it interrupts, a
    # deadlock), and the main thread sleeps in short steps: the kernel may hand the signal to a
    # server thread, and Python runs the handler only when the main thread next runs bytecode.
    stopped: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopped.append(signum))
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    while not stopped:
        time.sleep(0.2)
    # A stop must never hang (a supervisor that died cannot escalate to SIGKILL): if the graceful
    # shutdown below has not finished in 5 s, leave anyway.
    watchdog = threading.Timer(5.0, os._exit, args=(0,))
    watchdog.daemon = True
    watchdog.start()
    log.info("stopping %d backends", len(servers))
    for server in servers:
        server.shutdown()
        server.server_close()


def parse_ports(args: argparse.Namespace) -> list[int]:
    if args.count is not None:
        return [args.base_port + i for i in range(args.count)]
    try:
        ports = [int(p) for p in args.ports.split(",") if p.strip()]
    except ValueError:
        raise SystemExit(f"mock_backends: --ports must be a comma list of integers, got {args.ports!r}") from None
    if not ports or any(not 0 < p < 65536 for p in ports):
        raise SystemExit(f"mock_backends: --ports must list ports in 1..65535, got {args.ports!r}")
    return ports


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start mock backend servers for the load balancer.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1]")
    parser.add_argument("--ports", default=",".join(map(str, DEFAULT_PORTS)), help="comma list [5001,5002,5003]")
    parser.add_argument("--count", type=int, help="start N backends on consecutive ports (with --base-port)")
    parser.add_argument("--base-port", type=int, default=DEFAULT_PORTS[0], help="first port for --count [5001]")
    parser.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ports = parse_ports(args)
    try:
        servers = build_servers(args.host, ports)
    except OSError as exc:
        print(f"mock_backends: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for index, port in enumerate(ports, start=1):
        print(f"backend-{index} listening on http://{args.host}:{port}", flush=True)
    serve(servers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
