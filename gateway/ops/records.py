"""Records as ops see them: a record's page, open conflicts and their resolution, rejections.

* :func:`record_view` — what ``GET /v1/records/{id}`` answers: the current version, where its
  delivery stands, every version (pruned payloads shown as such) and the audit timeline.
* :func:`list_conflicts` / :func:`resolve_conflict` — SPEC §7: another source reported the
  same activity (natural key) with different hours; the record is held until ops choose.
  ``keep="existing"`` closes it as a duplicate of the record holding the key (nothing is
  forwarded).  ``keep="this"`` forwards it and supersedes the holder exactly as a withdrawal
  does — a withdrawn version is forwarded, its capped hours go back to its group, and the
  natural key moves — so the person is never credited twice.
* :func:`list_rejections` — the open rejections ops may fix.
* :func:`edit_and_requeue` / :func:`edit_rejection` ("reprocess with edit") live in
  :mod:`gateway.ops.edits` and are re-exported here.

May touch: ``records`` (status, key holder and withdrawal of the two records of a conflict),
``natural_keys``, and, through ingest's writer, versions, outbox, caps ledger and audit.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.orm import aliased

from gateway import audit
from gateway.accounts import ADAPTERS_WITH_PUSH
from gateway.config import Settings
from gateway.errors import NotFound
from gateway.labels import status_zh
from gateway.masking import mask_text, masked
from gateway.ops.common import (
    CURSOR_ZH,
    OpsConflict,
    check_aware,
    check_code,
    check_text,
    decode_cursor,
    encode_cursor,
    iso,
    limit_of,
    masked_source_id,
    record_changed,
    refuse,
    require_reason,
)
from gateway.ops.edits import edit_and_requeue, edit_rejection
from gateway.pipeline import caps
from gateway.pipeline.ingest import Chunk, withdrawn_version
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.succession import accept_held, succeed
from gateway.pipeline.versions import next_version
from gateway.pipeline.writer_retry import writer_retries
from gateway.store.tables import natural_keys, outbox, record_versions, records, rejections

__all__ = ["PRUNED_NOTE", "delivery_status", "edit_and_requeue", "edit_rejection",
           "list_conflicts", "list_rejections", "record_view", "resolve_conflict"]

PRUNED_NOTE = "payload pruned (已按保留期清理)"
REJECTION_STATUSES = ("open", "revalidated", "superseded")


def delivery_status(record_status: str, rows: list[dict[str, Any]], version: int) -> str:
    """One word for where the record's current version stands.

    Its delivery when it has one: a counted record that became a duplicate or a conflict is
    sent once more with no hours (NOT_COUNTED), and ops must see if that is dead.  Else a
    duplicate or conflict says so (never forwarded), and anything else is only ``stored``.
    """
    for row in rows:
        if row["version"] == version:
            return str(row["status"])
    if record_status in ("duplicate", "conflict"):
        return record_status
    return "stored"


def _is_pruned(pruned_at: datetime | None, payload: Any) -> bool:
    return pruned_at is not None or (isinstance(payload, dict) and payload.get("pruned") is True)


def record_view(conn: Connection, record_id: str) -> dict[str, Any] | None:
    """A record's page: current version, status, versions, deliveries, timeline; None if none."""
    if "\x00" in record_id or len(record_id) > 64:  # PostgreSQL cannot even compare a NUL
        return None
    rec = conn.execute(select(records).where(records.c.record_id == record_id)).mappings().first()
    if rec is None:
        return None
    versions = conn.execute(select(record_versions.c.version, record_versions.c.payload,
                                   record_versions.c.content_hash, record_versions.c.created_at,
                                   record_versions.c.pruned_at)
                            .where(record_versions.c.record_id == record_id)
                            .order_by(record_versions.c.version)).mappings().all()
    deliveries = [dict(r) for r in conn.execute(
        select(outbox.c.id, outbox.c.version, outbox.c.status, outbox.c.attempts,
               outbox.c.error_code, outbox.c.last_error, outbox.c.receipt_status,
               outbox.c.receipt_no, outbox.c.batch_key, outbox.c.created_at, outbox.c.updated_at,
               outbox.c.delivered_at)
        .where(outbox.c.record_id == record_id).order_by(outbox.c.version)).mappings()]
    current = orjson.loads(versions[-1]["payload"])
    pruned = _is_pruned(versions[-1]["pruned_at"], current)
    holder = conn.execute(select(natural_keys.c.record_id).where(
        natural_keys.c.natural_key == rec["natural_key"])).scalar()
    return {
        "record": current,
        "payload_pruned": pruned,
        "pruned_note": PRUNED_NOTE if pruned else None,
        "status": delivery_status(rec["status"], deliveries, int(rec["current_version"])),
        "record_status": rec["status"],
        "withdrawn": bool(rec["withdrawn"]),
        "current_version": int(rec["current_version"]),
        "partner_id": rec["partner_id"],
        "adapter": rec["adapter"],
        "source_record_id": rec["source_record_id"],
        "batch_id": rec["batch_id"],
        "credited_hours": rec["credited_hours"],
        "duplicate_of": rec["duplicate_of"],
        "conflicts_with": (holder or rec["duplicate_of"]) if rec["status"] == "conflict" else None,
        "review_authority": rec["review_authority"],
        "reference_version": rec["reference_version"],  # the reference data that judged it
        "versions": [{"version": v["version"], "created_at": iso(v["created_at"]),
                      "content_hash": v["content_hash"],
                      "pruned": v["pruned_at"] is not None,
                      "pruned_at": iso(v["pruned_at"])} for v in versions],
        "deliveries": [{**d, "created_at": iso(d["created_at"]), "updated_at": iso(d["updated_at"]),
                        "delivered_at": iso(d["delivered_at"]),
                        "last_error": mask_text(d["last_error"]) if d["last_error"] else None}
                       for d in deliveries],
        "timeline": audit.events_for(conn, [record_id]),
    }


