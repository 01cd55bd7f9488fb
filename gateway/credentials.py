"""Credential lifecycle: list accounts, rotate a partner's secret, disable a partner, revoke a token.

What ops do after ``partner add`` and ``operator add`` (:mod:`gateway.accounts`), each in one
transaction with its audit event (actor and the operator's reason in it, never a secret):

=========================  =====================================================================
``rotate_partner_secret``  a new secret, the same app key; the old secret is refused at once
                           (each request reads the partner's row; an upload already streaming
                           is checked again before it is admitted, ``api/deps.py``)
``set_partner_enabled``    ``active`` false: every signed request 401 ``UNAUTHENTICATED``
``revoke_operator``        the token hash replaced by one of a token nobody is shown: the token
                           and every console session bound to its hash are refused at once,
                           also by code before migration 0025 (``revoked_at`` is for the list)
``reissue_operator``       a new token (shown once); un-revokes; the old token and sessions die
=========================  =====================================================================

Disabling a disabled partner, enabling an enabled one or revoking a revoked operator changes
nothing and appends no event (``changed`` false).  A blank reason is ``SCHEMA`` (422), an
unknown partner or operator ``NOT_FOUND`` (404).

May touch: ``partners`` (``secret_enc``, ``active``, ``disabled_at``), ``operators``
(``token_hash``, ``revoked_at``), the audit trail (appended to).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from gateway import audit
from gateway.errors import NotFound, PayloadRejected
from gateway.ops.common import check_text, require_reason
from gateway.secrets_box import (
    SecretBox,
    WrongSecretKey,
    hash_token,
    new_operator_token,
    new_secret,
)
from gateway.store.db import reading
from gateway.store.tables import operators, partners


@dataclass(frozen=True)
class PartnerAccount:
    """A partner as ``partner list`` shows it: never its secret."""

    partner_id: str
    adapter: str
    base_code: str | None
    app_key: str
    enabled: bool
    created_at: datetime
    disabled_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {"partner_id": self.partner_id, "adapter": self.adapter,
                "base_code": self.base_code, "app_key": self.app_key, "enabled": self.enabled,
                "created_at": self.created_at.isoformat(),
                "disabled_at": self.disabled_at.isoformat() if self.disabled_at else None}


@dataclass(frozen=True)
class OperatorAccount:
    """An operator as ``operator list`` shows it: never its token (nor its hash)."""

    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


@dataclass(frozen=True)
class Changed:
    """What a disable, enable or revoke did: ``changed`` false when it was so already."""

    name: str
    changed: bool
    since: datetime | None = None  # when it was disabled / revoked, if it is

    def as_dict(self, key: str) -> dict[str, Any]:
        return {key: self.name, "changed": self.changed,
                "since": self.since.isoformat() if self.since else None}


@dataclass(frozen=True)
class RotatedSecret:
    partner_id: str
    app_key: str
    secret: str
    enabled: bool

    def as_dict(self) -> dict[str, Any]:
        return {"partner_id": self.partner_id, "app_key": self.app_key, "secret": self.secret,
                "enabled": self.enabled}


def list_partners(engine: Engine) -> list[PartnerAccount]:
    with reading(engine) as conn:
        rows = conn.execute(select(partners.c.partner_id, partners.c.adapter, partners.c.base_code,
                                   partners.c.app_key, partners.c.active, partners.c.created_at,
                                   partners.c.disabled_at).order_by(partners.c.partner_id)).all()
    return [PartnerAccount(r.partner_id, r.adapter, r.base_code, r.app_key, bool(r.active),
                           r.created_at, None if r.active else r.disabled_at) for r in rows]


def list_operators(engine: Engine) -> list[OperatorAccount]:
    with reading(engine) as conn:
        rows = conn.execute(select(operators.c.name, operators.c.role, operators.c.created_at,
                                   operators.c.revoked_at).order_by(operators.c.name)).all()
    return [OperatorAccount(r.name, r.role, r.created_at, r.revoked_at) for r in rows]


def _partner_row(conn: Connection, partner_id: str) -> Any:
    check_text("partner_id", partner_id)
    row = conn.execute(select(partners).where(partners.c.partner_id == partner_id)
                       .with_for_update()).first()
    if row is None:
        raise NotFound(field="partner_id", detail=f"(no partner {partner_id!r})",
                       detail_zh=f"（合作方 {partner_id!r}）")
    return row


def _operator_row(conn: Connection, name: str) -> Any:
    check_text("name", name)
    row = conn.execute(select(operators).where(operators.c.name == name).with_for_update()).first()
    if row is None:
        raise NotFound(field="name", detail=f"(no operator {name!r})", detail_zh=f"（操作员 {name!r}）")
    return row


def rotate_partner_secret(engine: Engine, box: SecretBox, partner_id: str, reason: str,
                          actor: str) -> RotatedSecret:
    """A new secret for the partner (its app key kept); the old one is refused from now on.

    The old secret must open under ``box`` first: sealed by a shell whose ``SECRET_KEY`` is not
    the deployment's, the new secret could not be read by any replica and the partner would be
    locked out (``CONFIG_INVALID``, nothing changed).  A disabled partner stays disabled.
    """
    reason = require_reason(reason)
    secret, now = new_secret(), datetime.now(UTC)
    with engine.begin() as conn:
        row = _partner_row(conn, partner_id)
        try:
            box.decrypt(row.secret_enc)
        except WrongSecretKey:
            raise PayloadRejected(
                "CONFIG_INVALID", field="CE_GATEWAY_SECRET_KEY",
                detail="(it cannot open the partner's stored secret: a new one sealed with it "
                       "would be refused by every replica; nothing changed)",
                detail_zh="（该密钥无法解开合作方已存的密钥：用它加密的新密钥任何实例都无法使用；"
                          "未做任何更改）") from None
        conn.execute(update(partners).where(partners.c.partner_id == partner_id)
                     .values(secret_enc=box.encrypt(secret)))
        audit.append(conn, [audit.Event("partner_secret_rotated", actor=actor, detail={
            "partner_id": partner_id, "app_key": row.app_key, "reason": reason})], now)
    return RotatedSecret(partner_id, row.app_key, secret, bool(row.active))


def set_partner_enabled(engine: Engine, partner_id: str, enabled: bool, reason: str,
                        actor: str) -> Changed:
    """Enable or disable a partner: a disabled one's signed requests are 401 at once."""
    reason = require_reason(reason)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = _partner_row(conn, partner_id)
        if bool(row.active) == enabled:
            return Changed(partner_id, False, None if enabled else row.disabled_at)
        conn.execute(update(partners).where(partners.c.partner_id == partner_id)
                     .values(active=enabled, disabled_at=None if enabled else now))
        detail = {"partner_id": partner_id, "app_key": row.app_key, "reason": reason}
        audit.append(conn, [audit.Event("partner_enabled", actor=actor, detail=detail) if enabled
                            else audit.Event("partner_disabled", actor=actor, detail=detail)], now)
    return Changed(partner_id, True, None if enabled else now)


