"""Ingest: validated submissions → dedup → record + outbox + audit, in one transaction.

This is the only writer of partner records.  A call takes one request's (or one file chunk's)
submissions and commits them together, so a 2xx always means committed (SPEC §7), while one
bad record never fails its neighbours: it is answered ``rejected`` and kept in ``rejections``
for revalidation.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import IntegrityError
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from contracts import CERecord, CESubmission, Note, RecordAnswer, RecordStatus, Source
from contracts.errors import message
from gateway import audit
from gateway.masking import mask_id
from gateway.pipeline import credit, dedup
from gateway.pipeline.validate import Validated, validate_submission
from gateway.store.tables import natural_keys, outbox, record_versions, records, rejections
from gateway.store.util import insert_ignore


@dataclass(frozen=True)
class PartnerRef:
    partner_id: str
    adapter: str
    base_code: str | None = None


@dataclass
class _Context:
    conn: Connection
    partner: PartnerRef
    now: datetime
    batch_id: str | None
    events: list[audit.Event] = field(default_factory=list)


def new_record_id() -> str:
    return "R" + uuid.uuid4().hex[:24]


def _error(code: str, field_name: str | None = None, detail: str | None = None) -> Note:
    en, zh = message(code)
    return Note(
        code=code, field=field_name, message=f"{en} {detail}" if detail else en, message_zh=zh
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def ingest(
    engine: Engine,
    partner: PartnerRef,
    raws: Sequence[object],
    *,
    batch_id: str | None = None,
    now: datetime | None = None,
) -> list[RecordAnswer]:
    """Judge and store ``raws`` (dicts from JSON) for ``partner``; one answer per input."""
    now = now or datetime.now(UTC)
    validated = [validate_submission(raw) for raw in raws]
    for attempt in Retrying(
        retry=retry_if_exception_type(IntegrityError), stop=stop_after_attempt(3), reraise=True
    ):
        with attempt:
            # A concurrent twin of this request (same partner, same source ids) may commit
            # first; the retry then sees its rows and answers duplicate/corrected.
            return _ingest_tx(engine, partner, raws, validated, batch_id, now)
    raise AssertionError("unreachable")  # pragma: no cover


def _ingest_tx(
    engine: Engine,
    partner: PartnerRef,
    raws: Sequence[object],
    validated: list[Validated],
    batch_id: str | None,
    now: datetime,
) -> list[RecordAnswer]:
    with engine.begin() as conn:
        ctx = _Context(conn, partner, now, batch_id)
        answers = [
            _ingest_one(ctx, index, raw, v.submission, v.errors, v.warnings)
            for index, (raw, v) in enumerate(zip(raws, validated, strict=True))
        ]
        audit.append(conn, ctx.events, now)
    return answers


def _source_id_of(raw: object) -> str | None:
    if isinstance(raw, dict):
        value = raw.get("source_record_id")
        return str(value)[:64] if value is not None else None
    return None


def _reject(
    ctx: _Context, index: int, raw: object, errors: list[Note], warnings: list[Note]
) -> RecordAnswer:
    source_id = _source_id_of(raw)
    ctx.conn.execute(
        insert(rejections).values(
            partner_id=ctx.partner.partner_id,
            adapter=ctx.partner.adapter,
            source_record_id=source_id,
            batch_id=ctx.batch_id,
            payload=_dumps(raw),
            errors=_dumps([e.model_dump(mode="json") for e in errors]),
            status="open",
            received_at=ctx.now,
        )
    )
    ctx.events.append(
        audit.Event(
            "rejected",
            actor=ctx.partner.partner_id,
            detail={
                "source_record_id": source_id,
                "codes": [e.code for e in errors],
                "fields": [e.field for e in errors],
            },
        )
    )
    return RecordAnswer(
        index=index,
        source_record_id=source_id,
        status=RecordStatus.REJECTED,
        errors=errors,
        warnings=warnings,
    )


def _build_record(
    ctx: _Context,
    sub: CESubmission,
    record_id: str,
    version: int,
    warnings: list[Note],
    withdrawn: bool = False,
) -> CERecord:
    hours, notes = credit.convert(sub)
    return CERecord(
        record_id=record_id,
        version=version,
        withdrawn=withdrawn,
        source=Source(
            partner_id=ctx.partner.partner_id,
            adapter=ctx.partner.adapter,
            source_record_id=sub.source_record_id,
            batch_id=ctx.batch_id,
            received_at=ctx.now,
        ),
        person=sub.person,
        year=sub.year,
        category=sub.category,
        activity_type=sub.activity_type,
        activity=sub.activity,
        claimed=sub.claimed,
        credited_hours=Decimal(0) if withdrawn else hours,
        rule_notes=notes,
        evidence=sub.evidence,
        warnings=warnings,
    )


def _store_version(ctx: _Context, record: CERecord, chash: str, queue: bool) -> None:
    ctx.conn.execute(
        insert(record_versions).values(
            record_id=record.record_id,
            version=record.version,
            content_hash=chash,
            payload=record.model_dump_json(),
            created_at=ctx.now,
        )
    )
    if queue:
        ctx.conn.execute(
            insert(outbox).values(
                record_id=record.record_id,
                version=record.version,
                status="pending",
                attempts=0,
                created_at=ctx.now,
                updated_at=ctx.now,
            )
        )
        ctx.events.append(audit.Event("queued", record.record_id, record.version))


def _submission_of(payload: str) -> CESubmission:
    rec = CERecord.model_validate_json(payload)
    return CESubmission(
        source_record_id=rec.source.source_record_id,
        person=rec.person,
        year=rec.year,
        category=rec.category,
        activity_type=rec.activity_type,
        activity=rec.activity,
        claimed=rec.claimed,
        evidence=rec.evidence,
    )


def _current_payload(conn: Connection, record_id: str, version: int) -> str:
    return str(
        conn.execute(
            select(record_versions.c.payload).where(
                record_versions.c.record_id == record_id, record_versions.c.version == version
            )
        ).scalar_one()
    )


def _scope_errors(partner: PartnerRef, sub: CESubmission) -> list[Note]:
    """A partner registered for a base may only report that base's activities (SPEC §7)."""
    provider = sub.activity.provider_code
    if partner.base_code and provider and provider != partner.base_code:
        return [_error("SCOPE_VIOLATION", "activity.provider_code",
                       f"(partner is registered for base {partner.base_code})")]
    return []


