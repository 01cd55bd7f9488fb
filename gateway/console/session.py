"""Console sessions: an HMAC-signed cookie with an expiry, and CSRF tokens bound to it.

The cookie carries no secret: the operator's row id, a binding to the operator's current token
hash (re-issuing, revoking or deleting the operator ends the session), a random session id
and the expiry — base64url JSON, then ``.`` and HMAC-SHA256 over it with a key derived from
``SECRET_KEY``.  Every request looks the operator up again, so a deleted or revoked operator or
a changed role takes effect at once.  A form's CSRF token is an HMAC of the session id (base64url); the login form, which
has no session yet, binds its token to a short-lived random cookie instead (double submit,
signed).  Logging out records the session id until its expiry, so a copy of the cookie is
refused too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import Engine, delete, select

from gateway.accounts import Operator, operator_by_token
from gateway.store.bulk import bulk_insert
from gateway.store.db import reading, snapshot
from gateway.store.tables import console_logouts, operators

COOKIE = "ce_ops_session"
LOGIN_COOKIE = "ce_ops_login"
COOKIE_PATH = "/ops"
SESSION_SECONDS = 8 * 3600  # one working day; log in again after it
LOGIN_SECONDS = 30 * 60


@dataclass(frozen=True)
class ConsoleSession:
    """A logged-in operator, as looked up for this request."""

    operator: Operator
    sid: str
    expires_at: int
    csrf: str

    @property
    def can_act(self) -> bool:
        return self.operator.can_act


class Signer:
    """Signs and checks cookie values and CSRF tokens with a key derived from ``SECRET_KEY``."""

    def __init__(self, secret_key: str) -> None:
        self._key = hashlib.sha256(b"ce-gateway/console-session/" + secret_key.encode()).digest()

    def _digest(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._key, f"{purpose}\n{value}".encode(), hashlib.sha256).digest()

    def _mac(self, purpose: str, value: str) -> str:
        return self._digest(purpose, value).hex()

    def sign(self, payload: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")
        return f"{body}.{self._mac('cookie', body)}"

    def unsign(self, value: str) -> dict[str, Any] | None:
        body, _, mac = value.partition(".")
        if not body or not hmac.compare_digest(mac.encode(), self._mac("cookie", body).encode()):
            return None
        try:
            payload = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        except (binascii.Error, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    def csrf_for(self, sid: str) -> str:
        """The session's CSRF token: base64url of the MAC, unpadded (43 characters).

        Not hex: a hex token holds a run of 15 or 18 digits often enough (~0.4 % of sessions)
        that a page's masking of identity numbers would have mangled it.
        """
        return base64.urlsafe_b64encode(self._digest("csrf", sid)).decode().rstrip("=")

    def check_csrf(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token).encode(), self.csrf_for(sid).encode())

    def token_binding(self, token_hash: str) -> str:
        return self._mac("token", token_hash)[:32]


def new_login_nonce() -> str:
    return secrets.token_urlsafe(18)


def login_csrf(signer: Signer, nonce: str) -> str:
    return signer.csrf_for("login/" + nonce)


def log_in(engine: Engine, signer: Signer, token: str, now: float | None = None
           ) -> tuple[str, ConsoleSession] | None:
    """Check an operator token; on success the cookie value and the session it carries."""
    token = token.strip()
    found = operator_by_token(engine, token) if token else None
    if found is None:
        return None
    with reading(engine) as conn:
        row = conn.execute(select(operators.c.id, operators.c.token_hash)
                           .where(operators.c.name == found.name)).first()
    if row is None:  # deleted between the two reads
        return None
    sid = secrets.token_urlsafe(18)
    expires = int((time.time() if now is None else now) + SESSION_SECONDS)
    value = signer.sign({"oid": int(row.id), "tb": signer.token_binding(row.token_hash),
                         "sid": sid, "exp": expires})
    return value, ConsoleSession(found, sid, expires, signer.csrf_for(sid))


def load(engine: Engine, signer: Signer, cookie: str | None, now: float | None = None
         ) -> ConsoleSession | None:
    """The session a cookie carries, or None (absent, forged, expired, operator gone)."""
    if not cookie:
        return None
    payload = signer.unsign(cookie)
    if payload is None:
        return None
    oid, binding, sid, expires = (payload.get(k) for k in ("oid", "tb", "sid", "exp"))
    if not (isinstance(oid, int) and isinstance(binding, str) and isinstance(sid, str)
            and isinstance(expires, int)):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    with snapshot(engine) as conn:
        row = conn.execute(select(operators.c.name, operators.c.role, operators.c.token_hash)
                           .where(operators.c.id == oid, operators.c.revoked_at.is_(None))).first()
        ended = conn.execute(select(console_logouts.c.sid)
                             .where(console_logouts.c.sid == sid)).first() is not None
    if ended or row is None or not hmac.compare_digest(signer.token_binding(row.token_hash), binding):
        return None
    return ConsoleSession(Operator(row.name, row.role), sid, expires, signer.csrf_for(sid))


def log_out(engine: Engine, session: ConsoleSession, now: float | None = None) -> None:
    """End ``session`` for good: its cookie, copied or not, opens nothing any more."""
    now_s = int(time.time() if now is None else now)
    with engine.begin() as conn:
        conn.execute(delete(console_logouts).where(console_logouts.c.expires_at <= now_s))
        if session.expires_at > now_s:
            bulk_insert(conn, console_logouts, [{"sid": session.sid, "expires_at": session.expires_at}],
                        ignore_conflicts=True)