def revoke_operator(engine: Engine, name: str, reason: str, actor: str) -> Changed:
    """End an operator's token and its console sessions at once (``reissue`` gives a new one)."""
    reason = require_reason(reason)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        row = _operator_row(conn, name)
        if row.revoked_at is not None:
            return Changed(name, False, row.revoked_at)
        # The hash of a token nobody is shown: the old token matches nothing, and a console
        # cookie bound to the old hash opens nothing, whatever code reads them.
        conn.execute(update(operators).where(operators.c.id == row.id)
                     .values(token_hash=hash_token(new_operator_token()), revoked_at=now))
        audit.append(conn, [audit.Event("operator_revoked", actor=actor, detail={
            "name": name, "role": row.role, "reason": reason})], now)
    return Changed(name, True, now)


def reissue_operator(engine: Engine, name: str, reason: str, actor: str) -> tuple[OperatorAccount, str]:
    """A new token for the operator (returned once), un-revoking it; the old token dies."""
    reason = require_reason(reason)
    token, now = new_operator_token(), datetime.now(UTC)
    with engine.begin() as conn:
        row = _operator_row(conn, name)
        conn.execute(update(operators).where(operators.c.id == row.id)
                     .values(token_hash=hash_token(token), revoked_at=None))
        audit.append(conn, [audit.Event("operator_reissued", actor=actor, detail={
            "name": name, "role": row.role, "reason": reason,
            "was_revoked": row.revoked_at is not None})], now)
    return OperatorAccount(name, row.role, row.created_at, None), token