def _ingest_one(
    ctx: _Context,
    index: int,
    raw: object,
    sub: CESubmission | None,
    errors: list[Note],
    warnings: list[Note],
) -> RecordAnswer:
    if sub is not None and not errors:
        errors = _scope_errors(ctx.partner, sub)
    if sub is None or errors:
        return _reject(ctx, index, raw, errors, warnings)
    chash = dedup.content_hash(sub)
    existing = (
        ctx.conn.execute(
            select(records).where(
                records.c.partner_id == ctx.partner.partner_id,
                records.c.source_record_id == sub.source_record_id,
            )
        )
        .mappings()
        .first()
    )
    if existing is not None:
        return _resubmitted(ctx, index, sub, chash, warnings, existing)
    return _first_seen(ctx, index, sub, chash, warnings)


def _answer(
    index: int,
    sub: CESubmission,
    status: RecordStatus,
    record_id: str,
    version: int,
    warnings: list[Note],
    errors: list[Note] | None = None,
) -> RecordAnswer:
    return RecordAnswer(
        index=index,
        source_record_id=sub.source_record_id,
        status=status,
        record_id=record_id,
        version=version,
        warnings=warnings,
        errors=errors or [],
    )


def _owner_of(ctx: _Context, key: str, record_id: str) -> str:
    """Claim ``key`` for ``record_id`` unless someone holds it; returns the holder."""
    # ON CONFLICT DO NOTHING: two replicas racing for one key cannot both win it.
    insert_ignore(ctx.conn, natural_keys, {"natural_key": key, "record_id": record_id})
    holder = ctx.conn.execute(
        select(natural_keys.c.record_id).where(natural_keys.c.natural_key == key)
    ).scalar_one()
    if holder == record_id:
        return record_id
    owner = (
        ctx.conn.execute(
            select(records.c.withdrawn, records.c.status).where(records.c.record_id == holder)
        )
        .mappings()
        .first()
    )
    if owner is None or owner["withdrawn"]:
        # A withdrawn record gives its activity back: the newcomer becomes the holder.
        ctx.conn.execute(
            update(natural_keys)
            .where(natural_keys.c.natural_key == key)
            .values(record_id=record_id)
        )
        return record_id
    return str(holder)


def _judge_against_owner(ctx: _Context, sub: CESubmission, owner_id: str) -> RecordStatus:
    row = ctx.conn.execute(
        select(records.c.current_version).where(records.c.record_id == owner_id)
    ).scalar_one()
    owner_sub = _submission_of(_current_payload(ctx.conn, owner_id, int(row)))
    return RecordStatus.DUPLICATE if dedup.same_claim(sub, owner_sub) else RecordStatus.CONFLICT


