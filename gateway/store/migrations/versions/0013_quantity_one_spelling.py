"""Dedup keys of stored records follow the claimed quantity's one spelling ("2.50" → "2.5").

``Claimed.quantity`` is now written in one canonical form (no trailing zeros, no exponent, 0
for -0), so a resend that spells the same number otherwise is a ``duplicate`` rather than a
correction forwarded again (SPEC §7 "Dedup").  A record stored before kept the content hash of
the old spelling: without this migration the first resend of, say, "2.0" after the upgrade
would be judged a correction once.

For each record whose current version claims a quantity that is not in canonical form, the
submission is rebuilt from the stored payload (the record carries the submission's fields
verbatim) and its JSON hashed as the gateway hashes it.  Only when that rebuild reproduces the
stored ``records.content_hash`` exactly is the hash of the canonical spelling written; any
other record is left as it is (at worst, one resend of it is a correction, as before).
``record_versions.content_hash`` keeps, per version, the hash as it was computed then.
Retention stubs (pruned payloads) have no claim and are skipped.  Downgrade leaves the keys:
the old code reads a canonical spelling's hash as a correction once, no worse than before.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-26 15:10:00
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

# CESubmission's fields in the model's order: its JSON (and so its hash) follows this order.
_SUBMISSION_FIELDS = ("person", "year", "category", "activity_type", "activity", "claimed",
                      "evidence")
_PAGE = 2000


def _canonical(text: str) -> str | None:
    """The canonical spelling of a quantity (as ``contracts.records.canonical_decimal``)."""
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if not value:
        return "0"
    value = value.normalize()
    exponent = value.as_tuple().exponent
    return str(value.quantize(Decimal(1)) if isinstance(exponent, int) and exponent > 0 else value)


def _submission_hash(payload: dict[str, Any], quantity: str) -> str:
    submission = {"source_record_id": payload["source"]["source_record_id"],
                  **{name: payload[name] for name in _SUBMISSION_FIELDS}}
    submission["claimed"] = {**submission["claimed"], "quantity": quantity}
    return hashlib.sha256(orjson.dumps(submission)).hexdigest()


def _new_hash(content_hash: str, payload_text: str) -> str | None:
    try:
        payload = orjson.loads(payload_text)
        quantity = payload["claimed"]["quantity"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # a retention stub, or nothing we can rebuild
    canonical = _canonical(str(quantity))
    if canonical is None or canonical == quantity:
        return None
    try:
        if _submission_hash(payload, quantity) != content_hash:
            return None
        return _submission_hash(payload, canonical)
    except (KeyError, TypeError):
        return None


def upgrade() -> None:
    conn = op.get_bind()
    records = sa.table('records', sa.column('record_id', sa.String),
                       sa.column('current_version', sa.Integer),
                       sa.column('content_hash', sa.String))
    versions = sa.table('record_versions', sa.column('record_id', sa.String),
                        sa.column('version', sa.Integer), sa.column('payload', sa.Text))
    after = ""
    while True:
        page = conn.execute(
            sa.select(records.c.record_id, records.c.content_hash, versions.c.payload)
            .join(versions, sa.and_(versions.c.record_id == records.c.record_id,
                                    versions.c.version == records.c.current_version))
            .where(records.c.record_id > after)
            .order_by(records.c.record_id).limit(_PAGE)).all()
        if not page:
            return
        changes = [{"rid": rid, "h": new} for rid, old, payload in page
                   if (new := _new_hash(old, payload)) is not None]
        if changes:
            conn.execute(sa.update(records).where(records.c.record_id == sa.bindparam("rid"))
                         .values(content_hash=sa.bindparam("h")), changes)
        after = page[-1].record_id


def downgrade() -> None:
    pass
