"""The request gate's per-request IP check: one owner of "was this IP already counted?"."""

from __future__ import annotations

import pytest

from errors import ApiError
from gate import IpCheck


def test_an_ip_check_counts_the_ip_once_however_often_it_is_asked(make_app):
    app = make_app(ip_rate_limit=2)
    svc = app.extensions["rl"]
    with app.test_request_context("/data"):
        check = IpCheck.start(svc, "192.0.2.7")
        assert check.pending() == "192.0.2.7"
        for _ in range(3):
            check.now()
        assert check.pending() is None
    with app.test_request_context("/data"):
        IpCheck.start(svc, "192.0.2.7").now()  # the second request: the limit of 2 is reached, not passed
    with app.test_request_context("/data"), pytest.raises(ApiError) as refused:
        IpCheck.start(svc, "192.0.2.7").now()
    assert refused.value.code == "ip_banned"


def test_a_view_with_a_combined_check_leaves_the_ip_pending_and_others_count_it_first(make_app):
    app = make_app()
    svc = app.extensions["rl"]
    with app.test_request_context("/data"):
        combined = IpCheck.start(svc, "192.0.2.8")
        combined.before_view(app.view_functions["data.data"], "GET")
        assert combined.pending() == "192.0.2.8"
        combined.before_view(app.view_functions["data.data"], "OPTIONS")  # an automatic OPTIONS never runs it
        assert combined.pending() is None
    with app.test_request_context("/auth/me"):
        plain = IpCheck.start(svc, "192.0.2.8")
        plain.before_view(app.view_functions["auth.me"], "GET")
        assert plain.pending() is None
