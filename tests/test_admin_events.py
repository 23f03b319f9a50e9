"""Every admin action that writes an audit row also emits its event through the one event bus."""

from __future__ import annotations


def test_every_audited_admin_action_emits_an_event_on_the_bus(client, auth):
    svc = client.application.extensions["rl"]
    user, key = auth.user_with_key()
    victim = auth.register()
    admin = auth.admin
    actions = [
        ("POST", "/admin/upgrade_tier", {"user_id": user["user"]["id"], "tier": "basic"}),
        ("POST", "/admin/block_key", {"key_id": key["id"], "reason": "test"}),
        ("POST", "/admin/unblock_key", {"key_id": key["id"]}),
        ("POST", "/admin/overrides", {"key_id": key["id"], "limits": ["2/minute"]}),
        ("POST", f"/admin/keys/{key['id']}/credits", {"credits": 5}),
        ("POST", "/admin/ban_ip", {"ip": "192.0.2.99", "seconds": 60}),
        ("POST", "/admin/unban_ip", {"ip": "192.0.2.99"}),
        ("POST", "/admin/revoke_key", {"key_id": key["id"]}),
        ("DELETE", f"/admin/users/{victim['user']['id']}", None),
    ]
    for method, path, body in actions:
        response = client.open(path, method=method, json=body, headers=admin)
        assert response.status_code in (200, 201), (path, response.get_json())
    override_id = client.get("/admin/overrides", headers=admin).get_json()["overrides"][0]["id"]
    assert client.delete(f"/admin/overrides/{override_id}", headers=admin).status_code == 200

    audited = client.get("/admin/audit?limit=1000", headers=admin).get_json()["entries"]
    emitted = [event for event in svc.events.recent if event["details"].get("actor") == "admin-token"]
    assert len(audited) == len(actions) + 1
    assert len(emitted) == len(audited), ([e["action"] for e in audited], [e["kind"] for e in emitted])
    kinds = {event["kind"] for event in emitted}
    assert {"user_deleted", "ip_unbanned", "override_created", "override_deleted", "credits_set"} <= kinds
