"""Reprocess with edit: an operator corrects a field of a dead record or of a rejection.

Either way the edited submission goes through the same pipeline as a partner's — judged by the
rules (as of its original arrival, like revalidation), deduplicated, capped, stored, queued by
:func:`gateway.pipeline.ingest.ingest_items` — so an edit is a **new version**, never a patch:

* a dead record: its current version's submission with the changes becomes a correction
  (version + 1, queued); the dead delivery is marked ``superseded`` in the same transaction,
  so it is neither counted as a dead letter nor reprocessed again;
* a rejection: its raw payload with the changes is parsed again by the adapter it came
  through, exactly as :mod:`gateway.revalidate` does (its parsing and marking are reused), and
  the rejection is marked ``revalidated``.  A rejection its partner has overtaken since (a later
  submission of the same source id) is not editable: its content is no longer the partner's
  word, and stored it would undo the later one (as revalidation closes it, unread).

An edit the rules still refuse is answered with the rule's code (422) and changes nothing.  The
diff, with identity numbers masked, goes to the audit trail with the operator and the reason.

May touch: ``outbox`` (the edited record's dead row), ``records.last_batch_id`` (kept as it
was), ``rejections`` (through revalidation's marking), the audit trail; the rest via ingest.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, select, update

from contracts import Note, RecordStatus
from gateway import audit
from gateway.config import Settings
from gateway.errors import NotFound, PayloadRejected
from gateway.labels import status_zh
from gateway.last_word import stale_rejections
from gateway.masking import mask_text
from gateway.ops.common import OpsConflict, apply_changes, record_changed, refuse, require_reason
from gateway.pipeline.ingest import ingest_items
from gateway.pipeline.items import PartnerRef, RulesContext, item_from_raw, prepare
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.versions import next_version
from gateway.reference import ReferenceCache
from gateway.revalidate import (
    AlreadyTaken,
    Overtaken,
    check_still_last,
    group_entries,
    mark_outcomes,
)
from gateway.store.tables import outbox, partners, record_versions, records, rejections

__all__ = ["edit_and_requeue", "edit_rejection"]

# What a partner sends (CESubmission); the rest of a CERecord is the gateway's.
SUBMISSION_KEYS = ("person", "year", "category", "activity_type", "activity", "claimed",
                   "evidence")


def _rules(engine: Engine, settings: Settings, rules: RulesContext | None) -> RulesContext:
    if rules is not None:
        return rules
    config = RulesConfig.from_settings(settings)
    return RulesContext(ReferenceCache(engine, config.keys).current(), config)


def _refused(errors: list[Note]) -> PayloadRejected:
    """The rules refuse the edited submission: answer with the first rule's code."""
    first = errors[0]
    exc = PayloadRejected(first.code, field=first.field)
    others = "; ".join(f"{n.code} {n.field or ''}".strip() for n in errors[1:])
    exc.message = mask_text(first.message + (f" (also: {others})" if others else ""))
    # Masked as the English is; the other codes are listed in both languages.
    exc.message_zh = mask_text((first.message_zh or exc.message_zh)
                               + (f"（另有：{others}）" if others else ""))
    return exc


def _check_changes(changes: Any) -> dict[str, Any]:
    if not isinstance(changes, dict):
        raise refuse("changes", 'an object of field paths, e.g. {"activity.title": "…"}',
                     '须为以字段路径为键的对象，例如 {"activity.title": "…"}')
    return changes


