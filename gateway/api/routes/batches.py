"""Batch uploads (signed, streamed to disk, 202) and batch status; training-base pushes.

An upload is refused as early as it can be known, and nothing of a refused upload stays:

- before a byte of the body: the X-CE-* headers, the app key (401), the query, a declared
  ``Content-Length`` over MAX_BATCH_BYTES or an ``X-CE-Row-Count`` over MAX_BATCH_ROWS (413);
- while streaming: more than MAX_BATCH_BYTES (413);
- after the stream: the signature over the file's hash, the nonce and the rate limit (401,
  429), the partner's scope (403), an empty file or one of no format we read (422), and the
  row limit (413 ``PAYLOAD_TOO_LARGE``).  Rows are counted cheaply: a CSV or NDJSON file
  holds at most as many data rows as line breaks (counted as it streams), so only a file with
  more line breaks than MAX_BATCH_ROWS is counted exactly (stopping past the limit); an XLSX
  file is checked by :func:`adapters.tabular.xlsx_census` (its first sheet's row elements, less
  the header — formatted blank rows count), which also refuses a ZIP bomb or a monstrous row.

So a file over the row limit never becomes a batch, and nothing of it is applied.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote

import orjson
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from adapters.normalize import loads_exact
from adapters.tabular import (
    Format,
    UnreadableFile,
    WorkbookTooLarge,
    count_data_rows,
    detect_format,
    xlsx_census,
)
from adapters.training_base import TrainingBaseAdapter, envelope_error, native_notes
from contracts import SubmissionResult
from gateway.accounts import Partner
from gateway.api.deps import (
    operator,
    partner_of,
    signature_headers,
    signed_partner,
    state_of,
    verify_signature,
)
from gateway.api.routes.partner import records_result, scope_partner
from gateway.batch_requests import (
    NewBatch,
    check_batch_request,
    fsync_into_place,
    new_batch_id,
    parse_control_totals,
    record_batch,
)
from gateway.batch_status import batch_status
from gateway.errors import NotFound, PayloadRejected, PayloadTooLarge, ScopeViolation
from gateway.ops import batches as batch_list
from gateway.ops.common import parse_when
from gateway.ops.overview import period_bounds
from gateway.pipeline.ingest import ingest_items
from gateway.pipeline.items import Item
from gateway.store.db import snapshot
from gateway.store.tables import batches

router = APIRouter(prefix="/v1", tags=["partner"])
# Streamed to disk under MAX_BATCH_BYTES, so exempt from the MAX_BODY_BYTES bound (api.limits).
BATCH_UPLOAD_PATH = "/v1/batches"
SIGNED = {"description": "Signed with the X-CE-* headers of SPEC §7"}
_FILE = {"schema": {"type": "string", "format": "binary"}}
UPLOAD = {**SIGNED, "requestBody": {"required": True, "description": (
    "The file itself, streamed: CSV (UTF-8, UTF-8 with BOM or GB18030), XLSX or NDJSON. "
    "Optional control totals in X-CE-Row-Count and X-CE-Total-Credits; X-CE-Filename helps "
    "name an empty or odd file."), "content": {
    "application/octet-stream": _FILE, "text/csv": _FILE, "application/x-ndjson": _FILE,
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": _FILE}}}


_TEXT = {"type": "string"}
NATIVE_BODY = {**SIGNED, "requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "required": ["base_code", "plan_id", "results"], "properties": {
        "base_code": _TEXT, "plan_id": _TEXT, "results": {"type": "array", "items": {
            "type": "object", "properties": {
                **{k: _TEXT for k in ("result_id", "id_no", "name", "employer", "region",
                                      "started_on", "completed_on", "certificate_no")},
                "hours": {"type": ["string", "number"]}, "passed": {"type": "boolean"}}}}}}}}}}


def _check_rows(path: Path, fmt: Format, line_breaks: int, limit: int) -> None:
    """413 if the file holds more than ``limit`` data rows (module docs: how it is counted)."""
    try:
        if fmt == "xlsx":
            rows = max(xlsx_census(path).rows - 1, 0)  # less the header row
        elif line_breaks + 1 <= limit:
            return  # lines <= line breaks + 1 (CR, LF or CRLF end one), and rows <= lines
        else:
            rows = count_data_rows(path, fmt, stop_after=limit)
    except WorkbookTooLarge as exc:
        raise PayloadTooLarge(field="body", detail=f"({exc})",
                              detail_zh=f"（工作簿超出限制：{exc}）") from exc
    except UnreadableFile as exc:
        raise PayloadRejected("SCHEMA", field="body", detail=f"({exc})",
                              detail_zh=f"（文件无法读取：{exc}）") from exc
    if rows > limit:
        raise PayloadTooLarge(field="body", detail=f"(more than {limit} rows in one batch)",
                              detail_zh=f"（一个批次超过 {limit} 行）")


def _line_breaks(block: bytes) -> int:
    """Line ends in ``block`` as a reader sees them (a CRLF cut between blocks counts twice)."""
    return block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")


@router.post(BATCH_UPLOAD_PATH.removeprefix("/v1"), status_code=202, openapi_extra=UPLOAD,
             summary="Upload a batch file (CSV, XLSX or NDJSON); 202 with its id at once",
             description="The same file again (same bytes, control totals, adapter, kind and "
                         "period) from the same partner is a resend: answered 202 with the batch "
                         "that has it (`resent`: true) unless that batch failed, and never taken "
                         "twice.")
async def upload_batch(request: Request, adapter: Annotated[str, Query()],
                       kind: Annotated[str, Query()], period: Annotated[str, Query()]) -> JSONResponse:
    state = state_of(request)
    settings = state.settings
    sig = signature_headers(request)  # refuse stale or unsigned uploads before reading a byte
    check_batch_request(adapter, kind, period, *period_bounds(settings))
    declared_rows, declared_credits = parse_control_totals(
        request.headers.get("x-ce-row-count"), request.headers.get("x-ce-total-credits"))
    if declared_rows is not None and declared_rows > settings.max_batch_rows:
        raise PayloadTooLarge(field="X-CE-Row-Count",
                              detail=f"(more than {settings.max_batch_rows} rows in one batch)",
                              detail_zh=f"（一个批次超过 {settings.max_batch_rows} 行）")
    limit = settings.max_batch_bytes
    declared_size = request.headers.get("content-length", "")
    if declared_size.isdigit() and int(declared_size) > limit:
        raise PayloadTooLarge(detail=f"(batch files up to {limit} bytes)",
                              detail_zh=f"（批次文件最大 {limit} 字节）")
    # An unknown app key is refused before the body is streamed to disk; the signature
    # itself covers the body's hash, so it can only be checked after the stream.
    known = await run_in_threadpool(partner_of, request, sig)
    batch_id = new_batch_id()
    directory = Path(settings.batch_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{batch_id}.part"
    digest, size, head, line_breaks = hashlib.sha256(), 0, b"", 0
    try:
        with tmp.open("wb") as handle:
            async for block in request.stream():
                size += len(block)
                if size > limit:
                    raise PayloadTooLarge(detail=f"(batch files up to {limit} bytes)",
                                          detail_zh=f"（批次文件最大 {limit} 字节）")
                if len(head) < 4096:
                    head += block[: 4096 - len(head)]
                digest.update(block)
                line_breaks += _line_breaks(block)
                handle.write(block)
        partner = await run_in_threadpool(verify_signature, request, sig, digest.hexdigest(),
                                          known)
        scope_partner(partner, adapter)  # its adapter, and a base code if it is a base
        if size == 0:
            raise PayloadRejected("SCHEMA", field="body", detail="(empty file)",
                                  detail_zh="（文件为空）")
        try:
            fmt = detect_format(head, unquote(request.headers.get("x-ce-filename", "")),
                                request.headers.get("content-type"))
        except UnreadableFile as exc:  # a legacy .xls workbook
            raise PayloadRejected("SCHEMA", field="body", detail=f"({exc})",
                                  detail_zh="（不支持旧版 .xls 工作簿，请另存为 .xlsx 或 CSV）") from exc
        await run_in_threadpool(_check_rows, tmp, fmt, line_breaks, settings.max_batch_rows)
        final = directory / f"{batch_id}.{fmt}"
        await run_in_threadpool(fsync_into_place, tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    batch = NewBatch(batch_id, partner.partner_id, adapter, kind, period, final, fmt, size,
                     digest.hexdigest(), declared_rows, declared_credits)
    try:
        acknowledged = await run_in_threadpool(record_batch, state.engine, batch, partner.partner_id)
    except BaseException:
        final.unlink(missing_ok=True)  # no batch names it: nobody would ever process or remove it
        raise
    if acknowledged.resent:  # the batch that has the same file answers for it
        final.unlink(missing_ok=True)
    return JSONResponse(status_code=202, content={
        "batch_id": acknowledged.batch_id, "status": acknowledged.status,
        "resent": acknowledged.resent, "bytes": size, "format": fmt})


async def _reader(request: Request) -> str | None:
    """Who reads a batch: an operator (None: every partner's) or the signing partner's id."""
    if request.headers.get("authorization"):
        operator(request)
        return None
    sig = signature_headers(request)
    return (await run_in_threadpool(verify_signature, request, sig,
                                    hashlib.sha256(b"").hexdigest())).partner_id


Filter = Annotated[str | None, Query(max_length=64)]


@router.get("/batches", summary="Batches, newest first, filtered and paged",
            description="An operator (`Authorization: Bearer`) sees every partner's batches; a "
                        "partner signing the request (an empty body) sees its own.  Each item "
                        "has the counts `GET /v1/batches/{batch_id}` gives, without the "
                        "rejected rows.  `since`/`until` bound the upload time.")
async def list_batches(request: Request, partner_id: Filter = None, adapter: Filter = None,
                       kind: Filter = None, status: Filter = None, period: Filter = None,
                       since: Filter = None, until: Filter = None,
                       cursor: Annotated[str | None, Query(max_length=512)] = None,
                       limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    state = state_of(request)
    owner = await _reader(request)
    if owner is not None:
        if partner_id and partner_id != owner:
            raise ScopeViolation(field="partner_id", detail="(a partner lists its own batches)",
                                 detail_zh="（合作方只能查看本方的批次）")
        partner_id = owner
    zone = state.settings.timezone
    filters = {"partner_id": partner_id or None, "adapter": adapter or None,
               "kind": kind or None, "status": status or None, "period": period or None,
               "since": parse_when(since, "since", zone), "until": parse_when(until, "until", zone)}

    def load() -> dict[str, Any]:
        with snapshot(state.engine) as conn:
            return batch_list.list_batches(conn, cursor=cursor, limit=limit, **filters)

    return await run_in_threadpool(load)


@router.get("/batches/{batch_id}", summary="A batch's progress, counts and rejected rows (paged)")
async def get_batch(batch_id: str, request: Request,
                    cursor: Annotated[str | None, Query(max_length=512)] = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    state = state_of(request)
    owner = await _reader(request)

    def load() -> dict[str, Any] | None:
        with snapshot(state.engine) as conn:
            found = batch_status(conn, batch_id, cursor, limit)
            if found is not None and owner is not None:
                real_owner = conn.execute(select(batches.c.partner_id)
                                          .where(batches.c.batch_id == batch_id)).scalar_one()
                if real_owner != owner:
                    return None
            return found

    found = await run_in_threadpool(load)
    if found is None:
        raise NotFound(detail=f"(batch {batch_id})", detail_zh=f"（批次 {batch_id}）")
    return found


def _check_envelope(document: Any) -> None:
    """Refuse a push whole (422 SCHEMA) when it holds no result to answer, or names no base or plan.

    As ``POST /v1/records`` refuses an envelope without records: an answer, and a rejection
    filed for ops, is for a result the partner sent, never for the envelope.
    """
    wrong = envelope_error(document)
    if wrong is not None:  # the adapter's note, as the whole request's answer
        refused = PayloadRejected(wrong.code, field=wrong.field)
        refused.message, refused.message_zh = wrong.message, wrong.message_zh or refused.message_zh
        raise refused
    for key in ("base_code", "plan_id"):  # SPEC §8: the push is {base_code, plan_id, results}
        value = document.get(key)
        if not isinstance(value, str) or not value.strip():
            raise PayloadRejected("SCHEMA", field=key, detail=f"({key}: required text)",
                                  detail_zh=f"（{key}：必填，应为文本）")


@router.post("/partners/{adapter}/records", response_model=SubmissionResult, openapi_extra=NATIVE_BODY,
             summary="A push adapter's native JSON (training bases: results of a filed plan)")
async def native_records(adapter: str, request: Request,
                         signed: Annotated[tuple[Partner, bytes], Depends(signed_partner)],
                         ) -> SubmissionResult:
    partner, body = signed
    state = state_of(request)
    if adapter != "training_base":
        raise NotFound(detail=f"(no push adapter {adapter!r}; health and finance use /v1/batches)",
                       detail_zh=f"（没有推送适配器 {adapter!r}；卫生、财会数据请用 /v1/batches）")
    ref = scope_partner(partner, adapter)
    try:
        # Not decimals=True: the native format's numbers go through the adapter's own reading
        # (float noise rounded, Excel serial dates, 1.0 as true), which expects floats.
        document = loads_exact(body)
    except orjson.JSONDecodeError as exc:
        raise PayloadRejected("SCHEMA", detail=f"(body is not JSON: {exc})", detail_zh=(
            f"（请求体不是有效的 JSON：第 {exc.lineno} 行第 {exc.colno} 列有误）")) from exc
    _check_envelope(document)  # its shape first: a push without base_code is no other base's
    if document["base_code"] != ref.base_code:
        raise ScopeViolation(field="base_code",
                             detail=f"(partner may only submit for base {partner.base_code})",
                             detail_zh=f"（该合作方只能报送基地 {partner.base_code} 的数据）")
    most = state.settings.max_records_per_request
    if len(document["results"]) > most:  # counted before any is parsed
        raise PayloadTooLarge(field="results", detail=f"(at most {most} results per request)",
                              detail_zh=f"（每次请求最多 {most} 条结果）")
    rows = list(TrainingBaseAdapter().parse(document))
    items = [Item(raw=r.raw, submission=r.submission, errors=r.errors, warnings=r.warnings, row=r.row)
             for r in rows]
    rules = await run_in_threadpool(state.rules)
    answers = await run_in_threadpool(partial(ingest_items, rules=rules), state.engine, ref, items)
    # The rules name canonical fields; the base reads its own keys, as in its schema errors.
    return records_result([a.model_copy(update={"errors": native_notes(a.errors),
                                                "warnings": native_notes(a.warnings)})
                           for a in answers])

