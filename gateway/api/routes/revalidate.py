"""``POST /v1/records/revalidate`` (SPEC §5 ops): re-run the pipeline for rejected records.

Viewers may ask for a dry run (a count); acting needs the ``operator`` role and a reason, and
is recorded in the audit trail under the operator's name.  The work is
:func:`gateway.revalidate.revalidate`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.accounts import Operator
from gateway.api.deps import operator, state_of
from gateway.errors import Forbidden, PayloadRejected
from gateway.ops.common import parse_when
from gateway.revalidate import RevalidationFilter, RevalidationRefused, revalidate

router = APIRouter(prefix="/v1", tags=["ops"])
Viewer = Annotated[Operator, Depends(operator)]
_FILTER_KEYS = ("partner_id", "adapter", "error_code", "batch_id", "since", "until")


class RevalidateFilter(BaseModel):
    """Which open rejections: all set fields must match.

    An empty field means "any", as it does in the console and in the deliveries' filters.
    ``since`` and ``until`` read as every operator's filter time does
    (:func:`gateway.ops.common.parse_when`): ISO 8601, local (``CE_GATEWAY_TIMEZONE``) without
    an offset, a date alone the whole day ("until 2026-03-01" is through that day).
    """

    model_config = ConfigDict(extra="forbid")

    partner_id: str | None = Field(None, max_length=64)
    adapter: str | None = Field(None, max_length=32)
    error_code: str | None = Field(None, max_length=32)
    batch_id: str | None = Field(None, max_length=64)
    since: str | None = Field(None, max_length=64, examples=["2026-03-01", "2026-03-01T08:30+08:00"])
    until: str | None = Field(None, max_length=64, examples=["2026-03-31"])

    @field_validator("partner_id", "adapter", "error_code", "batch_id", "since", "until")
    @classmethod
    def _empty_is_any(cls, value: str | None) -> str | None:
        return value or None


class RevalidateRequest(BaseModel):
    """``{"filter": {...}, "dry_run": bool, "reason": str}``.

    The filter's fields may also stand at the top level (``{filter..., "dry_run", "reason"}``,
    as SPEC §5 writes the reprocess body), but not in both places.
    """

    model_config = ConfigDict(extra="forbid")

    filter: RevalidateFilter = Field(default_factory=RevalidateFilter)
    dry_run: bool = False
    reason: str | None = Field(None, max_length=1000)

    @model_validator(mode="before")
    @classmethod
    def _flat_filter(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(k in data for k in _FILTER_KEYS):
            return data
        if "filter" in data:
            raise ValueError("give the filter either under 'filter' or at the top level")
        flat = {k: v for k, v in data.items() if k in _FILTER_KEYS}
        return {**{k: v for k, v in data.items() if k not in _FILTER_KEYS}, "filter": flat}


@router.post("/records/revalidate",
             summary="Re-run validation for rejected records by filter (dry run: count only)")
async def post_revalidate(body: RevalidateRequest, request: Request,
                          who: Viewer) -> dict[str, Any]:
    state = state_of(request)
    if not body.dry_run and not who.can_act:
        raise Forbidden("FORBIDDEN", detail=f"(role {who.role} may only ask for a dry run)",
                        detail_zh=f"（角色 {who.role} 只能进行试运行）")
    if not body.dry_run and not (body.reason and body.reason.strip()):
        raise PayloadRejected("SCHEMA", field="reason",
                              detail="(a reason is required unless dry_run is true)",
                              detail_zh="（dry_run 不为 true 时必须填写原因）")
    zone = state.settings.timezone
    when = {name: parse_when(getattr(body.filter, name), name, zone) for name in ("since", "until")}
    try:
        flt = RevalidationFilter(**{**body.filter.model_dump(), **when})
    except RevalidationRefused as exc:
        raise exc.coded() from exc
    rules = await run_in_threadpool(state.rules)
    result = await run_in_threadpool(
        lambda: revalidate(state.engine, flt, actor=who.name, reason=body.reason,
                           dry_run=body.dry_run, rules=rules))
    return result.as_dict()
