"""Request dependencies: the signed partner (SPEC §7) and the operator behind a bearer token.

A partner request is checked in the order that costs an attacker the most and the gateway the
least: the X-CE-* headers (present, well formed, timestamp inside the window) and the app key
(:func:`partner_of`) before a byte of the body is read; then the body, bounded by
MAX_BODY_BYTES (a batch upload streams to disk under MAX_BATCH_BYTES instead); then the HMAC
over the body's hash; then, in one transaction, the nonce (a replay is refused) and the
partner's rate limit (gateway/ratelimit.py) — counted only for requests that proved the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import delete, insert, select
from sqlalchemy.exc import IntegrityError

from gateway.accounts import Operator, Partner, operator_by_token, partner_by_app_key
from gateway.errors import Forbidden, PayloadTooLarge, Unauthenticated
from gateway.ratelimit import Limit, RateLimited, admit
from gateway.secrets_box import WrongSecretKey
from gateway.signing import (
    HEADER_APP_KEY,
    HEADER_NONCE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    sign_digest,
)
from gateway.state import AppState
from gateway.store.tables import nonces, partners

log = logging.getLogger(__name__)

MIN_NONCE_LENGTH = 16
MAX_NONCE_LENGTH = 128  # the nonces table's column
MAX_APP_KEY_LENGTH = 64  # the partners table's column
_HEX_SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


def state_of(request: Request) -> AppState:
    state: AppState = request.app.state.gateway
    return state


async def read_body(request: Request) -> bytes:
    limit = state_of(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(detail=f"(limit {limit} bytes)", detail_zh=f"（上限 {limit} 字节）")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(detail=f"(limit {limit} bytes)", detail_zh=f"（上限 {limit} 字节）")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # noqa: SLF001 - let later readers see the same bytes
    return body


def _path_with_query(request: Request) -> str:
    """The request target as the partner sent it: percent-encoded, its query in its own order."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def _signed_targets(request: Request) -> tuple[str, ...]:
    """What the signature may cover: the target, and with an empty query also ``path?``.

    The server sees no difference between ``/v1/batches`` and ``/v1/batches?`` (ASGI passes an
    empty query either way), while a client that sends the ``?`` (httpx keeps it) signs it.
    """
    target = _path_with_query(request)
    return (target, target + "?") if "?" not in target else (target,)


def _admit(state: AppState, partner: Partner, nonce: str) -> None:
    """Remember the nonce and count the request against the partner's rate limit, atomically.

    The partner is read again first: an upload streams for minutes after it was looked up, and
    a partner disabled, or given a new secret, meanwhile is refused (401) rather than admitted
    on the old copy.  A rate-limited request's nonce stays used: were it forgotten, whoever saw
    the refused request could replay it later inside the window.
    """
    now = datetime.now(UTC)
    settings = state.settings
    window = timedelta(seconds=settings.signature_window_seconds)
    app_key = partner.app_key
    wait: int | None = None
    try:
        with state.engine.begin() as conn:
            now_stored = conn.execute(select(partners.c.active, partners.c.secret_enc)
                                      .where(partners.c.app_key == app_key)).first()
            if (now_stored is None or not now_stored.active
                    or state.box.decrypt(now_stored.secret_enc) != partner.secret):
                raise Unauthenticated("UNAUTHENTICATED",
                                      detail="(the partner was disabled or its secret changed)",
                                      detail_zh="（合作方已停用或其密钥已更换）")
            conn.execute(insert(nonces).values(app_key=app_key, nonce=nonce, seen_at=now))
            if settings.rate_limit_per_minute > 0:
                wait = admit(conn, f"partner:{app_key}",
                             Limit(settings.rate_limit_per_minute, settings.rate_limit_burst))
            state.nonce_inserts += 1
            if state.nonce_inserts % 500 == 0:
                # Past twice the window a replay is refused by its timestamp anyway; the
                # timestamp is judged in whole seconds, so a nonce is kept one second longer.
                conn.execute(delete(nonces).where(nonces.c.seen_at < now - 2 * window
                                                  - timedelta(seconds=1)))
    except IntegrityError as exc:
        raise Unauthenticated("REPLAYED", detail="(nonce already used)",
                              detail_zh="（该随机数已用过）") from exc
    if wait is not None:
        raise RateLimited(wait)


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
        raise Unauthenticated("UNAUTHENTICATED", detail="(missing X-CE-* signature headers)",
                              detail_zh="（缺少 X-CE-* 签名请求头）")
    if len(app_key) > MAX_APP_KEY_LENGTH or not _printable_ascii(app_key):
        raise Unauthenticated("UNAUTHENTICATED", detail="(unknown app key)",
                              detail_zh="（未知的应用标识 AppKey）")
    if not (MIN_NONCE_LENGTH <= len(nonce) <= MAX_NONCE_LENGTH) or not _printable_ascii(nonce):
        raise Unauthenticated("UNAUTHENTICATED",
                              detail="(nonce must be 16–128 printable ASCII characters)",
                              detail_zh="（随机数须为 16–128 个可打印 ASCII 字符）")
    if not _HEX_SIGNATURE.fullmatch(signature):
        raise Unauthenticated("UNAUTHENTICATED",
                              detail="(signature must be 64 hexadecimal characters)",
                              detail_zh="（签名须为 64 位十六进制字符）")
    # Unix seconds are at most a dozen digits; anything longer (or not digits) is refused before
    # int() — a 400-digit number would overflow the float subtraction below.
    if not (ts.isascii() and ts.isdigit() and len(ts) <= 12):
        raise Unauthenticated("UNAUTHENTICATED", detail="(timestamp is not unix seconds)",
                              detail_zh="（时间戳不是 Unix 秒数）")
    # Whole seconds on both sides: a timestamp exactly the window old is inside it, as one the
    # window ahead is (SPEC §7 refuses "more than 300 s off"); the nonces are kept twice as long.
    skew = abs(int(time.time()) - int(ts))
    if skew > state.settings.signature_window_seconds:
        window = state.settings.signature_window_seconds
        raise Unauthenticated("UNAUTHENTICATED", detail=f"(timestamp outside the {window} s window)",
                              detail_zh=f"（时间戳超出 {window} 秒的有效时间窗口）")
    return SignatureHeaders(app_key, ts, nonce, signature)