def edit_and_requeue(engine: Engine, settings: Settings, record_id: str, changes: dict[str, Any],
                     *, reason: str, actor: str, rules: RulesContext | None = None,
                     expected_version: int | None = None) -> dict[str, Any]:
    """A dead record, corrected: a new version through the pipeline, queued; diff audited.

    ``expected_version``: the version the operator was shown (the console's form carries it);
    RECORD_CHANGED when another is current, so an edit never reverts a correction it never saw.
    """
    reason, actor, changes = require_reason(reason), actor[:64], _check_changes(changes)
    if "\x00" in record_id or len(record_id) > 64:
        raise NotFound(detail="(no such record)", detail_zh="（没有该记录）")
    with engine.connect() as conn:
        rec = conn.execute(select(records).where(records.c.record_id == record_id)).mappings().first()
        if rec is None:
            raise NotFound(detail=f"(record {record_id})", detail_zh=f"（记录 {record_id}）")
        version = int(rec["current_version"])
        if expected_version is not None and expected_version != version:
            raise record_changed(record_id, expected_version, version)
        row = conn.execute(select(record_versions.c.payload, record_versions.c.pruned_at).where(
            record_versions.c.record_id == record_id, record_versions.c.version == version)).one()
        dead = conn.execute(select(outbox.c.id, outbox.c.status).where(
            outbox.c.record_id == record_id, outbox.c.version == version)).first()
        base_code = conn.execute(select(partners.c.base_code).where(
            partners.c.partner_id == rec["partner_id"])).scalar()
    if rec["withdrawn"] or dead is None or dead.status != "dead":
        state = "withdrawn" if rec["withdrawn"] else (dead.status if dead else rec["status"])
        raise OpsConflict("NOT_EDITABLE", detail=f"(record {record_id} version {version} is "
                          f"{state}; only a dead delivery can be edited)",
                          detail_zh=f"（记录 {record_id} 第 {version} 版的状态为“{status_zh(state)}”；"
                          "只有投递失败的死信记录可以修改）")
    stored = orjson.loads(row.payload)
    if row.pruned_at is not None or stored.get("pruned") is True:
        raise OpsConflict("NOT_EDITABLE", detail=f"(the payload of {record_id} was pruned)",
                          detail_zh=f"（记录 {record_id} 的内容已被清除）")
    raw = {"source_record_id": stored["source"]["source_record_id"],
           **{k: stored[k] for k in SUBMISSION_KEYS if k in stored}}
    edited, diff = apply_changes(raw, changes, protected=frozenset({"source_record_id"}))
    item = item_from_raw(edited)
    partner = PartnerRef(rec["partner_id"], rec["adapter"], base_code)
    rules = _rules(engine, settings, rules)
    # Judged as of its arrival (R11), as revalidation does: a record sent in time stays in time.
    prepare(item, partner, datetime.fromisoformat(stored["source"]["received_at"]), rules)
    if item.errors:
        raise _refused(item.errors)
    now = datetime.now(UTC)

    def in_tx(conn: Connection, answers: list[Any]) -> None:
        answer = answers[0]
        if answer.status not in (RecordStatus.CORRECTED, RecordStatus.ACCEPTED) \
                or answer.record_id != record_id:
            raise refuse("changes", f"the edited record was judged {answer.status.value}, "
                         "not a correction; nothing was changed",
                         f"修改后的记录被判定为 {answer.status.value}，不是更正；未做任何更改")
        if answer.version != next_version(version, rec["version_floor"]):
            # A partner's correction was stored after this edit read version ``version``: the
            # edit of that stale content must not supersede it (the partner's stands).
            raise record_changed(record_id, version, answer.version - 1)
        moved = conn.execute(update(outbox).where(
            outbox.c.id == dead.id, outbox.c.status == "dead").values(
            status="superseded", updated_at=now)).rowcount
        if not moved:
            raise OpsConflict("NOT_EDITABLE", detail="(its delivery is no longer dead)",
                              detail_zh="（其投递已不再是死信）")
        # An ops edit is no batch's row: reconciliation keeps seeing the batch that carried it.
        conn.execute(update(records).where(records.c.record_id == record_id)
                     .values(last_batch_id=rec["last_batch_id"]))
        audit.append(conn, [audit.Event("edited", record_id, answer.version, actor, {
            "reason": reason, "diff": diff, "previous_version": version,
            "superseded_delivery": dead.id})], now)

    [answer] = ingest_items(engine, partner, [item], now=now, in_tx=in_tx, rules=rules)
    return {"record_id": record_id, "version": answer.version, "status": answer.status.value,
            "diff": diff, "warnings": [w.code for w in answer.warnings]}


