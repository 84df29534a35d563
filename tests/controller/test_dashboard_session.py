"""The dashboard's sign-in over HTTP: the cookie it sets, what it refuses, and CSRF on every form (the
browser tests in tests/e2e/test_dashboard.py drive the same pages in Chromium)."""

import base64
import json

from slmops.controller.config import ApiToken
from slmops.controller.dashboard import session

ADMIN, READER = "admin-token-0123456789", "reader-token-0123456789"
TOKENS = [ApiToken(name="alice", token=ADMIN, role="admin"), ApiToken(name="bob", token=READER, role="reader")]


def sign_in(client, token: str):
    return client.post("/ui/signin", data={"token": token, "next": "/ui/rollouts"}, follow_redirects=False)


def test_a_token_signs_in_with_a_strict_http_only_cookie_and_a_wrong_one_is_refused(client) -> None:
    assert client.get("/ui/fleet", follow_redirects=False).headers["location"] == "/ui/signin?next=%2Fui%2Ffleet"
    wrong = sign_in(client, "not-a-token-at-all")
    assert wrong.status_code == 303 and wrong.headers["location"].startswith("/ui/signin?")
    assert (
        "set-cookie" not in wrong.headers and "not one of this controller" in client.get(wrong.headers["location"]).text
    )

    right = sign_in(client, READER)
    assert right.status_code == 303 and right.headers["location"] == "/ui/rollouts"
    cookie = right.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert "secure" not in cookie  # plain HTTP here: a Secure cookie would never come back
    page = client.get("/ui/rollouts")
    assert page.status_code == 200 and "bob" in page.text and "No rollouts yet" in page.text


def test_a_sign_in_link_cannot_send_the_browser_elsewhere(client) -> None:
    done = client.post("/ui/signin", data={"token": READER, "next": "https://evil.example/"}, follow_redirects=False)
    assert done.headers["location"] == "/ui/fleet"


def test_every_form_needs_the_sessions_csrf_token_and_readers_cannot_act(client) -> None:
    sign_in(client, ADMIN)
    signed = session.viewer(TOKENS, client.cookies.get(session.COOKIE))
    assert signed is not None and signed.admin
    forged = client.post("/ui/rollouts/1/abort", data={})
    assert forged.status_code == 403 and "CSRF" in forged.json()["error"]["message"]
    assert client.post("/ui/rollouts/1/abort", data={"csrf": "0" * 64}).status_code == 403
    assert client.post("/ui/rollouts/1/abort", data={"csrf": signed.csrf}).status_code == 404  # past CSRF: no rollout 1

    client.cookies.clear()
    sign_in(client, READER)
    reader = session.viewer(TOKENS, client.cookies.get(session.COOKIE))
    assert reader is not None and not reader.admin
    refused = client.post("/ui/rollouts/1/abort", data={"csrf": reader.csrf})
    assert refused.status_code == 403 and "reader" in refused.json()["error"]["message"]
    assert client.post("/ui/signout", data={"csrf": reader.csrf}, follow_redirects=False).status_code == 303


def test_a_session_cookie_is_checked_whole() -> None:
    cookie, who = session.sign_in(TOKENS, READER, now=1000.0) or (None, None)
    assert cookie and who and session.viewer(TOKENS, cookie, now=1001.0) == who
    assert session.viewer(TOKENS, cookie, now=1000.0 + session.LIFETIME_S + 1) is None  # expired
    body, mac = cookie.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    raised = base64.urlsafe_b64encode(json.dumps({**claims, "name": "alice"}).encode()).decode().rstrip("=")
    assert session.viewer(TOKENS, f"{raised}.{mac}", now=1001.0) is None  # a reader cannot make itself admin
    assert session.viewer(TOKENS[:1], cookie, now=1001.0) is None  # its token was removed: its sessions end
    assert "=" not in cookie  # a padded value would be quoted by the server and come back quoted
    for broken in ("", "x", "a.b.c", f"{body}.", "!!!.00"):
        assert session.viewer(TOKENS, broken, now=1001.0) is None


def test_a_session_signed_in_on_one_replica_is_good_on_another(client, controller_config) -> None:
    """Nothing of a session is stored: a second controller on the same database and tokens reads the
    cookie the first one set, and renders the same rows."""
    from fastapi.testclient import TestClient

    from slmops.controller.service import build_app

    sign_in(client, READER)
    cookie = client.cookies.get(session.COOKIE)
    with TestClient(build_app(controller_config)) as other:
        other.cookies.set(session.COOKIE, cookie, path="/ui")
        page = other.get("/ui/fleet", follow_redirects=False)
        assert page.status_code == 200 and "bob" in page.text and "No devices yet" in page.text
