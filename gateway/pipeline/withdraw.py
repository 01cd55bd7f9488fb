"""A partner's withdrawal of a record (``DELETE /v1/records/{source_record_id}``, SPEC §7).

:func:`withdraw` stores a new version with ``withdrawn = true``, forwarded when the management
system has (or will have) the record.  In the same transaction the next report of its activity
takes over (:func:`gateway.pipeline.succession.succeed`) and its cap group is allocated again
(R10); its rejections still open are closed ``superseded`` (:func:`_close_rejections`).  A
record counting in a closed CE year is refused ``YEAR_CLOSED`` (R11).

It writes as ingest does, through a :class:`gateway.pipeline.ingest.Chunk`, taking the same
locks in the same order, and runs again on a lost race (:func:`writer_retries`).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from sqlalchemy import Connection, Engine, select, update

from contracts import RecordAnswer, RecordStatus
from gateway import audit
from gateway.config import Settings
from gateway.errors import PayloadRejected
from gateway.pipeline import caps
from gateway.pipeline.chunk_state import _reaches_downstream
from gateway.pipeline.ingest import Chunk, closed_year_detail, withdrawn_version
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.succession import succeed
from gateway.pipeline.versions import next_version
from gateway.pipeline.writer_retry import _KeyRaceLost, writer_retries
from gateway.store.tables import natural_keys, record_versions, records, rejections


def withdraw(engine: Engine, partner: PartnerRef, source_record_id: str,
             now: datetime | None = None, config: RulesConfig | None = None,
             ) -> RecordAnswer | None:
    """Withdraw a partner's record: a new version with ``withdrawn = true``, forwarded.

    A withdrawn record gives its capped hours back: the rest of its cap group is allocated
    again, and records that gain are re-issued (SPEC §4 R10).  None (404) when the partner has
    no record of that source id; its open rejections of it are closed ``superseded`` all the
    same (a ``rejection_withdrawn`` audit event), so revalidation never forwards what the
    partner withdrew (:func:`_close_rejections`).
    """
    now = now or datetime.now(UTC)
    for attempt in writer_retries():
        with attempt:
            return _withdraw(engine, partner, source_record_id, now, config)
    raise AssertionError("unreachable: the last attempt re-raises")  # pragma: no cover


def _withdraw(engine: Engine, partner: PartnerRef, source_record_id: str, now: datetime,
              config: RulesConfig | None) -> RecordAnswer | None:
    with engine.begin() as conn:
        # Locked (PostgreSQL) in the order chunks lock: its cap group, the record (against a
        # correction racing us), then its activity's row (against a chunk judging a report a
        # repeat of it, see Chunk._check_reads).
        mine = (records.c.partner_id == partner.partner_id,
                records.c.source_record_id == source_record_id)
        seen = conn.execute(select(records).where(*mine)).mappings().first()
        if seen is None:
            closed = _close_rejections(conn, partner, source_record_id, now)
            if not closed and conn.execute(select(records.c.record_id).where(*mine)).first():
                raise _KeyRaceLost(source_record_id)  # a revalidation made it meanwhile
            return None
        # Its groups: where it counts, and where a refused correction's applied version is
        # pinned (caps.refused_pins); the withdrawal ends the pin.
        pinned = caps.pins_of(conn, [seen["record_id"]])
        groups = {g for g in pinned.values() if g}
        if (group := caps.group_of(seen)) and seen["status"] == "accepted" and not seen["withdrawn"]:
            groups.add(group)
        caps.lock_groups(conn, groups, now)
        existing = conn.execute(select(records).where(*mine).with_for_update()).mappings().one()
        # Changed meanwhile (a promotion keeps the version but makes it count): start again.
        if any(existing[c] != seen[c] for c in ("current_version", "status", "withdrawn",
                                                "person_key", "year", "cap_type")) or (
                caps.pins_of(conn, [seen["record_id"]]) != pinned):
            raise _KeyRaceLost(str(existing["record_id"]))
        conn.execute(select(natural_keys.c.record_id).where(
            natural_keys.c.natural_key == existing["natural_key"]).with_for_update()).all()
        record_id, version = str(existing["record_id"]), int(existing["current_version"])
        if existing["withdrawn"]:
            # Sent again and refused since it was withdrawn: that rejection is withdrawn too.
            _close_rejections(conn, partner, source_record_id, now)
            return RecordAnswer(index=0, source_record_id=source_record_id,
                                status=RecordStatus.DUPLICATE, record_id=record_id, version=version)
        config = config or RulesConfig.from_settings(Settings())
        if (closed_in := config.closed_year_counted(existing, now)) is not None:
            # R11 for a withdrawal, as for a correction: its hours stand.
            raise PayloadRejected("YEAR_CLOSED", field="year", **closed_year_detail(config, closed_in))
        chunk = Chunk(conn, partner, now, None, config)
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id,
            record_versions.c.version == version)).scalar_one()
        record = orjson.loads(payload)
        if record.get("pruned") is True:  # retention only prunes a current version once its year closed
            raise PayloadRejected("YEAR_CLOSED", field="year", detail=(
                "(its payload was pruned after the year closed; it can no longer be withdrawn)"),
                detail_zh="（该记录的内容已在年度关闭后清除，不能再撤回）")
        new_version = next_version(version, existing["version_floor"])
        conn.execute(update(records).where(records.c.record_id == record_id).values(
            current_version=new_version, withdrawn=True, credited_hours="0", updated_at=now))
        chunk.events.append(audit.Event("withdrawn", record_id, new_version, partner.partner_id,
                                        {"source_record_id": source_record_id}))
        # Sent: a pinned record had a version applied, so it reaches the management system.
        chunk._store_version(record_id, new_version, withdrawn_version(record, new_version, now),
                             existing["content_hash"],
                             queue=_reaches_downstream(conn, record_id, existing["status"]))
        chunk._write(with_audit=False)
        if pinned:
            caps.write_pins(conn, [record_id], [])
        # The successor first: it joins the cap group in the allocation that lets this record
        # go, so a record behind them both is not lifted by one version and cut by the next.
        chunk.events += succeed(conn, chunk.config, now, {str(existing["natural_key"]): {record_id}})
        if groups:
            given = Chunk(conn, partner, now, None, chunk.config)
            for group in sorted(groups):  # locked above
                given._reissue(group, gone=frozenset({record_id}))
            given._write(with_audit=False)
            chunk.events += given.events
        audit.append(conn, chunk.events, now)
    return RecordAnswer(index=0, source_record_id=source_record_id, status=RecordStatus.ACCEPTED,
                        record_id=record_id, version=new_version)


def _close_rejections(conn: Connection, partner: PartnerRef, source_record_id: str,
                      now: datetime) -> int:
    """Close the partner's open rejections of ``source_record_id``: its ``DELETE`` overtook them.

    Marked ``superseded`` (revalidation's mark for a rejection a later word overtook), with one
    ``rejection_withdrawn`` audit event naming the partner (masked by the audit trail).  A
    rejection a revalidation or an ops edit took meanwhile is no longer open: the withdrawal
    runs again (:class:`_KeyRaceLost`) and finds the record it made.
    """
    mine = (rejections.c.partner_id == partner.partner_id,
            rejections.c.source_record_id == source_record_id, rejections.c.status == "open")
    ids = [int(i) for i in conn.execute(
        select(rejections.c.id).where(*mine).order_by(rejections.c.id)).scalars()]
    if not ids:
        return 0
    if conn.execute(update(rejections).where(*mine, rejections.c.id.in_(ids))
                    .values(status="superseded")).rowcount != len(ids):
        raise _KeyRaceLost(source_record_id)
    audit.append(conn, [audit.Event("rejection_withdrawn", actor=partner.partner_id, detail={
        "source_record_id": source_record_id, "rejection_ids": ids})], now)
    return len(ids)
