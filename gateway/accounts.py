"""Partners and operators: registration and lookup (secrets encrypted, tokens hashed).

Their later life (list, rotate, disable, revoke, reissue): :mod:`gateway.credentials`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, insert, select

from gateway import audit
from gateway.errors import PayloadRejected
from gateway.pipeline.rules_tables import BASE_ADAPTERS
from gateway.secrets_box import SecretBox, hash_token, new_app_key, new_operator_token, new_secret
from gateway.store.db import reading
from gateway.store.tables import operators, partners

ADAPTERS_WITH_PUSH = {"canonical", "training_base", "health", "finance", "cadre_college"}
ROLES = ("viewer", "operator")


class RegistrationRefused(PayloadRejected, ValueError):
    """A partner or operator that cannot be registered as given: coded ``SCHEMA`` (en + zh).

    Also a ``ValueError``, as these refusals were before they carried a code.
    """

    def __init__(self, field: str, detail: str, detail_zh: str) -> None:
        super().__init__("SCHEMA", field=field, detail=f"({detail})", detail_zh=f"（{detail_zh}）")


@dataclass(frozen=True)
class Partner:
    partner_id: str
    adapter: str
    base_code: str | None
    app_key: str
    secret: str


@dataclass(frozen=True)
class Operator:
    name: str
    role: str

    @property
    def can_act(self) -> bool:
        return self.role == "operator"


def add_partner(engine: Engine, box: SecretBox, partner_id: str, adapter: str,
                base_code: str | None = None, actor: str = "cli") -> Partner:
    known = sorted(ADAPTERS_WITH_PUSH)
    if adapter not in ADAPTERS_WITH_PUSH:
        raise RegistrationRefused("adapter", f"unknown adapter {adapter!r}; known: {', '.join(known)}",
                                  f"未知的适配器 {adapter!r}；已知的有：{'、'.join(known)}")
    if not partner_id.strip():
        raise RegistrationRefused("partner_id", "the partner id must not be empty",
                                  "合作方编号不能为空")
    if base_code is not None and not base_code.strip():
        raise RegistrationRefused("base_code", "the base code must not be empty", "基地编码不能为空")
    if adapter in BASE_ADAPTERS and base_code is None:
        # A base may only submit for its own base code (SPEC §7): without one it has none.
        raise RegistrationRefused(
            "base_code", f"a {adapter} partner needs its base code (--base-code, e.g. QHJD-001)",
            f"{adapter} 合作方须登记其基地编码（--base-code，例如 QHJD-001）")
    app_key, secret, now = new_app_key(), new_secret(), datetime.now(UTC)
    with engine.begin() as conn:
        if conn.execute(select(partners.c.partner_id).where(partners.c.partner_id == partner_id)).first():
            raise RegistrationRefused("partner_id", f"partner {partner_id!r} already exists",
                                      f"合作方 {partner_id!r} 已存在")
        conn.execute(insert(partners).values(
            partner_id=partner_id, adapter=adapter, base_code=base_code, app_key=app_key,
            secret_enc=box.encrypt(secret), active=True, created_at=now))
        audit.append(conn, [audit.Event("partner_added", actor=actor, detail={
            "partner_id": partner_id, "adapter": adapter, "base_code": base_code,
            "app_key": app_key})], now)
    return Partner(partner_id, adapter, base_code, app_key, secret)


def registration_of(engine: Engine, partner_id: str) -> tuple[str, str | None] | None:
    """The adapter and base code a partner is registered for (``None``: no such partner)."""
    with reading(engine) as conn:
        row = conn.execute(select(partners.c.adapter, partners.c.base_code)
                           .where(partners.c.partner_id == partner_id)).first()
    return None if row is None else (row.adapter, row.base_code)


def partner_by_app_key(engine: Engine, box: SecretBox, app_key: str) -> Partner | None:
    with reading(engine) as conn:  # no SQLite write lock: auth never waits on a writer
        row = conn.execute(select(partners).where(partners.c.app_key == app_key,
                                                  partners.c.active.is_(True))).mappings().first()
    if row is None:
        return None
    return Partner(row["partner_id"], row["adapter"], row["base_code"], row["app_key"],
                   box.decrypt(row["secret_enc"]))


def add_operator(engine: Engine, name: str, role: str, actor: str = "cli") -> tuple[Operator, str]:
    if role not in ROLES:
        raise RegistrationRefused("role", f"role must be one of {', '.join(ROLES)}",
                                  f"角色须为 {'、'.join(ROLES)} 之一")
    token, now = new_operator_token(), datetime.now(UTC)
    with engine.begin() as conn:
        if conn.execute(select(operators.c.id).where(operators.c.name == name)).first():
            raise RegistrationRefused(
                "name", f"operator {name!r} already exists (a new token: ce-gateway operator reissue)",
                f"操作员 {name!r} 已存在（换发令牌：ce-gateway operator reissue）")
        conn.execute(insert(operators).values(name=name, role=role, token_hash=hash_token(token),
                                              created_at=now))
        audit.append(conn, [audit.Event("operator_added", actor=actor,
                                        detail={"name": name, "role": role})], now)
    return Operator(name, role), token


def operator_by_token(engine: Engine, token: str) -> Operator | None:
    with reading(engine) as conn:
        # A revoked operator's hash was replaced (gateway/credentials.py); refused here too.
        row = conn.execute(select(operators.c.name, operators.c.role)
                           .where(operators.c.token_hash == hash_token(token),
                                  operators.c.revoked_at.is_(None))).first()
    return Operator(row.name, row.role) if row else None
