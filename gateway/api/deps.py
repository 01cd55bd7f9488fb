"""Request dependencies: the signed partner (SPEC §7) and the operator behind a bearer token."""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Request
from sqlalchemy import delete, insert
from sqlalchemy.exc import IntegrityError

from gateway.accounts import Operator, Partner, operator_by_token, partner_by_app_key
from gateway.errors import Forbidden, PayloadTooLarge, Unauthenticated
from gateway.signing import (
    HEADER_APP_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    sign_digest,
)
from gateway.state import AppState
from gateway.store.tables import nonces

MIN_NONCE_LENGTH = 16


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.gateway
    return state


async def read_body(request: Request) -> bytes:
    limit = state_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(detail=f"(limit {limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(detail=f"(limit {limit} bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - let later readers see the same bytes
    return body


def _path_with_query(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def _remember_nonce(state: AppState, app_key: str, nonce: str) -> None:
    now = datetime.now(UTC)
    window = timedelta(seconds=state.settings.signature_window_seconds)
    try:
        with state.engine.begin() as conn:
            conn.execute(insert(nonces).values(app_key=app_key, nonce=nonce, seen_at=now))
            state.nonce_inserts += 1
            if state.nonce_inserts % 500 == 0:
                # Past twice the window a replay is refused by its timestamp anyway.
                conn.execute(delete(nonces).where(nonces.c.seen_at < now - 2 * window))
    except IntegrityError as exc:
        raise Unauthenticated("REPLAYED", detail="(nonce already used)") from exc


@dataclass(frozen=True)
class SignatureHeaders:
    app_key: str
    timestamp: str
    nonce: str
    signature: str


def signature_headers(request: Request) -> SignatureHeaders:
    """The X-CE-* headers, present and within the window, before any body is read."""
    state = state_of(request)
    headers = request.headers
    app_key, ts, nonce, signature = (headers.get(HEADER_APP_KEY), headers.get(HEADER_TIMESTAMP),
                                     headers.get(HEADER_NONCE), headers.get(HEADER_SIGNATURE))
    if not (app_key and ts and nonce and signature):
        raise Unauthenticated("UNAUTHENTICATED", detail="(missing X-CE-* signature headers)")
    if len(nonce) < MIN_NONCE_LENGTH or len(nonce) > 128:
        raise Unauthenticated("UNAUTHENTICATED", detail="(nonce must be 16–128 characters)")
    try:
        skew = abs(time.time() - int(ts))
    except ValueError as exc:
        raise Unauthenticated("UNAUTHENTICATED", detail="(timestamp is not unix seconds)") from exc
    if skew > state.settings.signature_window_seconds:
        raise Unauthenticated("UNAUTHENTICATED", detail="(timestamp outside the 300 s window)")
    return SignatureHeaders(app_key, ts, nonce, signature)


def verify_signature(request: Request, sig: SignatureHeaders, body_sha256: str) -> Partner:
    """Check the signature over the body's hash; remember the nonce (replays are refused)."""
    state = state_of(request)
    partner = partner_by_app_key(state.engine, state.box, sig.app_key)
    if partner is None:
        raise Unauthenticated("UNAUTHENTICATED", detail="(unknown app key)")
    expected = sign_digest(partner.secret, request.method, _path_with_query(request),
                           sig.timestamp, sig.nonce, body_sha256)
    if not hmac.compare_digest(expected, sig.signature.lower()):
        raise Unauthenticated("UNAUTHENTICATED", detail="(signature does not match)")
    _remember_nonce(state, sig.app_key, sig.nonce)
    return partner


async def signed_partner(request: Request) -> tuple[Partner, bytes]:
    """Authenticate a partner request; returns the partner and the raw body it signed."""
    sig = signature_headers(request)
    body = await read_body(request)
    return verify_signature(request, sig, hashlib.sha256(body).hexdigest()), body


def operator(request: Request) -> Operator:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("UNAUTHENTICATED", detail="(operator bearer token required)")
    found = operator_by_token(state_of(request).engine, token.strip())
    if found is None:
        raise Unauthenticated("UNAUTHENTICATED", detail="(unknown operator token)")
    return found


def acting_operator(request: Request) -> Operator:
    found = operator(request)
    if not found.can_act:
        raise Forbidden("FORBIDDEN", detail=f"(role {found.role} may only read)")
    return found