def _first_seen(
    ctx: _Context, index: int, sub: CESubmission, chash: str, warnings: list[Note]
) -> RecordAnswer:
    record_id = new_record_id()
    key = dedup.natural_key(sub)
    owner_id = _owner_of(ctx, key, record_id)
    status = (
        RecordStatus.ACCEPTED if owner_id == record_id else _judge_against_owner(ctx, sub, owner_id)
    )
    ctx.conn.execute(
        insert(records).values(
            record_id=record_id,
            partner_id=ctx.partner.partner_id,
            adapter=ctx.partner.adapter,
            source_record_id=sub.source_record_id,
            current_version=1,
            status=status.value,
            withdrawn=False,
            duplicate_of=None if owner_id == record_id else owner_id,
            natural_key=key,
            content_hash=chash,
            person_key=dedup.person_key(sub),
            year=sub.year,
            batch_id=ctx.batch_id,
            created_at=ctx.now,
            updated_at=ctx.now,
        )
    )
    record = _build_record(ctx, sub, record_id, 1, warnings)
    ctx.events.append(
        audit.Event(
            "received",
            record_id,
            1,
            ctx.partner.partner_id,
            {
                "source_record_id": sub.source_record_id,
                "person": mask_id(sub.person.id_number),
                "credited_hours": str(record.credited_hours),
                "batch_id": ctx.batch_id,
                "warnings": [w.code for w in warnings],
            },
        )
    )
    errors: list[Note] = []
    if status is RecordStatus.DUPLICATE:
        ctx.events.append(audit.Event("duplicate", record_id, 1, detail={"duplicate_of": owner_id}))
    elif status is RecordStatus.CONFLICT:
        errors = [_error("CONFLICT_WITH_EXISTING", "claimed", f"(record {owner_id})")]
        ctx.events.append(
            audit.Event("conflict", record_id, 1, detail={"conflicts_with": owner_id})
        )
    _store_version(ctx, record, chash, queue=status is RecordStatus.ACCEPTED)
    return _answer(index, sub, status, record_id, 1, warnings, errors)


def _resubmitted(
    ctx: _Context, index: int, sub: CESubmission, chash: str, warnings: list[Note], existing: Any
) -> RecordAnswer:
    record_id, version = str(existing["record_id"]), int(existing["current_version"])
    if existing["content_hash"] == chash and not existing["withdrawn"]:
        ctx.events.append(
            audit.Event(
                "duplicate", record_id, version, ctx.partner.partner_id, {"resend_of": record_id}
            )
        )
        return _answer(index, sub, RecordStatus.DUPLICATE, record_id, version, warnings)
    version += 1
    status = RecordStatus(existing["status"])
    if existing["duplicate_of"]:
        # It was judged against another source's report: judge the correction the same way.
        status = _judge_against_owner(ctx, sub, str(existing["duplicate_of"]))
    ctx.conn.execute(
        update(records)
        .where(records.c.record_id == record_id)
        .values(
            current_version=version,
            content_hash=chash,
            withdrawn=False,
            status=status.value,
            updated_at=ctx.now,
        )
    )
    record = _build_record(ctx, sub, record_id, version, warnings)
    ctx.events.append(
        audit.Event(
            "corrected",
            record_id,
            version,
            ctx.partner.partner_id,
            {
                "previous_version": version - 1,
                "credited_hours": str(record.credited_hours),
                "judged": status.value,
            },
        )
    )
    _store_version(ctx, record, chash, queue=status is RecordStatus.ACCEPTED)
    answer_status = RecordStatus.CORRECTED if status is RecordStatus.ACCEPTED else status
    errors = (
        [_error("CONFLICT_WITH_EXISTING", "claimed")] if status is RecordStatus.CONFLICT else []
    )
    return _answer(index, sub, answer_status, record_id, version, warnings, errors)


def withdraw(
    engine: Engine, partner: PartnerRef, source_record_id: str, now: datetime | None = None
) -> RecordAnswer | None:
    """Withdraw a partner's record: a new version with ``withdrawn = true``, forwarded."""
    now = now or datetime.now(UTC)
    with engine.begin() as conn:
        ctx = _Context(conn, partner, now, None)
        existing = (
            conn.execute(
                select(records).where(
                    records.c.partner_id == partner.partner_id,
                    records.c.source_record_id == source_record_id,
                )
            )
            .mappings()
            .first()
        )
        if existing is None:
            return None
        record_id, version = str(existing["record_id"]), int(existing["current_version"])
        if existing["withdrawn"]:
            return RecordAnswer(
                index=0,
                source_record_id=source_record_id,
                status=RecordStatus.DUPLICATE,
                record_id=record_id,
                version=version,
            )
        current = CERecord.model_validate_json(_current_payload(conn, record_id, version))
        record = current.model_copy(
            update={
                "version": version + 1,
                "withdrawn": True,
                "credited_hours": Decimal(0),
                "source": current.source.model_copy(update={"received_at": now}),
            }
        )
        conn.execute(
            update(records)
            .where(records.c.record_id == record_id)
            .values(current_version=version + 1, withdrawn=True, updated_at=now)
        )
        ctx.events.append(
            audit.Event(
                "withdrawn",
                record_id,
                version + 1,
                partner.partner_id,
                {"source_record_id": source_record_id},
            )
        )
        # Only a record the management system has (or will have) needs the withdrawal.
        _store_version(
            ctx, record, existing["content_hash"], queue=existing["status"] == "accepted"
        )
        audit.append(conn, ctx.events, now)
    return RecordAnswer(
        index=0,
        source_record_id=source_record_id,
        status=RecordStatus.ACCEPTED,
        record_id=record_id,
        version=version + 1,
    )
