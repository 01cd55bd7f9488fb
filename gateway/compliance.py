"""The compliance read-model (SPEC §4 R1): one person's year against 135 = 45 + 90 hours.

Reads the rules' verdicts kept on each record (category, type, hours before and after caps),
so it answers from one indexed query on ``(person_key, counts_year)``: current, accepted,
not withdrawn records only — a duplicate or a conflict never counts twice.

The same query joins each record's *current* version to its delivery (the ``outbox`` row of
``(record_id, current_version)``, found by its unique index), because the management system
counts what it applied, not what we accepted.  A current version it refused for good — dead-
lettered ``DOWNSTREAM_REJECTED`` (a per-record ``rejected`` receipt, or a 4xx on the record
alone) — is left out of the totals and listed under ``not_counted`` with the code and the
reason.  The management system may still count an earlier version of it that it applied:
that version's credited hours count in the totals (under its own category and type) and are
named beside the record (``applied_version``, ``applied_hours``), since the report must say
what the management system counts.  A version dead-lettered ``RETRIES_EXHAUSTED`` still
counts: the failure was ours or transient, and ops reprocess it.  Reprocessing puts the row
back to ``pending`` with its code cleared, so the record counts again at once (and stays
counted once delivered).

A record not counted here — withdrawn, or a repeat or conflict of another report — whose
withdrawal or 0-hour version the management system refused for good is listed under
``refused_changes`` with the last version the management system applied and the hours it
counts for it, and ops must resolve it there.  Those hours are in the totals of the person and
year they count for there, as a ``not_counted`` record's applied hours are (R10 holds their cap
share too, gateway.pipeline.caps.refused_pins): the report says what the management system
counts.  One it never applied a counting version of counts nowhere, as here: nothing to
resolve, so it is not listed (its dead letter still is).  An older refused version does not
stop a delivered current one counting.

May touch nothing: it reads ``refused_pins``, ``records`` and ``outbox`` (and, for the rare
records whose current version was refused, ``record_versions``).  The pydantic models below are the
HTTP answer's schema (``GET /v1/compliance/{id_number}/{year}``).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import Connection, and_, or_, select

from gateway.errors import PayloadRejected
from gateway.masking import mask_id, mask_text
from gateway.person_keys import PersonKeys
from gateway.pipeline.caps import REFUSED_FOR_GOOD, Applied, last_applied, refusals
from gateway.pipeline.credit import compliance_gap
from gateway.pipeline.identity import resident_id_findings
from gateway.pipeline.rules_tables import REQUIREMENT
from gateway.store.tables import outbox, records, refused_pins

__all__ = ["NOT_COUNTED_CODES", "ComplianceRecord", "ComplianceReport", "NotCountedRecord",
           "RefusedChange", "check_person", "report"]

ZERO = Decimal(0)
ONE_PLACE = Decimal("0.1")

# The outbox's states (gateway/ops/deliveries.py OUTBOX_STATUSES); null: no delivery queued.
DeliveryState = Literal["pending", "delivered", "dead", "superseded"]
# Dead-letter codes that mean "the management system will never count this version": the
# caps ledger leaves the same records out of its allocation (R10).
NOT_COUNTED_CODES = REFUSED_FOR_GOOD


# -- the answer's schema ------------------------------------------------------------------------

class Requirement(BaseModel):
    total: int
    public: int
    professional: int


class CreditedHours(BaseModel):
    total: str = Field(examples=["98.0"])
    public: str
    professional: str


class ClaimedHours(BaseModel):
    public: str
    professional: str


class MissingHours(BaseModel):
    public: str
    professional: str
    total: str


class TypeHours(BaseModel):
    claimed: str
    credited: str


class _RecordHours(BaseModel):
    record_id: str
    partner_id: str
    adapter: str
    source_record_id: str
    category: str | None
    activity_type: str | None
    completed_on: date | None
    hours: str = Field(description="hours after conversion, before caps")


class ComplianceRecord(_RecordHours):
    """A record that counts, with the state of its current version's delivery."""

    credited_hours: str = Field(description="hours after caps (R10)")
    capped: bool
    delivery: DeliveryState | None = Field(
        description="the current version's delivery (outbox) state; null: none queued")
    delivery_code: str | None = Field(
        description="the dead-letter code (RETRIES_EXHAUSTED) when dead-lettered, else null")


class _Refused(_RecordHours):
    """A record whose last version sent the management system refused for good."""

    version: int = Field(description="the refused version: the current one, or the last one "
                                     "sent when a later one was not (it did not count)")
    delivery: Literal["dead"]
    delivery_code: str = Field(examples=["DOWNSTREAM_REJECTED"])
    reason: str = Field(description="the management system's reason, identity numbers masked")


