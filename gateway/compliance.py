"""The compliance read-model (SPEC §4 R1): one person's year against 135 = 45 + 90 hours.

Reads the rules' verdicts kept on each record (category, type, hours before and after caps),
so it answers from one indexed query on ``(person_key, counts_year)``: current, accepted,
not withdrawn records only — a duplicate or a conflict never counts twice.
"""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select

from gateway.errors import PayloadRejected
from gateway.masking import mask_id
from gateway.pipeline.credit import compliance_gap
from gateway.pipeline.dedup import person_key_of
from gateway.pipeline.identity import resident_id_findings
from gateway.pipeline.rules_tables import REQUIREMENT
from gateway.store.tables import records

ZERO = Decimal(0)
ONE_PLACE = Decimal("0.1")


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


def _h(value: Decimal) -> str:
    """Hours as the contract writes them: one decimal place."""
    return str(value.quantize(ONE_PLACE))


def report(conn: Connection, id_number: str, year: int, id_type: str = "resident_id") -> dict[str, Any]:
    rows = conn.execute(
        select(records.c.record_id, records.c.partner_id, records.c.adapter,
               records.c.source_record_id, records.c.category, records.c.activity_type,
               records.c.hours, records.c.credited_hours, records.c.cap_type,
               records.c.completed_on)
        .where(records.c.person_key == person_key_of(id_type, id_number),
               records.c.counts_year == year, records.c.status == "accepted",
               records.c.withdrawn.is_(False))
        .order_by(records.c.completed_on, records.c.record_id)).all()
    credited: dict[str, Decimal] = defaultdict(Decimal)
    claimed: dict[str, Decimal] = defaultdict(Decimal)
    by_type: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    by_partner: dict[str, Decimal] = defaultdict(Decimal)
    items = []
    for r in rows:
        hours, got = Decimal(r.hours or "0"), Decimal(r.credited_hours or "0")
        credited[r.category] += got
        claimed[r.category] += hours
        by_type[r.activity_type]["claimed"] += hours
        by_type[r.activity_type]["credited"] += got
        by_partner[r.partner_id] += got
        items.append({"record_id": r.record_id, "partner_id": r.partner_id, "adapter": r.adapter,
                      "source_record_id": r.source_record_id, "category": r.category,
                      "activity_type": r.activity_type, "completed_on": r.completed_on.isoformat()
                      if r.completed_on else None, "hours": str(hours), "credited_hours": str(got),
                      "capped": got < hours})
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
    }
