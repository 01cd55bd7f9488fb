"""Ops side of the API (operator bearer tokens): record timelines and audit verification.

A record's page is :func:`gateway.ops.records.record_view`; lists and actions are in
:mod:`gateway.api.routes.deliveries`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request

from contracts.records import IdType
from gateway import audit, compliance, reconcile
from gateway.accounts import Operator
from gateway.api.deps import operator, state_of
from gateway.errors import NotFound, PayloadRejected
from gateway.masking import mask_text, masked
from gateway.ops.records import record_view
from gateway.store.db import reading, snapshot

router = APIRouter(prefix="/v1", tags=["ops"])
Viewer = Annotated[Operator, Depends(operator)]
# A CE year the store can hold (SQLite integers overflow past 2**63; nothing predates 2000).
Year = Annotated[int, Path(ge=2000, le=2999)]


@router.get("/records/{record_id}", summary="A record, its delivery status and its timeline")
def get_record(record_id: str, request: Request, _: Viewer) -> dict[str, Any]:
    with snapshot(state_of(request).engine) as conn:  # the record and its deliveries at one moment
        view = record_view(conn, record_id)
    if view is None:
        shown = mask_text(record_id[:64].replace("\x00", "?"))
        raise NotFound(detail=f"(record {shown})", detail_zh=f"（记录 {shown}）")
    # Identity numbers masked, as the console's record page and `records show` show them: ops
    # read a record by its id; its person's whole number is the management system's to keep.
    shown_view: dict[str, Any] = masked(view)
    return shown_view


@router.get("/reconciliation/{adapter}/{year}",
            summary="What the annual batch adds, corrects, conflicts with and lacks, per month")
def get_reconciliation(adapter: str, year: Year, request: Request, _: Viewer) -> dict[str, Any]:
    if adapter not in reconcile.ADAPTERS:
        raise NotFound(detail="(reconciliation covers the monthly/annual partners: health, finance)",
                       detail_zh="（对账只适用于按月、按年报送的合作方：health、finance）")
    state = state_of(request)
    with snapshot(state.engine) as conn:
        return reconcile.report(conn, adapter, year, timezone=state.settings.timezone)


@router.get("/compliance/{id_number}/{year}", response_model=compliance.ComplianceReport,
            summary="One person's year: hours credited by category and type, and what is missing",
            description="Counts current, accepted, not withdrawn records whose current version "
                        "the management system did not refuse for good; those it refused "
                        "(dead-lettered DOWNSTREAM_REJECTED) are listed under `not_counted`, "
                        "and records no longer counted whose withdrawal or 0-hour version it "
                        "refused, while it still counts a version it applied, under "
                        "`refused_changes`.")
def get_compliance(id_number: str, year: Year, request: Request, _: Viewer,
                   id_type: Annotated[IdType, Query()] = IdType.RESIDENT_ID) -> dict[str, Any]:
    compliance.check_person(id_number, id_type)
    state = state_of(request)
    with snapshot(state.engine) as conn:
        return compliance.report(conn, id_number, year, id_type.value,
                                 keys=state.rules_config.keys)


@router.get("/audit", summary="Audit events of a record")
def get_audit(request: Request, _: Viewer, record_id: Annotated[str, Query()]) -> dict[str, Any]:
    if "\x00" in record_id:  # no record id holds NUL; PostgreSQL cannot compare one
        return {"items": [], "total": 0, "next": None}
    with snapshot(state_of(request).engine) as conn:
        items = audit.events_for(conn, [record_id])
    return {"items": items, "total": len(items), "next": None}


@router.get("/audit/verify", summary="Walk the hash chain; name the first bad event")
def verify_audit(request: Request, _: Viewer, anchor: Annotated[str | None, Query(
        description="SEQ:HASH, an earlier sound verify's head_seq and head_hash kept outside "
                    "the database: a chain rewritten from that event on is reported too")] = None,
                 ) -> dict[str, Any]:
    try:
        kept = None if anchor is None else audit.parse_anchor(anchor)
    except ValueError as exc:
        raise PayloadRejected("SCHEMA", field="anchor", detail=f"({exc})",
                              detail_zh="（锚点格式为 序号:哈希，即先前校验输出的 head_seq 与 "
                                        "head_hash）") from None
    with reading(state_of(request).engine) as conn:
        return audit.verify(conn, anchor=kept).as_dict()
