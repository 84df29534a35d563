"""Signing in to the dashboard: an API token in, a session cookie out, and the CSRF token of its forms.

    cookie   base64url(JSON {"name", "expires", "nonce"}, unpadded) "." HMAC-SHA256(key, that)
    key      SHA-256 of a fixed label and the API token's secret: every replica with the same tokens
             checks any replica's cookie (nothing is stored), and removing a token from the
             configuration ends its sessions
    csrf     HMAC-SHA256(key, "csrf" + nonce): one per session, in every form and htmx request,
             compared on every POST (SameSite=Strict already keeps other sites' forms out)

The cookie is HttpOnly, SameSite=Strict, and Secure when the request came over TLS.
"""

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from ..audit import Actor
from ..config import ApiToken

COOKIE = "slmops_session"
LIFETIME_S = 12 * 3600
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Viewer:
    """Who is signed in, and the CSRF token their forms carry."""

    actor: Actor
    csrf: str

    @property
    def admin(self) -> bool:
        return self.actor.role == "admin"


def sign_in(tokens: list[ApiToken], given: str, now: float | None = None) -> tuple[str, Viewer] | None:
    """The cookie and viewer for an API token, or None when no configured token is `given`."""
    for token in tokens:
        if given and secrets.compare_digest(given.encode(), token.token.encode()):
            nonce = secrets.token_urlsafe(16)
            payload = {"name": token.name, "expires": int((now or time.time()) + LIFETIME_S), "nonce": nonce}
            body = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")  # no quoting
            return f"{body}.{_mac(token, body)}", _viewer_of(token, nonce)
    return None


def viewer(tokens: list[ApiToken], cookie: str | None, now: float | None = None) -> Viewer | None:
    """Who a session cookie signs in, or None: absent, malformed, forged, expired, or its token is gone."""
    if not cookie or cookie.count(".") != 1:
        return None
    body, mac = cookie.split(".")
    try:
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        name, expires, nonce = str(payload["name"]), int(payload["expires"]), str(payload["nonce"])
    except (ValueError, KeyError, TypeError):
        return None
    token = next((t for t in tokens if t.name == name), None)
    if token is None or not secrets.compare_digest(mac, _mac(token, body)) or expires < (now or time.time()):
        return None
    return _viewer_of(token, nonce)


def _viewer_of(token: ApiToken, nonce: str) -> Viewer:
    return Viewer(Actor(token.name, token.role), _mac(token, CSRF_FIELD + nonce))


def _mac(token: ApiToken, text: str) -> str:
    key = hashlib.sha256(b"slmops dashboard session\0" + token.token.encode()).digest()
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