# -- conflicts -------------------------------------------------------------------------------

_OTHER = aliased(records)


def list_conflicts(conn: Connection, *, cursor: str | None = None, limit: int = 50) -> dict[str, Any]:
    """Open conflicts, oldest first (a queue to work down); ``conflicts_with`` holds the key.

    One its partner withdrew is closed: there is no report left to keep.
    """
    limit = limit_of(limit)
    where = [records.c.status == "conflict", records.c.withdrawn.is_(False)]
    total = int(conn.execute(select(func.count()).select_from(records).where(*where)).scalar_one())
    holder = func.coalesce(natural_keys.c.record_id, records.c.duplicate_of)
    query = (select(records.c.record_id, records.c.partner_id, records.c.adapter,
                    records.c.source_record_id, holder.label("conflicts_with"),
                    records.c.hours, _OTHER.c.hours.label("other_hours"),
                    _OTHER.c.partner_id.label("other_partner_id"), records.c.year,
                    records.c.current_version.label("version"), records.c.created_at)
             .select_from(records.outerjoin(natural_keys,
                                            natural_keys.c.natural_key == records.c.natural_key)
                          .outerjoin(_OTHER, _OTHER.c.record_id == holder))
             .where(*where))
    after = decode_cursor(cursor, "conflicts", 1)
    if after is not None:
        query = query.where(records.c.record_id > str(after[0]))
    rows = conn.execute(query.order_by(records.c.record_id).limit(limit + 1)).mappings().all()
    items = [{**r, "created_at": iso(r["created_at"]),  # source ids may be identity numbers
              "source_record_id": masked_source_id(r["source_record_id"])} for r in rows[:limit]]
    return {"items": items, "total": total,
            "next": encode_cursor("conflicts", items[-1]["record_id"]) if len(rows) > limit else None}


def _claim_conflict(conn: Connection, record_id: str, now: datetime) -> Any:
    """The record, if it is an open conflict; the guarded UPDATE takes it before reading.

    A conflict its partner withdrew is closed: keeping it would withdraw the other source's
    record, which its own partner never took back, for a report nobody stands by any more.
    """
    taken = conn.execute(update(records).where(records.c.record_id == record_id,
                                               records.c.status == "conflict",
                                               records.c.withdrawn.is_(False))
                         .values(updated_at=now)).rowcount
    rec = conn.execute(select(records).where(records.c.record_id == record_id)).mappings().first()
    if rec is None:
        raise NotFound(detail=f"(record {record_id})", detail_zh=f"（记录 {record_id}）")
    if not taken and rec["status"] == "conflict":
        raise OpsConflict("NOT_A_CONFLICT", detail=(
            f"(record {record_id} was withdrawn by its partner: nothing to resolve)"),
            detail_zh=f"（记录 {record_id} 已被报送方撤回，无需处理）")
    if not taken:
        raise OpsConflict("NOT_A_CONFLICT", detail=f"(record {record_id} is {rec['status']})",
                          detail_zh=f"（记录 {record_id} 的状态为“{status_zh(rec['status'])}”）")
    return rec


def resolve_conflict(engine: Engine, settings: Settings, record_id: str, *, keep: str,
                     reason: str, actor: str, expected_version: int | None = None) -> dict[str, Any]:
    """Resolve an open conflict by choosing a version (see the module docstring).

    ``expected_version``: the version of the conflicting record the operator compared (the
    console's form carries it); RECORD_CHANGED, nothing done, when its partner changed it since.
    """
    if keep not in ("this", "existing"):
        raise refuse("keep", "'this' or 'existing'", "须为 'this' 或 'existing'")
    reason, actor = require_reason(reason), actor[:64]
    if "\x00" in record_id or len(record_id) > 64:
        raise NotFound(detail="(no such record)", detail_zh="（没有该记录）")
    config = RulesConfig.from_settings(settings)
    # Run again after a PostgreSQL deadlock with a chunk correcting one of its two records
    # (it holds their cap group, we hold the records): as ingest and withdrawal do.
    for attempt in writer_retries():
        with attempt:
            return _resolve(engine, config, record_id, keep, reason, actor, expected_version)
    raise AssertionError("unreachable: the last attempt re-raises")  # pragma: no cover


