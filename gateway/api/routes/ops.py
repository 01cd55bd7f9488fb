"""Ops side of the API (operator bearer tokens): record timelines and audit verification."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy import select

from gateway import audit, compliance, reconcile
from gateway.accounts import Operator
from gateway.api.deps import operator, state_of
from gateway.errors import NotFound
from gateway.store.tables import outbox, record_versions, records

router = APIRouter(prefix="/v1", tags=["ops"])
Viewer = Annotated[Operator, Depends(operator)]


def delivery_status(record_status: str, rows: list[dict[str, Any]], version: int) -> str:
    """One word for where the record's current version stands."""
    if record_status in ("duplicate", "conflict"):
        return record_status
    for row in rows:
        if row["version"] == version:
            return str(row["status"])
    return "stored"


@router.get("/records/{record_id}", summary="A record, its delivery status and its timeline")
def get_record(record_id: str, request: Request, _: Viewer) -> dict[str, Any]:
    state = state_of(request)
    with state.engine.connect() as conn:
        # No record id holds NUL, and PostgreSQL cannot even compare one: not found, not a 500.
        rec = None if "\x00" in record_id else conn.execute(
            select(records).where(records.c.record_id == record_id)).mappings().first()
        if rec is None:
            raise NotFound(detail=f"(record {record_id})")
        versions = conn.execute(select(record_versions.c.version, record_versions.c.payload,
                                       record_versions.c.created_at)
                                .where(record_versions.c.record_id == record_id)
                                .order_by(record_versions.c.version)).mappings().all()
        deliveries = [dict(r) for r in conn.execute(
            select(outbox.c.version, outbox.c.status, outbox.c.attempts, outbox.c.error_code,
                   outbox.c.last_error, outbox.c.receipt_status, outbox.c.receipt_no,
                   outbox.c.batch_key, outbox.c.delivered_at)
            .where(outbox.c.record_id == record_id).order_by(outbox.c.version)).mappings()]
        timeline = audit.events_for(conn, [record_id])
    current = orjson.loads(versions[-1]["payload"])
    return {
        "record": current,
        "status": delivery_status(rec["status"], deliveries, int(rec["current_version"])),
        "duplicate_of": rec["duplicate_of"],
        "review_authority": rec["review_authority"],
        "reference_version": rec["reference_version"],  # the reference data that judged it
        "versions": [{"version": v["version"], "created_at": v["created_at"].isoformat()}
                     for v in versions],
        "deliveries": [{**d, "delivered_at": d["delivered_at"].isoformat() if d["delivered_at"] else None}
                       for d in deliveries],
        "timeline": timeline,
    }


@router.get("/reconciliation/{adapter}/{year}",
            summary="What the annual batch adds, corrects, conflicts with and lacks, per month")
def get_reconciliation(adapter: str, year: int, request: Request, _: Viewer) -> dict[str, Any]:
    if adapter not in ("health", "finance"):
        raise NotFound(detail="(reconciliation covers the monthly/annual partners: health, finance)")
    with state_of(request).engine.connect() as conn:
        return reconcile.report(conn, adapter, year)


@router.get("/compliance/{id_number}/{year}",
            summary="One person's year: hours credited by category and type, and what is missing")
def get_compliance(id_number: str, year: int, request: Request, _: Viewer) -> dict[str, Any]:
    if "\x00" in id_number or len(id_number) > 32:
        raise NotFound(detail="(no such person)")
    with state_of(request).engine.connect() as conn:
        return compliance.report(conn, id_number, year)


@router.get("/audit", summary="Audit events of a record")
def get_audit(request: Request, _: Viewer, record_id: Annotated[str, Query()]) -> dict[str, Any]:
    if "\x00" in record_id:  # no record id holds NUL; PostgreSQL cannot compare one
        return {"items": [], "total": 0, "next": None}
    with state_of(request).engine.connect() as conn:
        items = audit.events_for(conn, [record_id])
    return {"items": items, "total": len(items), "next": None}


@router.get("/audit/verify", summary="Walk the hash chain; name the first bad event")
def verify_audit(request: Request, _: Viewer) -> dict[str, Any]:
    with state_of(request).engine.connect() as conn:
        return audit.verify(conn).as_dict()