def _printable_ascii(value: str) -> bool:
    return value.isascii() and value.isprintable()


_wrong_key_logged = threading.Event()


def _log_wrong_key_once() -> None:
    if not _wrong_key_logged.is_set():
        _wrong_key_logged.set()
        log.error("SECRET_KEY cannot open the partners' secrets: this replica's key differs from "
                  "the one they were stored with; every partner request is refused 401")


def partner_of(request: Request, sig: SignatureHeaders) -> Partner:
    """The active partner of the request's app key (401 for an unknown one), before any body."""
    state = state_of(request)
    try:
        partner = partner_by_app_key(state.engine, state.box, sig.app_key)
    except WrongSecretKey:
        # This replica's SECRET_KEY is not the one the store's secrets were sealed with: no
        # signature can be checked.  The partner is refused as docs/operations.md says (never a
        # 500 and a traceback per request); ops see it in the log and in /readyz (503).
        _log_wrong_key_once()
        raise Unauthenticated("UNAUTHENTICATED", detail="(the gateway cannot check this key now)",
                              detail_zh="（网关当前无法校验该应用标识的签名）") from None
    if partner is None:
        raise Unauthenticated("UNAUTHENTICATED", detail="(unknown app key)",
                              detail_zh="（未知的应用标识 AppKey）")
    return partner


def verify_signature(request: Request, sig: SignatureHeaders, body_sha256: str,
                     partner: Partner | None = None) -> Partner:
    """Check the signature over the body's hash, then the nonce and the rate limit.

    401 ``UNAUTHENTICATED`` (bad signature, unknown key), 401 ``REPLAYED``, 429 ``RATE_LIMITED``.
    ``partner`` is the one :func:`partner_of` already found, if the caller looked first.
    """
    state = state_of(request)
    partner = partner or partner_of(request, sig)
    given = sig.signature.lower()
    if not any(hmac.compare_digest(sign_digest(partner.secret, request.method, target,
                                               sig.timestamp, sig.nonce, body_sha256), given)
               for target in _signed_targets(request)):
        raise Unauthenticated("UNAUTHENTICATED", detail="(signature does not match)",
                              detail_zh="（签名不匹配）")
    _admit(state, partner, sig.nonce)
    return partner


async def signed_partner(request: Request) -> tuple[Partner, bytes]:
    """Authenticate a partner request; returns the partner and the raw body it signed."""
    sig = signature_headers(request)
    partner = await run_in_threadpool(partner_of, request, sig)
    body = await read_body(request)
    digest = hashlib.sha256(body).hexdigest()
    return await run_in_threadpool(verify_signature, request, sig, digest, partner), body


def operator(request: Request) -> Operator:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("UNAUTHENTICATED", detail="(operator bearer token required)",
                              detail_zh="（需要操作员的 Bearer 令牌）")
    found = operator_by_token(state_of(request).engine, token.strip())
    if found is None:
        raise Unauthenticated("UNAUTHENTICATED", detail="(unknown operator token)",
                              detail_zh="（未知的操作员令牌）")
    return found


def acting_operator(request: Request) -> Operator:
    found = operator(request)
    if not found.can_act:
        raise Forbidden("FORBIDDEN", detail=f"(role {found.role} may only read)",
                        detail_zh=f"（角色 {found.role} 只能查看）")
    return found