def _overtaken(rejection_id: int) -> OpsConflict:
    """The partner sent the record again since (corrected, withdrawn, refused again)."""
    return OpsConflict("NOT_EDITABLE", detail=f"(the partner has sent a later submission of the "
                       f"record rejection {rejection_id} carries; edit that one, if any)",
                       detail_zh=f"（合作方此后已再次报送拒收记录 {rejection_id} 对应的记录；"
                       "如需修改，请修改最新的那一条）")


@dataclass(frozen=True)
class _EditedRow:
    """A rejection row with the edited payload, shaped as revalidation reads one."""

    id: int
    payload: str
    batch_id: str | None
    partner_id: str
    adapter: str
    source_record_id: str | None
    received_at: datetime
    row_no: int | None  # its batch file row: the edited record's rejection keeps it too


def edit_rejection(engine: Engine, settings: Settings, rejection_id: int, changes: dict[str, Any],
                   *, reason: str, actor: str, rules: RulesContext | None = None) -> dict[str, Any]:
    """An open rejection, corrected and run through the pipeline again (as revalidation)."""
    reason, actor, changes = require_reason(reason), actor[:64], _check_changes(changes)
    if not 0 < rejection_id < 2**62:
        raise NotFound(detail="(no such rejection)", detail_zh="（没有该拒收记录）")
    with engine.connect() as conn:
        row = conn.execute(select(rejections).where(rejections.c.id == rejection_id)).mappings().first()
    if row is None:
        raise NotFound(detail=f"(rejection {rejection_id})", detail_zh=f"（拒收记录 {rejection_id}）")
    if row["status"] != "open":
        raise OpsConflict("NOT_EDITABLE", detail=f"(rejection {rejection_id} is {row['status']})",
                          detail_zh=f"（拒收记录 {rejection_id} 的状态为“{status_zh(row['status'])}”）")
    try:
        raw = orjson.loads(row["payload"])
    except orjson.JSONDecodeError:
        raw = None
    if not isinstance(raw, dict):
        raise OpsConflict("NOT_EDITABLE", detail="(its stored payload is not a JSON object)",
                          detail_zh="（其保存的内容不是 JSON 对象）")
    edited, diff = apply_changes(raw, changes)
    rules = _rules(engine, settings, rules)
    fake = _EditedRow(rejection_id, orjson.dumps(edited).decode(), row["batch_id"],
                      row["partner_id"], row["adapter"], row["source_record_id"], row["received_at"],
                      row["row_no"])
    with engine.connect() as conn:
        if stale_rejections(conn, [fake]):
            raise _overtaken(rejection_id)
        [(partner, batch_id, entries)] = group_entries(conn, [fake], rules)
    item = entries[0].item
    if item.errors:
        raise _refused(item.errors)
    now = datetime.now(UTC)

    def in_tx(conn: Connection, answers: list[Any]) -> None:
        check_still_last(conn, partner, entries, now)
        mark_outcomes(conn, entries, answers, partner, batch_id, now)
        answer = answers[0]
        audit.append(conn, [audit.Event("rejection_edited", answer.record_id, answer.version, actor, {
            "rejection_id": rejection_id, "reason": reason, "diff": diff,
            "judged": answer.status.value, "source_record_id": answer.source_record_id})], now)

    try:
        [answer] = ingest_items(engine, partner, [item], batch_id=batch_id, now=now, in_tx=in_tx,
                                rules=rules)
    except Overtaken as exc:
        raise _overtaken(rejection_id) from exc
    except AlreadyTaken as exc:
        raise OpsConflict("NOT_EDITABLE", detail=f"(rejection {rejection_id} was taken by "
                          "another revalidation or edit)",
                          detail_zh=f"（拒收记录 {rejection_id} 已被另一次重新校验或修改处理）") from exc
    return {"rejection_id": rejection_id, "record_id": answer.record_id,
            "version": answer.version, "status": answer.status.value, "diff": diff,
            "errors": [e.model_dump(mode="json") for e in answer.errors],
            "warnings": [w.code for w in answer.warnings]}