class NotCountedRecord(_Refused):
    """A record left out: the management system refused its current version for good.

    It may still count an earlier version it applied: those hours (``applied_hours``) are in
    the report's totals, as they are in its count.
    """

    credited_hours: str = Field(description="what it would have counted")
    applied_version: int | None = Field(
        default=None, description="the last version the management system applied; null: none")
    applied_hours: str | None = Field(
        default=None, description="the credited hours of that version, which it still counts "
                                  "and the totals include; null when none was applied or its "
                                  "payload was pruned")


class RefusedChange(_Refused):
    """A record no longer counted here whose change the management system refused for good.

    Its withdrawal, or the 0-hour version that told the management system it stopped counting
    (``NOT_COUNTED``: it became a repeat or a conflict of another report), was dead-lettered
    ``DOWNSTREAM_REJECTED``: the management system still counts the version before it, and
    so do the totals (for the person and year it counts for).  Ops resolve it there and
    reprocess.
    """

    status: Literal["withdrawn", "duplicate", "conflict"] = Field(
        description="what the record is here: withdrawn, or a repeat or conflict of another")
    applied_version: int = Field(description="the last version the management system applied")
    applied_hours: str | None = Field(
        description="the credited hours of that version, which it still counts and the totals "
                    "include; null when its payload was pruned (retention) by a stub that "
                    "kept no counts")


class ComplianceReport(BaseModel):
    """One person's CE year (SPEC §4 R1), identity number masked."""

    person: str
    year: int
    requirement: Requirement
    credited: CreditedHours
    claimed: ClaimedHours
    by_type: dict[str, TypeHours]
    by_partner: dict[str, str]
    missing: MissingHours
    compliant: bool
    records: list[ComplianceRecord]
    not_counted: list[NotCountedRecord]
    refused_changes: list[RefusedChange] = Field(
        default_factory=list,
        description="records not counted here whose withdrawal or 0-hour version the "
                    "management system refused: it may still count their earlier hours")


# -- the read-model -----------------------------------------------------------------------------

def check_person(id_number: str, id_type: str = "resident_id") -> None:
    """Refuse an identity number no record can hold, before answering "no hours" for it.

    A typo must not read as a person without hours: a resident id is checked (GB 11643),
    any id is at most 32 characters.  :class:`PayloadRejected`, coded and masked, otherwise.
    """
    if "\x00" in id_number or len(id_number) > 32:
        raise PayloadRejected("SCHEMA", field="id_number", detail="(at most 32 characters)",
                              detail_zh="（最多32个字符）")
    if id_type == "resident_id":
        invalid = [f for f in resident_id_findings(id_number) if f.code == "ID_NUMBER_INVALID"]
        if invalid:
            raise PayloadRejected("ID_NUMBER_INVALID", field="id_number",
                                  detail=f"({invalid[0].detail})", detail_zh=f"（{invalid[0].detail_zh}）")


def _with_applied(entry: dict[str, Any], applied: Applied | None) -> dict[str, Any]:
    return {**entry, "applied_version": applied.version if applied else None,
            "applied_hours": None if applied is None or applied.hours is None
            else _h(applied.hours)}


def _h(value: Decimal) -> str:
    """Hours as the contract writes them: one decimal place."""
    return str(value.quantize(ONE_PLACE))


