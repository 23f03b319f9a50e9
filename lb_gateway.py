"""Gateway mode of the balancer: ask a forward-auth decision endpoint before proxying.

The contract is the one nginx ``auth_request``, Caddy ``forward_auth`` and Traefik
``ForwardAuth`` follow (API_CONTRACT.md, "Gateway"): the balancer describes the client's
request in ``X-Forwarded-*`` headers and passes its credentials; a 2xx admits it (identity
headers go upstream, rate-limit headers come back to the client), anything else in 4xx is a
refusal returned to the client as given. A decision service that cannot answer (timeout,
refused connection, 5xx) fails closed (503 ``ratelimiter_unavailable``) or open.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiohttp import ClientError, ClientSession, ClientTimeout, web
from multidict import CIMultiDict, CIMultiDictProxy

from lb_server import ClientRequest

log = logging.getLogger(__name__)

IDENTITY_HEADERS = ("X-Auth-User-Id", "X-Auth-Username", "X-Auth-Tier", "X-Auth-Key-Prefix")
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit", "RateLimit-Policy")
REFUSAL_HEADERS = (*RATE_HEADERS, "Retry-After", "WWW-Authenticate", "Content-Type")
CREDENTIAL_HEADERS = ("X-API-Key", "Authorization")
MAX_DECISION_BODY = 64 * 1024


@dataclass
class Admission:
    """What an admitted request carries: identity for the upstream, rate headers for the client."""

    identity: list[tuple[str, str]]
    rate: list[tuple[str, str]]


class ForwardAuth:
    """One decision per client request, over the balancer's keep-alive ``ClientSession``."""

    def __init__(self, url: str, timeout: float, fail_open: bool) -> None:
        self.url = url
        self.timeout = ClientTimeout(total=timeout)
        self.fail_open = fail_open
        self.admitted = 0
        self.refused = 0
        self.errors = 0

    async def decide(
        self, session: ClientSession, request: ClientRequest, client_ip: str, target: str
    ) -> Admission | web.Response:
        """An ``Admission`` to proxy with, or the response to give the client instead."""
        headers = {
            "X-Forwarded-Method": request.method,
            "X-Forwarded-Uri": target,
            "X-Forwarded-For": client_ip,
            "X-Forwarded-Proto": request.scheme,
            "X-Forwarded-Host": request.headers.get("Host", ""),
        }
        for name in CREDENTIAL_HEADERS:
            if name in request.headers:
                headers[name] = request.headers[name]
        try:
            async with session.get(self.url, headers=headers, timeout=self.timeout, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_DECISION_BODY)
                if 200 <= resp.status < 300:
                    self.admitted += 1
                    return Admission(pick(resp.headers, IDENTITY_HEADERS), pick(resp.headers, RATE_HEADERS))
                if resp.status >= 500 or resp.status < 400:
                    raise ClientError(f"decision endpoint answered {resp.status}")
                self.refused += 1
                return web.Response(
                    status=resp.status,
                    reason=resp.reason,
                    body=body,
                    headers=CIMultiDict(pick(resp.headers, REFUSAL_HEADERS)),
                )
        except (TimeoutError, ClientError, OSError) as exc:
            self.errors += 1
            log.warning("forward-auth decision from %s failed (%s: %s)", self.url, type(exc).__name__, exc)
            if self.fail_open:
                return Admission([], [])
            return web.json_response(
                {
                    "error": "ratelimiter_unavailable",
                    "message": "the rate limiter could not decide on this request; try again shortly",
                },
                status=503,
                headers={"Retry-After": "1"},
            )

    def stats(self) -> dict[str, object]:
        return {
            "url": self.url,
            "fail": "open" if self.fail_open else "closed",
            "admitted": self.admitted,
            "refused": self.refused,
            "errors": self.errors,
        }


def pick(headers: CIMultiDictProxy[str], names: tuple[str, ...]) -> list[tuple[str, str]]:
    """The named headers of a decision response, every line kept."""
    return [(name, value) for name in names for value in headers.getall(name, ())]