def _resolve(engine: Engine, config: RulesConfig, record_id: str, keep: str, reason: str,
             actor: str, expected_version: int | None) -> dict[str, Any]:
    now = datetime.now(UTC)
    with engine.begin() as conn:
        rec = _claim_conflict(conn, record_id, now)
        version = int(rec["current_version"])
        if expected_version is not None and expected_version != version:
            raise record_changed(record_id, expected_version, version)  # the claim rolls back
        holder_id = conn.execute(select(natural_keys.c.record_id).where(
            natural_keys.c.natural_key == rec["natural_key"])).scalar()
        # Locked (PostgreSQL): a correction of the holder racing us waits, or we see it.
        holder = None if holder_id in (None, record_id) else conn.execute(
            select(records).where(records.c.record_id == holder_id).with_for_update()
        ).mappings().first()
        if holder is not None and holder["natural_key"] != rec["natural_key"]:
            holder = None  # the record it conflicted with reports another activity now
        if keep == "existing" and (holder is None or holder["withdrawn"]):
            raise OpsConflict("NOT_A_CONFLICT", detail=(
                f"(no record holds {record_id}'s activity any more: it was withdrawn or "
                "corrected away; keep this one instead)"), detail_zh=(
                f"（已没有记录持有 {record_id} 所报的学习活动：原记录已撤回或已更正；请改为保留本记录）"))
        if keep == "existing":
            conn.execute(update(records).where(records.c.record_id == record_id)
                         .values(status="duplicate", duplicate_of=holder_id))
            events = [audit.Event("conflict_resolved", record_id, version, actor, {
                "keep": "existing", "reason": reason, "kept": holder_id})]
            if holder is not None:
                events.append(audit.Event("conflict_resolved", holder_id,
                                          int(holder["current_version"]), actor,
                                          {"keep": "existing", "reason": reason, "closed": record_id}))
            audit.append(conn, events, now)
            return {"record_id": record_id, "keep": keep, "status": "duplicate", "version": version,
                    "forwarded": False, "kept": holder_id, "superseded": None}
        queued = _keep_this(conn, rec, holder, config, now, reason, actor)
    return {"record_id": record_id, "keep": keep, "status": "accepted", "version": queued,
            "forwarded": True, "kept": record_id,
            "superseded": holder_id if holder is not None and not holder["withdrawn"] else None}


def _keep_this(conn: Connection, rec: Any, holder: Any, config: RulesConfig, now: datetime,
               reason: str, actor: str) -> int:
    """Accept and queue ``rec``; withdraw the holder.  Returns the version queued."""
    record_id, version = str(rec["record_id"]), int(rec["current_version"])
    chunk = Chunk(conn, PartnerRef(rec["partner_id"], rec["adapter"]), now, None, config)
    chunk.events.append(audit.Event("conflict_resolved", record_id, version, actor, {
        "keep": "this", "reason": reason,
        "superseded": holder["record_id"] if holder is not None else None}))
    supersede = holder is not None and not holder["withdrawn"]
    holder_payload = None
    if supersede:
        # What counts in a closed CE year stands (R11, notice 七(四)4), as against a partner's
        # withdrawal; retention prunes a current version only then, so a pruned holder is one too.
        closed = config.closed_year_counted(holder, now)
        if closed is None:  # the withdrawal is built from its payload
            holder_payload = orjson.loads(conn.execute(select(record_versions.c.payload).where(
                record_versions.c.record_id == holder["record_id"],
                record_versions.c.version == holder["current_version"])).scalar_one())
        if closed is not None or (holder_payload or {}).get("pruned") is True:
            year = closed or (holder_payload or {}).get("counts", {}).get("year", holder["counts_year"])
            raise OpsConflict("YEAR_CLOSED", field="keep", detail=(
                f"(record {holder['record_id']}, which this report conflicts with, counts in the "
                f"closed CE year {year}: it can no longer be withdrawn; resolve with keep=existing)"),
                detail_zh=(f"（与本记录冲突的记录 {holder['record_id']} 计入已关闭的 {year} 年度，"
                           "不能再撤回；请选择保留原有记录）"))
    # Caps (R10): the holder's hours leave its group, this record's hours join its group.
    leaving: dict[caps.Group, set[str]] = {}
    if supersede and holder["status"] == "accepted" and holder["cap_type"]:
        leaving[(holder["person_key"], int(holder["year"]), holder["cap_type"])] = {
            holder["record_id"]}
    if supersede and holder_payload is not None:
        hid = str(holder["record_id"])
        hv = next_version(int(holder["current_version"]), holder["version_floor"])
        conn.execute(update(records).where(records.c.record_id == hid).values(
            current_version=hv, withdrawn=True, credited_hours="0", duplicate_of=record_id,
            updated_at=now))
        chunk.events.append(audit.Event("superseded", hid, hv, actor, {
            "by": record_id, "reason": reason, "note": "withdrawn: a conflicting report was kept"}))
        # Only a record the management system has (or will have) needs the withdrawal.
        queue = holder["status"] == "accepted"
        chunk._store_version(hid, hv, withdrawn_version(holder_payload, hv, now),
                             holder["content_hash"], queue=queue)
        # Pinned where a refused version's predecessor counts (caps.refused_pins): the queued
        # withdrawal replaces that one there, so the pin ends and that group is freed too.
        pinned = caps.pins_of(conn, [hid]) if queue else {}
        if pinned:
            caps.write_pins(conn, [hid], [])
            for group in pinned.values():
                if group is not None:
                    leaving.setdefault(group, set()).add(hid)
    queued = accept_held(chunk, rec, leaving)
    chunk._write(with_audit=False)
    if supersede:  # the holder's other duplicates now repeat this record
        chunk.events += succeed(conn, config, now, {str(rec["natural_key"]): {str(holder["record_id"])}})
    audit.append(conn, chunk.events, now)
    return queued


