"""Batch uploads (signed, streamed to disk, 202) and batch status; training-base pushes."""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from adapters.tabular import detect_format
from adapters.training_base import TrainingBaseAdapter
from contracts import SubmissionResult
from gateway.accounts import Partner
from gateway.api.deps import (
    operator,
    signature_headers,
    signed_partner,
    state_of,
    verify_signature,
)
from gateway.api.routes.partner import records_result, scope_partner
from gateway.batches import (
    NewBatch,
    batch_status,
    check_batch_request,
    fsync_into_place,
    new_batch_id,
    parse_control_totals,
    record_batch,
)
from gateway.errors import NotFound, PayloadRejected, PayloadTooLarge, ScopeViolation
from gateway.pipeline.ingest import Item, ingest_items
from gateway.store.tables import batches

router = APIRouter(prefix="/v1", tags=["partner"])
SIGNED = {"description": "Signed with the X-CE-* headers of SPEC §7"}


@router.post("/batches", status_code=202, openapi_extra=SIGNED,
             summary="Upload a batch file (CSV, XLSX or NDJSON); 202 with its id at once")
async def upload_batch(request: Request, adapter: Annotated[str, Query()],
                       kind: Annotated[str, Query()], period: Annotated[str, Query()]) -> JSONResponse:
    state = state_of(request)
    sig = signature_headers(request)  # refuse stale or unsigned uploads before reading a byte
    check_batch_request(adapter, kind, period)
    declared_rows, declared_credits = parse_control_totals(
        request.headers.get("x-ce-row-count"), request.headers.get("x-ce-total-credits"))
    batch_id = new_batch_id()
    directory = Path(state.settings.batch_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{batch_id}.part"
    digest, size, head = hashlib.sha256(), 0, b""
    limit = state.settings.max_batch_bytes
    try:
        with tmp.open("wb") as handle:
            async for block in request.stream():
                size += len(block)
                if size > limit:
                    raise PayloadTooLarge(detail=f"(batch files up to {limit} bytes)")
                if len(head) < 4096:
                    head += block[: 4096 - len(head)]
                digest.update(block)
                handle.write(block)
        partner = verify_signature(request, sig, digest.hexdigest())
        if partner.adapter != adapter:
            raise ScopeViolation(detail=f"(partner is registered for {partner.adapter!r})")
        if size == 0:
            raise PayloadRejected("SCHEMA", field="body", detail="(empty file)")
        fmt = detect_format(head, request.headers.get("x-ce-filename"),
                            request.headers.get("content-type"))
        final = directory / f"{batch_id}.{fmt}"
        await run_in_threadpool(fsync_into_place, tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    batch = NewBatch(batch_id, partner.partner_id, adapter, kind, period, final, fmt, size,
                     digest.hexdigest(), declared_rows, declared_credits)
    await run_in_threadpool(record_batch, state.engine, batch, partner.partner_id)
    return JSONResponse(status_code=202, content={"batch_id": batch_id, "status": "queued",
                                                  "bytes": size, "format": fmt})


@router.get("/batches/{batch_id}", summary="A batch's progress, counts and rejected rows (paged)")
async def get_batch(batch_id: str, request: Request,
                    cursor: Annotated[int, Query(ge=0)] = 0,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    state = state_of(request)
    owner: str | None = None
    if request.headers.get("authorization"):
        operator(request)
    else:
        sig = signature_headers(request)
        owner = verify_signature(request, sig, hashlib.sha256(b"").hexdigest()).partner_id

    def load() -> dict[str, Any] | None:
        with state.engine.connect() as conn:
            found = batch_status(conn, batch_id, cursor, limit)
            if found is not None and owner is not None:
                real_owner = conn.execute(select(batches.c.partner_id)
                                          .where(batches.c.batch_id == batch_id)).scalar_one()
                if real_owner != owner:
                    return None
            return found

    found = await run_in_threadpool(load)
    if found is None:
        raise NotFound(detail=f"(batch {batch_id})")
    return found


@router.post("/partners/{adapter}/records", response_model=SubmissionResult, openapi_extra=SIGNED,
             summary="A push adapter's native JSON (training bases: results of a filed plan)")
async def native_records(adapter: str, request: Request,
                         signed: Annotated[tuple[Partner, bytes], Depends(signed_partner)],
                         ) -> SubmissionResult:
    partner, body = signed
    state = state_of(request)
    if adapter != "training_base":
        raise NotFound(detail=f"(no push adapter {adapter!r}; health and finance use /v1/batches)")
    ref = scope_partner(partner, adapter)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadRejected("SCHEMA", detail=f"(body is not JSON: {exc})") from exc
    if isinstance(document, dict) and partner.base_code and document.get("base_code") != partner.base_code:
        raise ScopeViolation(detail=f"(partner may only submit for base {partner.base_code})")
    rows = list(TrainingBaseAdapter().parse(document))
    if len(rows) > state.settings.max_records_per_request:
        raise PayloadTooLarge(detail=f"(at most {state.settings.max_records_per_request} results)")
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings, row=r.row)
             for r in rows]
    rules = await run_in_threadpool(state.rules)
    answers = await run_in_threadpool(partial(ingest_items, rules=rules), state.engine, ref, items)
    return records_result(answers)