def report(conn: Connection, id_number: str, year: int, id_type: str = "resident_id", *,
           keys: PersonKeys) -> dict[str, Any]:
    """One person's year, shaped as :class:`ComplianceReport` (one query; see the module doc).

    A record counts when it is current, accepted, not withdrawn and its current version was
    not refused for good downstream (:data:`NOT_COUNTED_CODES`); refused ones are listed
    under ``not_counted`` instead.  Older versions' deliveries are not consulted.  A record
    not counted here (withdrawn, a repeat, a conflict) whose current version was refused so is
    listed under ``refused_changes``: the management system may still count it.  A refused
    record's last applied version counts in the totals of the person and year it counts for
    there; one a refused correction moved away from them is found by its pin
    (``refused_pins``) and listed under ``not_counted`` here too.
    """
    # The current version's delivery, by the outbox's unique (record_id, version) index; outer,
    # so a record with no delivery queued still shows (its ``delivery`` is null).
    on_current = and_(outbox.c.record_id == records.c.record_id,
                      outbox.c.version == records.c.current_version)
    me = keys.of(id_type, id_number)
    mine = and_(records.c.person_key == me, records.c.counts_year == year)
    counted_or_refused = or_(
        and_(records.c.status == "accepted", records.c.withdrawn.is_(False)),
        and_(outbox.c.status == "dead", outbox.c.error_code.in_(NOT_COUNTED_CODES)))
    # Refused corrections that moved a record away from this person or year, while the
    # management system still counts its applied version here (caps.refused_pins).
    pinned = list(conn.execute(select(refused_pins.c.record_id).where(
        refused_pins.c.person_key == me, refused_pins.c.year == year)).scalars())
    rows = conn.execute(
        select(records.c.record_id, records.c.current_version, records.c.partner_id,
               records.c.adapter, records.c.source_record_id, records.c.category,
               records.c.activity_type, records.c.hours, records.c.credited_hours,
               records.c.cap_type, records.c.completed_on, records.c.status,
               records.c.withdrawn, records.c.person_key, records.c.counts_year,
               outbox.c.status.label("delivery"), outbox.c.error_code, outbox.c.last_error)
        .select_from(records.outerjoin(outbox, on_current))
        .where(or_(and_(mine, counted_or_refused), records.c.record_id.in_(pinned)) if pinned
               else and_(mine, counted_or_refused))
        .order_by(records.c.completed_on, records.c.record_id)).all()
    # A pinned record whose current version was never sent (a correction into a repeat of a
    # record no longer counted): the refusal of the last version sent is what stands there.
    later = refusals(conn, [r.record_id for r in rows if r.record_id in pinned and not (
        r.delivery == "dead" and r.error_code in NOT_COUNTED_CODES)]) if pinned else {}
    credited: dict[str, Decimal] = defaultdict(Decimal)
    claimed: dict[str, Decimal] = defaultdict(Decimal)
    by_type: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    by_partner: dict[str, Decimal] = defaultdict(Decimal)
    items: list[dict[str, Any]] = []
    not_counted: list[dict[str, Any]] = []
    refused_changes: list[dict[str, Any]] = []
    for r in rows:
        hours, got = Decimal(r.hours or "0"), Decimal(r.credited_hours or "0")
        code = r.error_code if r.delivery == "dead" else None
        refused_version, reason = r.current_version, r.last_error
        if r.record_id in later:
            refusal = later[r.record_id]
            code, refused_version, reason = refusal.error_code, refusal.version, refusal.last_error
        base = {"record_id": r.record_id, "partner_id": r.partner_id, "adapter": r.adapter,
                "source_record_id": r.source_record_id, "category": r.category,
                "activity_type": r.activity_type, "completed_on": r.completed_on.isoformat()
                if r.completed_on else None, "hours": str(hours)}
        counted_here = r.status == "accepted" and not r.withdrawn
        if code not in NOT_COUNTED_CODES and (
                not counted_here or (r.person_key, int(r.counts_year)) != (me, year)):
            continue  # pinned here, but its refusal has been replaced since: it counts there
        if not counted_here or code in NOT_COUNTED_CODES:  # refused (for the first: the WHERE)
            refused = {**base, "version": refused_version, "delivery": "dead",
                       "delivery_code": code, "reason": mask_text(reason or "")}
            if counted_here:
                not_counted.append({**refused, "credited_hours": str(got)})
            else:  # its withdrawal, or its 0-hour version
                refused_changes.append({**refused,
                                        "status": "withdrawn" if r.withdrawn else r.status})
            continue
        credited[r.category] += got
        claimed[r.category] += hours
        by_type[r.activity_type]["claimed"] += hours
        by_type[r.activity_type]["credited"] += got
        by_partner[r.partner_id] += got
        items.append({**base, "credited_hours": str(got), "capped": got < hours,
                      "delivery": r.delivery, "delivery_code": code})
    # Refused now, but the management system may still count an earlier version of the record:
    # a refused change that it counts is listed (one it counts nothing of needs no resolving);
    # the applied hours of both count in the totals, as they do there (and as R10 pins them).
    applied = last_applied(conn, [r["record_id"] for r in (*not_counted, *refused_changes)], keys)
    refused_changes = [_with_applied(c, applied[c["record_id"]]) for c in refused_changes
                       if c["record_id"] in applied and applied[c["record_id"]].hours != ZERO]
    not_counted = [_with_applied(n, applied.get(n["record_id"])) for n in not_counted]
    for n in (*not_counted, *refused_changes):
        there = applied.get(n["record_id"])
        if there is None or not there.hours or there.category not in ("public", "professional"):
            continue
        if (there.person_key, there.year) != (me, year):
            continue  # counted there for another person or year (a correction moved it)
        credited[there.category] += there.hours
        claimed[there.category] += there.hours
        by_type[str(there.activity_type)]["claimed"] += there.hours
        by_type[str(there.activity_type)]["credited"] += there.hours
        by_partner[n["partner_id"]] += there.hours
    missing = compliance_gap(credited)
    total = credited["public"] + credited["professional"]
    return {
        "person": mask_id(id_number.strip().upper()), "year": year,
        "requirement": dict(REQUIREMENT),
        "credited": {"total": _h(total), "public": _h(credited["public"]),
                     "professional": _h(credited["professional"])},
        "claimed": {"public": _h(claimed["public"]), "professional": _h(claimed["professional"])},
        "by_type": {t: {k: _h(v) for k, v in d.items()} for t, d in sorted(by_type.items())},
        "by_partner": {p: _h(v) for p, v in sorted(by_partner.items())},
        "missing": {k: _h(v) for k, v in missing.items()},
        "compliant": all(v == ZERO for v in missing.values()),
        "records": items,
        "not_counted": not_counted,
        "refused_changes": refused_changes,
    }