# -- rejections ------------------------------------------------------------------------------


def list_rejections(conn: Connection, *, partner_id: str | None = None,
                    adapter: str | None = None, error_code: str | None = None,
                    since: datetime | None = None, until: datetime | None = None,
                    status: str | None = "open", cursor: str | None = None,
                    limit: int = 50, batch_id: str | None = None) -> dict[str, Any]:
    """Rejected submissions (open ones by default), newest first; payloads masked."""
    limit = limit_of(limit)
    if status is not None and status not in REJECTION_STATUSES:
        raise refuse("status", f"one of {', '.join(REJECTION_STATUSES)}",
                     f"须为以下之一：{'、'.join(REJECTION_STATUSES)}")
    if adapter is not None and adapter not in ADAPTERS_WITH_PUSH:
        raise refuse("adapter", f"one of {', '.join(sorted(ADAPTERS_WITH_PUSH))}",
                     f"须为以下之一：{'、'.join(sorted(ADAPTERS_WITH_PUSH))}")
    check_text("partner_id", partner_id)
    check_text("batch_id", batch_id)
    check_code(error_code)
    check_aware("since", since)
    check_aware("until", until)
    c = rejections.c
    where = []
    if status is not None:
        where.append(c.status == status)
    if partner_id is not None:
        where.append(c.partner_id == partner_id)
    if adapter is not None:
        where.append(c.adapter == adapter)
    if batch_id is not None:
        where.append(c.batch_id == batch_id)
    if error_code is not None:  # the notes' JSON as ingest wrote it (see gateway.revalidate)
        where.append(c.errors.contains(f'"code":"{error_code}"', autoescape=True))
    if since is not None:
        where.append(c.received_at >= since)
    if until is not None:
        where.append(c.received_at < until)
    total = int(conn.execute(select(func.count()).select_from(rejections).where(*where)).scalar_one())
    query = select(rejections).where(*where)
    after = decode_cursor(cursor, "rejections", 1)
    if after is not None:
        if not isinstance(after[0], int):
            raise refuse("cursor", "not a cursor this list gave out", CURSOR_ZH)
        query = query.where(c.id < after[0])
    rows = conn.execute(query.order_by(c.id.desc()).limit(limit + 1)).mappings().all()
    items = [{"id": r["id"], "partner_id": r["partner_id"], "adapter": r["adapter"],
              "source_record_id": masked_source_id(r["source_record_id"]), "batch_id": r["batch_id"],
              "row": r["row_no"],  # its batch file's row (null: no batch, or before 0028)
              "status": r["status"], "received_at": iso(r["received_at"]),
              "errors": orjson.loads(r["errors"]),
              "payload": _masked_json(r["payload"])} for r in rows[:limit]]
    return {"items": items, "total": total,
            "next": encode_cursor("rejections", items[-1]["id"]) if len(rows) > limit else None}


def _masked_json(text: str) -> Any:
    r"""The stored payload, parsed, with its identity numbers masked.

    The parsed structure is masked, not the JSON text: in the text a tab or a line break in a
    cell is a backslash escape (``630102\t1987…``), which no masking gap matches, while the
    adapters fold the white space away and read the number as valid.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return mask_text(text)
    return masked(value)
