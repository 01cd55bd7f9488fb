"""Ops actions and lists (SPEC §5 ops side): deliveries, reprocessing, conflicts, edits.

Reading needs an operator token of any role (``viewer``); acting needs the ``operator`` role
(:func:`gateway.api.deps.acting_operator`: 403 ``FORBIDDEN`` otherwise) and a reason, and is
audited under the operator's name.  The work is in :mod:`gateway.ops`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from gateway.accounts import Operator
from gateway.api.deps import acting_operator, operator, state_of
from gateway.errors import NotFound
from gateway.ops import deliveries, records
from gateway.ops.common import parse_when
from gateway.store.db import snapshot

router = APIRouter(prefix="/v1", tags=["ops"])
Viewer = Annotated[Operator, Depends(operator)]
Acting = Annotated[Operator, Depends(acting_operator)]
Limit = Annotated[int, Query(ge=1, le=500)]
Text = Annotated[str | None, Query(max_length=64)]


def _when(request: Request, value: str | None, name: str) -> datetime | None:
    return parse_when(value, name, state_of(request).settings.timezone)


def _any(value: str | None) -> str | None:
    """A filter field as sent: an empty one means "any", as it does in the console."""
    return value or None


def _filter(request: Request, status: str | None, adapter: str | None, partner_id: str | None,
            error_code: str | None, since: str | None, until: str | None,
            record_ids: tuple[str, ...] = ()) -> deliveries.DeliveryFilter:
    return deliveries.DeliveryFilter(status=_any(status), adapter=_any(adapter),
                                     partner_id=_any(partner_id), error_code=_any(error_code),
                                     since=_when(request, since, "since"),
                                     until=_when(request, until, "until"), record_ids=record_ids)


@router.get("/deliveries", summary="Deliveries (outbox rows), newest first, filtered and paged")
def get_deliveries(request: Request, _: Viewer, status: Text = None, adapter: Text = None,
                   partner_id: Text = None, error_code: Text = None, since: Text = None,
                   until: Text = None, cursor: Annotated[str | None, Query(max_length=512)] = None,
                   limit: Limit = 50) -> dict[str, Any]:
    flt = _filter(request, status, adapter, partner_id, error_code, since, until)
    with snapshot(state_of(request).engine) as conn:
        return deliveries.list_deliveries(conn, flt, cursor=cursor, limit=limit)


@router.get("/deliveries/{delivery_id}",
            summary="One delivery: its batch, the batches it died in, its attempts")
def get_delivery(delivery_id: int, request: Request, _: Viewer) -> dict[str, Any]:
    found = None
    if 0 < delivery_id < 2**62:
        with snapshot(state_of(request).engine) as conn:
            found = deliveries.get_delivery(conn, delivery_id)
    if found is None:
        raise NotFound(detail=f"(delivery {delivery_id})", detail_zh=f"（投递 {delivery_id}）")
    return found


class ReprocessRequest(BaseModel):
    """``{filter fields…, "record_ids": [...], "dry_run": bool, "reason": str, "ceiling": int}``."""

    model_config = ConfigDict(extra="forbid")

    status: str | None = Field(None, max_length=16)
    adapter: str | None = Field(None, max_length=32)
    partner_id: str | None = Field(None, max_length=64)
    error_code: str | None = Field(None, max_length=32)
    since: str | None = Field(None, max_length=40)
    until: str | None = Field(None, max_length=40)
    record_ids: list[Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=list, max_length=10_000)
    dry_run: bool = False
    reason: str = Field(min_length=1, max_length=1000)
    # The dry run's ``ceiling``: redeliver nothing newer than what that count covered.
    ceiling: int | None = Field(None, ge=0, lt=2**63)


@router.post("/deliveries/reprocess",
             summary="Redeliver dead deliveries by filter or by record id (dry run: count only)")
async def post_reprocess(body: ReprocessRequest, request: Request, who: Acting) -> dict[str, Any]:
    state = state_of(request)
    flt = _filter(request, body.status, body.adapter, body.partner_id, body.error_code,
                  body.since, body.until, tuple(body.record_ids))
    result = await run_in_threadpool(
        lambda: deliveries.reprocess(state.engine, flt, dry_run=body.dry_run, reason=body.reason,
                                     actor=who.name, ceiling=body.ceiling,
                                     config=state.rules_config))
    return result.as_dict()


@router.get("/conflicts", summary="Open conflicts (same activity, different hours), oldest first")
def get_conflicts(request: Request, _: Viewer,
                  cursor: Annotated[str | None, Query(max_length=512)] = None,
                  limit: Limit = 50) -> dict[str, Any]:
    with snapshot(state_of(request).engine) as conn:
        return records.list_conflicts(conn, cursor=cursor, limit=limit)


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep: str = Field(pattern=r"^(this|existing)$")
    reason: str = Field(min_length=1, max_length=1000)
    # The conflicting record's version that was compared: 409 RECORD_CHANGED if another is now.
    version: int | None = Field(None, ge=1, lt=2**31)


@router.post("/conflicts/{record_id}/resolve",
             summary="Resolve a conflict: keep this record (the other is withdrawn) or the existing one")
async def post_resolve(record_id: str, body: ResolveRequest, request: Request,
                       who: Acting) -> dict[str, Any]:
    state = state_of(request)
    return await run_in_threadpool(
        lambda: records.resolve_conflict(state.engine, state.settings, record_id, keep=body.keep,
                                         reason=body.reason, actor=who.name,
                                         expected_version=body.version))


class EditRequest(BaseModel):
    """``{"changes": {"activity.title": "…"}, "reason": str}``: dotted field paths → new values."""

    model_config = ConfigDict(extra="forbid")

    changes: dict[Annotated[str, Field(min_length=1, max_length=200)], Any] = Field(
        min_length=1, max_length=50)
    reason: str = Field(min_length=1, max_length=1000)


class RecordEditRequest(EditRequest):
    """An edit of a dead record; ``version`` (optional): 409 RECORD_CHANGED if not current."""

    version: int | None = Field(None, ge=1, lt=2**31)


@router.post("/records/{record_id}/edit",
             summary="Reprocess with edit: correct a dead record; a new version is queued")
async def post_record_edit(record_id: str, body: RecordEditRequest, request: Request,
                           who: Acting) -> dict[str, Any]:
    state = state_of(request)
    rules = await run_in_threadpool(state.rules)
    return await run_in_threadpool(
        lambda: records.edit_and_requeue(state.engine, state.settings, record_id, body.changes,
                                         reason=body.reason, actor=who.name, rules=rules,
                                         expected_version=body.version))


@router.post("/rejections/{rejection_id}/edit",
             summary="Reprocess with edit: correct a rejected submission and run it again")
async def post_rejection_edit(rejection_id: int, body: EditRequest, request: Request,
                              who: Acting) -> dict[str, Any]:
    state = state_of(request)
    rules = await run_in_threadpool(state.rules)
    return await run_in_threadpool(
        lambda: records.edit_rejection(state.engine, state.settings, rejection_id, body.changes,
                                       reason=body.reason, actor=who.name, rules=rules))


@router.get("/rejections", summary="Rejected submissions (open by default), newest first")
def get_rejections(request: Request, _: Viewer, partner_id: Text = None, adapter: Text = None,
                   error_code: Text = None, since: Text = None, until: Text = None,
                   batch_id: Text = None, status: Annotated[str, Query(max_length=16)] = "open",
                   cursor: Annotated[str | None, Query(max_length=512)] = None,
                   limit: Limit = 50) -> dict[str, Any]:
    status = status or "open"  # an empty status is the default, as in the console
    with snapshot(state_of(request).engine) as conn:
        return records.list_rejections(
            conn, partner_id=_any(partner_id), adapter=_any(adapter), error_code=_any(error_code),
            since=_when(request, since, "since"), until=_when(request, until, "until"),
            status=None if status == "all" else status, cursor=cursor, limit=limit,
            batch_id=_any(batch_id))
