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

An approved deferral (七(二) "应参加继续教育的学时可顺延至下一年度合并计算"; the reference
data's ``reference_deferrals``, keyed as the rules key it) merges a year Y into Y+1: Y+1's
report owes both years' 135 h (45 public, 90 professional each) and credits what counted in
both (``merged_from``, ``merged_credited``; a record R11 deferred already counts in Y+1), and
Y's report names ``deferred_to`` and is ``compliant`` as Y+1's merged judgement is.  A national
vocational skills competition award of 优胜奖 or above (R7, 四(二)5 "折算为任职期间全部专业课
学时", ``records.covers_professional``) covers the professional requirement from its year on
(``professional_covered_by``): the gateway holds no tenure dates, so the note says it holds
while the person stays in the post held at the award, which the reviewing authority confirms.

May touch nothing: it reads ``refused_pins``, ``records``, ``outbox`` and
``reference_deferrals`` (and, for the rare records whose current version was refused or a
competition record, ``record_versions``).  The pydantic models below are the
HTTP answer's schema (``GET /v1/compliance/{id_number}/{year}``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from decimal import Decimal
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field
from sqlalchemy import Connection, and_, or_, select

from gateway.errors import PayloadRejected
from gateway.masking import mask_id, mask_text
from gateway.person_keys import PersonKeys
from gateway.pipeline.caps import (
    REFUSED_FOR_GOOD,
    Applied,
    last_applied,
    last_delivered,
    refusals,
)
from gateway.pipeline.credit import compliance_gap
from gateway.pipeline.identity import resident_id_findings
from gateway.pipeline.rules_tables import DEFERRAL_REASONS, NOTICE, REQUIREMENT, DeferralInfo
from gateway.store.tables import (
    outbox,
    record_versions,
    records,
    reference_deferrals,
    refused_pins,
)

__all__ = ["NOT_COUNTED_CODES", "ComplianceRecord", "ComplianceReport", "Deferral",
           "NotCountedRecord", "ProfessionalCover", "RefusedChange", "ReportNote", "check_person",
           "covers_tenure", "report"]

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


class Deferral(BaseModel):
    """An approved deferral (七(二)): ``from_year``'s hours are computed in ``to_year``."""

    from_year: int
    to_year: int
    reason: str = Field(examples=["illness"], description="post_transfer, illness or pregnancy")
    approved_on: date


class ProfessionalCover(BaseModel):
    """The award that covers the professional requirement (R7, 四(二)5)."""

    record_id: str
    source_record_id: str
    year: int = Field(description="the award's CE year: it covers from this year on")
    completed_on: date | None
    note: str = Field(description="it holds while the person stays in the post held at the "
                                  "award (任职期间), which the reviewing authority confirms")
    note_zh: str


class ReportNote(BaseModel):
    """A rule note on the year's judgement (a deferral, an award that covers the tenure)."""

    code: Literal["DEFERRAL", "COVERS_PROFESSIONAL_REQUIREMENT"]
    message: str
    message_zh: str


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
    deferred_to: int | None = Field(
        default=None, description="an approved deferral (七(二)) moved this year's hours to "
                                  "that year, computed together there: ``compliant`` is the "
                                  "merged judgement; requirement, credited and missing are "
                                  "this year's own; null: not deferred")
    merged_from: int | None = Field(
        default=None, description="the first deferred year computed together with this one "
                                  "(七(二)): requirement and missing are the years' together "
                                  "(135 h each), credited adds their hours (merged_credited); "
                                  "records, claimed, by_type and by_partner are this year's "
                                  "own; null: nothing merged")
    merged_credited: CreditedHours | None = Field(
        default=None, description="the hours counted in the merged years, in credited")
    deferrals: list[Deferral] = Field(
        default_factory=list, description="the approved deferrals of this year or merged into it")
    professional_covered_by: ProfessionalCover | None = Field(
        default=None, description="a national competition award (R7, 四(二)5) that covers "
                                  "the professional requirement of the tenure: missing "
                                  "professional is 0; null: none")
    notes: list[ReportNote] = Field(
        default_factory=list, description="rule notes on the judgement, in English and Chinese")


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


@dataclass
class _Tally:
    """What one person's records counted in one CE year (its own, nothing merged)."""

    credited: dict[str, Decimal]
    claimed: dict[str, Decimal]
    by_type: dict[str, dict[str, Decimal]]
    by_partner: dict[str, Decimal]
    items: list[dict[str, Any]]
    not_counted: list[dict[str, Any]]
    refused_changes: list[dict[str, Any]]


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

    An approved deferral (七(二), ``reference_deferrals`` keyed as the rules key it) merges a
    year into the next: the next year owes both years' hours and credits both years' counts
    (``merged_from``, ``merged_credited``, requirement ×2); the deferred year says so
    (``deferred_to``) and is compliant as the merged judgement is.  A national competition
    award that covers the tenure's professional hours (R7, 四(二)5) covers them from its year
    on (``professional_covered_by``).  The two cost a query each, a few more for a deferral.
    """
    me = keys.of(id_type, id_number)
    own = _tally(conn, me, year, keys)
    deferrals = _deferrals(conn, id_number, keys)
    merged = _merged_years(deferrals, year)
    judged_in = year
    while judged_in in deferrals:  # the year whose merged judgement this one's is
        judged_in += 1
    award = _award(conn, me, judged_in)
    credited = dict(own.credited)
    merged_credited: dict[str, Decimal] = defaultdict(Decimal)
    for earlier in merged:
        for category, hours in _tally(conn, me, earlier, keys).credited.items():
            merged_credited[category] += hours
            credited[category] = credited.get(category, ZERO) + hours
    requirement = _requirement(1 + len(merged))
    covered = award is not None and award["year"] <= year
    missing = compliance_gap(credited, professional_covered=covered, requirement=requirement)
    compliant = all(v == ZERO for v in missing.values())
    notes: list[dict[str, str]] = []
    if merged:
        d = deferrals[year - 1]
        en, zh = DEFERRAL_REASONS.get(d.reason, (d.reason, d.reason))
        span = f"{merged[0]}–{year}" if len(merged) > 1 else f"{merged[0]} and {year}"
        span_zh = f"{merged[0]}–{year}" if len(merged) > 1 else f"{merged[0]} 与 {year}"
        notes.append({"code": "DEFERRAL", "message": (
            f"Approved deferral of {year - 1} ({en}, approved {d.approved_on}): the hours of "
            f"{span} are computed together in {year} — {requirement['total']} h owed "
            f"({NOTICE} 七(二))"), "message_zh": (
            f"{year - 1} 年度{zh}经审核确认（{d.approved_on}），应参加继续教育的学时顺延至 {year} "
            f"年度合并计算：{span_zh} 年度共应完成 {requirement['total']} 学时（{NOTICE} 七(二)）")})
    if year in deferrals:
        d = deferrals[year]
        en, zh = DEFERRAL_REASONS.get(d.reason, (d.reason, d.reason))
        compliant = _judged(conn, me, judged_in, keys, deferrals, award)
        notes.append({"code": "DEFERRAL", "message": (
            f"Approved deferral ({en}, approved {d.approved_on}): the hours of {year} are "
            f"deferred to {year + 1} and computed together there; compliant is {judged_in}'s "
            f"merged judgement ({NOTICE} 七(二))"), "message_zh": (
            f"{zh}经审核确认（{d.approved_on}），{year} 年度应参加继续教育的学时顺延至 {year + 1} "
            f"年度合并计算；是否达标以 {judged_in} 年度合并计算的结果为准（{NOTICE} 七(二)）")})
    if covered:
        assert award is not None
        notes.append({"code": "COVERS_PROFESSIONAL_REQUIREMENT", "message": award["note"],
                      "message_zh": award["note_zh"]})
    total = credited.get("public", ZERO) + credited.get("professional", ZERO)
    return {
        "person": mask_id(id_number.strip().upper()), "year": year,
        "requirement": requirement,
        "credited": {"total": _h(total), "public": _h(credited.get("public", ZERO)),
                     "professional": _h(credited.get("professional", ZERO))},
        "claimed": {"public": _h(own.claimed["public"]),
                    "professional": _h(own.claimed["professional"])},
        "by_type": {t: {k: _h(v) for k, v in d.items()} for t, d in sorted(own.by_type.items())},
        "by_partner": {p: _h(v) for p, v in sorted(own.by_partner.items())},
        "missing": {k: _h(v) for k, v in missing.items()},
        "compliant": compliant,
        "records": own.items,
        "not_counted": own.not_counted,
        "refused_changes": own.refused_changes,
        "deferred_to": year + 1 if year in deferrals else None,
        "merged_from": merged[0] if merged else None,
        "merged_credited": {
            "total": _h(merged_credited["public"] + merged_credited["professional"]),
            "public": _h(merged_credited["public"]),
            "professional": _h(merged_credited["professional"])} if merged else None,
        "deferrals": [_deferral_entry(deferrals[y]) for y in (*merged, year) if y in deferrals],
        "professional_covered_by": dict(award) if covered and award else None,
        "notes": notes,
    }


def _requirement(years: int) -> dict[str, int]:
    """R1's requirement for ``years`` CE years computed together (七(二))."""
    return {k: v * years for k, v in REQUIREMENT.items()}


def _merged_years(deferrals: dict[int, DeferralInfo], year: int) -> list[int]:
    """The earlier years whose hours ``year`` computes together with its own, oldest first.

    A deferral of Y merges Y into Y+1; one of Y+1 too takes both on into Y+2.
    """
    merged: list[int] = []
    while year - 1 - len(merged) in deferrals:
        merged.insert(0, year - 1 - len(merged))
    return merged


def _judged(conn: Connection, me: str, year: int, keys: PersonKeys,
            deferrals: dict[int, DeferralInfo], award: dict[str, Any] | None) -> bool:
    """Whether ``year``'s merged requirement is met: the compliance of the years it merges."""
    merged = _merged_years(deferrals, year)
    credited: dict[str, Decimal] = defaultdict(Decimal)
    for y in (*merged, year):
        for category, hours in _tally(conn, me, y, keys).credited.items():
            credited[category] += hours
    missing = compliance_gap(credited, requirement=_requirement(1 + len(merged)),
                             professional_covered=award is not None and award["year"] <= year)
    return all(v == ZERO for v in missing.values())


def _deferral_entry(d: DeferralInfo) -> dict[str, Any]:
    return {"from_year": d.from_year, "to_year": d.from_year + 1, "reason": d.reason,
            "approved_on": d.approved_on.isoformat()}


def _deferrals(conn: Connection, id_number: str, keys: PersonKeys) -> dict[int, DeferralInfo]:
    """The person's approved deferrals by the year deferred, as the rules look them up.

    ``reference_deferrals`` keyed by the resident-id person key of the identity number, as
    :meth:`gateway.reference.StoreReference.deferral` keys it (R11).
    """
    key = keys.of("resident_id", id_number)
    return {int(r.from_year): DeferralInfo(int(r.from_year), r.reason, r.approved_on)
            for r in conn.execute(select(reference_deferrals.c.from_year,
                                         reference_deferrals.c.reason,
                                         reference_deferrals.c.approved_on)
                                  .where(reference_deferrals.c.person_key == key))}


def _award(conn: Connection, me: str, year: int) -> dict[str, Any] | None:
    """The first award of the person's up to ``year`` that covers the tenure's professional hours.

    R7 (四(二)5): a national vocational skills competition award of 优胜奖 or above counts as
    all the professional hours of the tenure.  The gateway holds no tenure dates: it covers
    from its year on, flagged, and the reviewing authority confirms the person is still in the
    post held at the award.  A current, accepted, not withdrawn record whose current version
    the management system did not refuse for good — or, when it refused that version (a
    correction, a withdrawal) for good, the version it last applied, which it goes on counting
    (review 36: a refused title fix dropped the cover the management system still grants).

    The current version's payload decides (its ``COVERS_PROFESSIONAL_REQUIREMENT`` rule note):
    in a rolling release of migration 0023 a replica on the previous code writes a correction's
    rules columns without ``covers_professional``, which then keeps the covering version's
    ``true`` (or stays null on its inserts).  The column is trusted only once retention pruned
    the payload (``record_versions.pruned_at``); null there is not known to cover.  Competition
    records only, so the payloads read are few.
    """
    on_current = and_(outbox.c.record_id == records.c.record_id,
                      outbox.c.version == records.c.current_version)
    rows = conn.execute(
        select(records.c.record_id, records.c.source_record_id, records.c.year,
               records.c.completed_on, records.c.current_version, records.c.covers_professional,
               records.c.withdrawn, outbox.c.status.label("delivery"), outbox.c.error_code)
        .select_from(records.outerjoin(outbox, on_current))
        .where(records.c.person_key == me, records.c.year <= year,
               records.c.status == "accepted", records.c.activity_type == "competition")
        .order_by(records.c.year, records.c.completed_on, records.c.record_id)).all()
    for r in rows:
        if r.delivery == "dead" and r.error_code in NOT_COUNTED_CODES:
            # Refused for good: the management system counts the version it applied before.
            applied = last_delivered(conn, [r.record_id]).get(r.record_id)
            if applied is None or not _covers(conn, r.record_id, applied, None):
                continue
        elif r.withdrawn or not _covers(conn, r.record_id, r.current_version,
                                        r.covers_professional):
            continue
        award_year = int(r.year)
        source_id = mask_text(r.source_record_id)  # a partner's id may hold an identity number
        return {"record_id": r.record_id, "source_record_id": source_id,
                "year": award_year,
                "completed_on": r.completed_on.isoformat() if r.completed_on else None,
                "note": f"A national vocational skills competition award of {award_year} "
                        f"({source_id}) counts as all professional-subject hours of "
                        f"the tenure: it covers them from {award_year} on while the person "
                        f"stays in the post held at the award, which the reviewing authority "
                        f"confirms ({NOTICE} 四(二)5)",
                "note_zh": f"{award_year} 年度参加全国职业技能大赛获得优胜奖以上奖项"
                           f"（{source_id}），折算为任职期间全部专业课学时：自 "
                           f"{award_year} 年度起计，以仍在获奖时所任职务为限，由审核单位确认"
                           f"（{NOTICE} 四(二)5）"}
    return None


def _covers(conn: Connection, record_id: str, version: int, column: bool | None) -> bool:
    """Whether a competition record's current version covers the tenure (see :func:`_award`)."""
    row = conn.execute(select(record_versions.c.payload, record_versions.c.pruned_at).where(
        record_versions.c.record_id == record_id,
        record_versions.c.version == version)).one_or_none()
    if row is None or row.payload is None:
        return False
    body = orjson.loads(row.payload)
    if row.pruned_at is not None or body.get("pruned") is True:
        return column is True  # the payload is gone: the column is all that is left
    return covers_tenure(body)


def covers_tenure(body: object) -> bool:
    """Whether a stored version's payload says it covers the tenure (its rule note, R7)."""
    return isinstance(body, dict) and any(
        isinstance(n, dict) and n.get("code") == "COVERS_PROFESSIONAL_REQUIREMENT"
        for n in body.get("rule_notes") or ())


def _tally(conn: Connection, me: str, year: int, keys: PersonKeys) -> _Tally:
    """One person's (``me``, a person key) records of one CE year: the module doc's query."""
    # The current version's delivery, by the outbox's unique (record_id, version) index; outer,
    # so a record with no delivery queued still shows (its ``delivery`` is null).
    on_current = and_(outbox.c.record_id == records.c.record_id,
                      outbox.c.version == records.c.current_version)
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
                # A partner's id may hold an identity number: masked, as every ops list does.
                "source_record_id": mask_text(r.source_record_id), "category": r.category,
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
    return _Tally(credited, claimed, by_type, by_partner, items, not_counted, refused_changes)
