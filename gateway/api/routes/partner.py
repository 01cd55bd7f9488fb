"""Partner side of the API (signed, SPEC §5 and §7): submit and withdraw records."""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from adapters.normalize import loads_exact
from adapters.registry import ADAPTERS
from contracts import CESubmission, RecordAnswer, SubmissionResult
from gateway.accounts import Partner
from gateway.api.deps import signed_partner, state_of
from gateway.errors import NotFound, PayloadRejected, PayloadTooLarge, ScopeViolation
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.rules_tables import BASE_ADAPTERS
from gateway.pipeline.withdraw import withdraw

router = APIRouter(prefix="/v1", tags=["partner"])
SignedPartner = Annotated[tuple[Partner, bytes], Depends(signed_partner)]
SIGNED = {"description": "Signed with the X-CE-* headers of SPEC §7"}


def inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON Schema with its ``$defs`` written in place (for a request body)."""
    defs: dict[str, Any] = schema.get("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return walk({**defs[ref.removeprefix("#/$defs/")], **rest})
            return {k: walk(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(schema)
    return result


# The body is read raw (its hash is signed), so FastAPI cannot infer it: documented here.
RECORDS_BODY = {**SIGNED, "requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "required": ["records"], "additionalProperties": False,
               "properties": {"records": {"type": "array", "minItems": 1, "maxItems": 1000,
                                          "items": inlined(CESubmission.model_json_schema())}}}}}}}


def _records_of(body: bytes, limit: int) -> list[Any]:
    try:
        data = loads_exact(body, decimals=True)
    except orjson.JSONDecodeError as exc:
        raise PayloadRejected("SCHEMA", detail=f"(body is not JSON: {exc})", detail_zh=(
            f"（请求体不是有效的 JSON：第 {exc.lineno} 行第 {exc.colno} 列有误）")) from exc
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise PayloadRejected("SCHEMA", field="records", detail='(expected {"records": [...]})',
                              detail_zh='（应为 {"records": [...]}）')
    extra = sorted(set(data) - {"records"})
    if extra:
        raise PayloadRejected("SCHEMA", field=extra[0], detail=f"(unknown field {extra[0]!r})",
                              detail_zh=f"（未知字段 {extra[0]!r}）")
    records: list[Any] = data["records"]
    if not records:
        raise PayloadRejected("SCHEMA", field="records", detail="(1–1,000 records per request)",
                              detail_zh="（每次请求须含 1–1,000 条记录）")
    if len(records) > limit:
        raise PayloadTooLarge(detail=f"({len(records)} records; at most {limit} per request)",
                              detail_zh=f"（共 {len(records)} 条记录；每次请求最多 {limit} 条）")
    return records


def scope_partner(partner: Partner, adapter: str) -> PartnerRef:
    """The partner as ingest sees it, if it may submit for ``adapter`` at all (SPEC §7)."""
    if partner.adapter != adapter:
        raise ScopeViolation(detail=f"(partner is registered for {partner.adapter!r}, not {adapter!r})",
                             detail_zh=f"（该合作方登记的适配器是 {partner.adapter!r}，不是 {adapter!r}）")
    if partner.adapter in BASE_ADAPTERS and not partner.base_code:
        # Registered before ``partner add`` required one: a base with no code is no base's.
        raise ScopeViolation(detail="(partner has no base code registered; re-register it "
                                    "with --base-code)",
                             detail_zh="（该合作方未登记基地代码，请用 --base-code 重新登记）")
    return PartnerRef(partner.partner_id, partner.adapter, partner.base_code)


def records_result(answers: list[RecordAnswer]) -> SubmissionResult:
    counts = Counter(a.status.value for a in answers)
    return SubmissionResult(results=answers, counts={
        k: counts.get(k, 0) for k in ("accepted", "duplicate", "corrected", "conflict", "rejected")})


@router.post("/records", response_model=SubmissionResult, openapi_extra=RECORDS_BODY,
             summary="Submit 1–1,000 canonical records; one answer per record")
async def submit_records(request: Request, signed: SignedPartner) -> SubmissionResult:
    partner, body = signed
    state = state_of(request)
    ref = scope_partner(partner, "canonical")
    records = _records_of(body, state.settings.max_records_per_request)
    rules = await run_in_threadpool(state.rules)
    answers = await run_in_threadpool(partial(ingest, rules=rules), state.engine, ref, records)
    return records_result(answers)


class _AnyText(Convertor[str]):
    """Starlette's ``path``, line breaks included.

    ``path``'s ``.*`` stops at one, so an id holding a line break (``JD%0A1``, which ingest
    takes) matched no withdrawal route at all (405).
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anytext", _AnyText())


# ``:anytext``: a partner's own id may hold "/" (``JD/2026/1``); sent raw or as %2F, the server
# sees it decoded, and a plain parameter would not match it at all (404, never withdrawable).
@router.delete("/records/{source_record_id:anytext}", response_model=RecordAnswer,
               openapi_extra=SIGNED,
               summary="Withdraw a record the partner sent (a new, withdrawn version)")
async def withdraw_record(source_record_id: str, request: Request,
                          signed: SignedPartner) -> RecordAnswer:
    partner, _ = signed
    state = state_of(request)
    ref = PartnerRef(partner.partner_id, partner.adapter, partner.base_code)
    adapter = ADAPTERS.get(partner.adapter)
    if adapter is not None:  # the id as it was stored (" JD-1\u3000" was stored as "JD-1")
        source_record_id = adapter.stored_source_id(source_record_id)
    # No stored id holds NUL (ingest refuses it), and PostgreSQL cannot even compare one.
    answer = None if "\x00" in source_record_id else await run_in_threadpool(
        partial(withdraw, config=state.rules_config), state.engine, ref, source_record_id)
    if answer is None:
        raise NotFound(detail=f"(no record {source_record_id!r} from this partner)",
                       detail_zh=f"（该合作方没有记录 {source_record_id!r}）")
    return answer
