"""gunicorn_worker: when a buffered request is complete enough to hand to a thread."""

from __future__ import annotations

import pytest

from gunicorn_worker import MAX_BUFFERED_BODY, chunked_body_end, request_complete

HEAD = b"POST /auth/login HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("data, complete", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n", False),
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", True),
    (HEAD + b"Content-Length: 4\r\n\r\n{}", False),
    (HEAD + b"content-length:4\r\n\r\n{\"\"}", True),
    (HEAD + b"Content-Length: 4\r\n\r\n{}{}GET / HTTP/1.1\r\n", True),  # pipelined: the first one is complete
    (HEAD + f"Content-Length: {MAX_BUFFERED_BODY + 1}\r\n\r\n".encode(), True),  # too big to buffer: the app says 413
    (HEAD + b"Content-Length: 4\r\nExpect: 100-continue\r\n\r\n", True),  # the client waits for 100 Continue
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n", False),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", True),
    (HEAD + b"Content-Length: x\r\n\r\n", True),  # malformed: the parser refuses it
])
def test_request_complete(data: bytes, complete: bool) -> None:
    assert request_complete(data) is complete


def test_chunked_body_end_counts_trailers() -> None:
    body = b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT"
    assert chunked_body_end(body) == len(body) - len(b"NEXT")
    assert chunked_body_end(b"3\r\nab") is None
