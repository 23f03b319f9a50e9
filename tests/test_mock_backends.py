"""mock_backends.py as a real process: identity, health switch, echo, faults, streaming, CLI."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
import requests

from tests.services import ROOT, free_port, wait_for_http


def wait_ready(urls: Sequence[str], proc: subprocess.Popen[str], timeout: float = 15.0) -> None:
    """Every URL answers (any status), bounded by ``timeout``; fail fast if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    for url in urls:
        wait_for_http(url, proc, max(0.0, deadline - time.monotonic()), status=None,
                      output=lambda: proc.stderr.read() if proc.stderr else "")


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def mock_backends(ports: Sequence[int]) -> Iterator[list[str]]:
    """Run ``mock_backends.py --ports ...`` and yield the base URLs; stop it afterwards."""
    cmd = [sys.executable, str(ROOT / "mock_backends.py"), "--ports", ",".join(map(str, ports))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    try:
        wait_ready([u + "/health" for u in urls], proc)
        yield urls
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def backends() -> Iterator[list[str]]:
    with mock_backends([free_port(), free_port()]) as urls:
        yield urls


def test_root_identifies_backend_by_name_and_port(backends: list[str]) -> None:
    for index, url in enumerate(backends, start=1):
        body = requests.get(url + "/", timeout=5).json()
        assert body["server"] == f"backend-{index}"
        assert body["port"] == int(url.rsplit(":", 1)[1])


def test_health_switch_turns_health_503_and_back(backends: list[str]) -> None:
    url = backends[0]
    assert requests.get(url + "/health", timeout=5).status_code == 200
    assert requests.post(url + "/admin/health", json={"healthy": False}, timeout=5).status_code == 200
    try:
        response = requests.get(url + "/health", timeout=5)
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
    finally:
        requests.post(url + "/admin/health", json={"healthy": True}, timeout=5)
    assert requests.get(url + "/health", timeout=5).status_code == 200


def test_health_switch_rejects_non_boolean(backends: list[str]) -> None:
    response = requests.post(backends[0] + "/admin/health", json={"healthy": "no"}, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_field"


def test_echo_reports_method_path_query_headers_and_body(backends: list[str]) -> None:
    response = requests.put(
        backends[1] + "/some/path?a=1&a=2&b=x", data=b"payload", headers={"X-Test": "yes"}, timeout=5
    )
    body = response.json()
    assert body["method"] == "PUT"
    assert body["path"] == "/some/path"
    assert body["query"] == {"a": ["1", "2"], "b": ["x"]}
    assert body["headers"]["X-Test"] == "yes"
    assert body["body"] == "payload"
    assert body["body_length"] == 7
    assert body["server"] == "backend-2"


def test_fail_flag_returns_500_on_any_route(backends: list[str]) -> None:
    for path in ("/", "/health", "/anything"):
        response = requests.get(backends[0] + path + "?fail=1", timeout=5)
        assert response.status_code == 500
        assert response.json()["error"] == "injected_failure"


def test_delay_ms_slows_the_answer(backends: list[str]) -> None:
    started = time.monotonic()
    assert requests.get(backends[0] + "/?delay_ms=300", timeout=5).status_code == 200
    assert time.monotonic() - started >= 0.3


def test_sticky_delay_applies_to_every_request(backends: list[str]) -> None:
    url = backends[1]
    assert requests.post(url + "/admin/delay", json={"delay_ms": 250}, timeout=5).json()["delay_ms"] == 250
    try:
        started = time.monotonic()
        requests.get(url + "/", timeout=5)
        assert time.monotonic() - started >= 0.25
    finally:
        requests.post(url + "/admin/delay", json={"delay_ms": 0}, timeout=5)


def test_cache_control_query_sets_the_header(backends: list[str]) -> None:
    response = requests.get(backends[0] + "/x?cache_control=max-age=30", timeout=5)
    assert response.headers["Cache-Control"] == "max-age=30"


def test_bytes_route_streams_exactly_n_bytes(backends: list[str]) -> None:
    with requests.get(backends[0] + "/bytes?n=3000000", stream=True, timeout=10) as response:
        total = sum(len(chunk) for chunk in response.iter_content(chunk_size=65536))
        assert response.headers["Content-Length"] == "3000000"
    assert total == 3_000_000


def test_stream_route_is_chunked_without_content_length(backends: list[str]) -> None:
    """Raw bytes on one keep-alive connection: the framing itself, not what a client library makes of it."""
    port = int(backends[0].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /stream?n=2500&chunk=1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = b""
        while not raw.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, f"connection closed before the last chunk: {raw!r}"
            raw += data
    head, _, chunked = raw.partition(b"\r\n\r\n")
    fields = [line.split(b":", 1)[0].lower() for line in head.split(b"\r\n")[1:]]
    assert b"content-length" not in fields
    assert b"transfer-encoding: chunked" in head.lower()
    body, rest = b"", chunked
    while (size := int(rest.split(b"\r\n", 1)[0], 16)) > 0:
        rest = rest.split(b"\r\n", 1)[1]
        body, rest = body + rest[:size], rest[size + 2 :]
    assert body == (b"0123456789" * 250)


def test_stream_route_through_requests_gives_every_byte(backends: list[str]) -> None:
    response = requests.get(backends[0] + "/stream?n=12345&chunk=777", timeout=10)
    assert response.status_code == 200 and "Content-Length" not in response.headers
    assert response.content == bytes(48 + i % 10 for i in range(12345))


def consecutive_free_ports() -> int:
    """A port whose successor is free too (bounded search; the OS may still race us)."""
    for _ in range(50):
        base = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
            except OSError:
                continue
        return base
    raise RuntimeError("no two consecutive free ports found")


def test_count_and_base_port_start_consecutive_backends() -> None:
    base = consecutive_free_ports()
    cmd = [sys.executable, str(ROOT / "mock_backends.py"), "--count", "2", "--base-port", str(base)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        urls = [f"http://127.0.0.1:{base}/", f"http://127.0.0.1:{base + 1}/"]
        wait_ready(urls, proc)
        assert [requests.get(u, timeout=5).json()["server"] for u in urls] == ["backend-1", "backend-2"]
    finally:
        stop(proc)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_0(sig: int) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "mock_backends.py"), "--ports", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_ready([f"http://127.0.0.1:{port}/health"], proc)
    assert stop(proc, sig) == 0
    assert "Traceback" not in proc.stderr.read()


def test_busy_port_gives_one_line_and_nonzero_exit(backends: list[str]) -> None:
    busy = backends[0].rsplit(":", 1)[1]
    result = subprocess.run(
        [sys.executable, str(ROOT / "mock_backends.py"), "--ports", f"{free_port()},{busy}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert busy in lines[0] and "in use" in lines[0]
