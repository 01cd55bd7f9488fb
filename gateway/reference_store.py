"""The write side of reference data: item shapes, storage rows, versions and history.

Reference data (SPEC §4, last paragraph; §5 "Downstream") comes in four kinds — bases, plans,
deferrals, title applicants — from the management system's reference API or a CSV import.
Both paths end in :func:`apply_items`, which in the caller's transaction:

1. (:func:`lock_writers`, called first) locks the four ``pull_state`` rows of the kinds, so
   two writers never diff against the same current rows nor take the same version number —
   without holding the audit chain's head, which ingest needs, for the whole diff;
2. compares each item with the current row of its natural key;
3. when anything changed: allocates the next version (``ref-000012``), inserts or updates
   the current rows (each carrying the version that last changed it) and adds one
   ``reference_history`` row per change.  Nothing changed → no version.

Identity numbers never reach a table: deferrals and title applicants are keyed by the person
key of a resident id (:class:`gateway.person_keys.PersonKeys`, as ``records.person_key`` is, so
the keys join) and carry a masked id for display.

CSV files are validated here too (:func:`read_reference_csv`): the same item models, with the
row numbers a person sees in the file.

What it may touch: the ``reference_*`` tables, ``pull_state`` rows named ``reference:<kind>``
(the upstream ``since`` watermarks and the items seen at them, also the writers' lock).  No HTTP, no audit events:
:mod:`gateway.reference` does both.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from enum import StrEnum
from typing import IO, Annotated, Any

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from sqlalchemy import Connection, Table, and_, bindparam, func, select, update

from adapters.tabular import iter_csv, row_error
from contracts import Category
from gateway.errors import GatewayError
from gateway.masking import mask_id
from gateway.person_keys import PersonKeys
from gateway.pipeline.identity import resident_id_findings
from gateway.store.tables import (
    pull_state,
    reference_bases,
    reference_deferrals,
    reference_history,
    reference_plans,
    reference_title_applicants,
    reference_versions,
)
from gateway.store.util import insert_ignore

__all__ = ["KINDS", "NO_VERSION", "Applied", "ParsedCsv", "RowError", "BaseItem", "BaseLevel", "BaseStatus",
           "DeferralItem", "DeferralReason", "KindSpec", "PlanItem", "ReferenceKind",
           "TitleApplicantItem", "UnknownReferenceKind", "Watermark", "apply_items", "item_digest",
           "latest_seq",
           "lock_writers", "parse_kind", "read_reference_csv", "read_watermarks",
           "save_watermark",
           "version_label", "watermark_source"]

NO_VERSION = "none"


class UnknownReferenceKind(GatewayError, ValueError):
    """A kind other than bases, plans, deferrals or title-applicants was asked for."""


class ReferenceKind(StrEnum):
    """The four kinds, spelt as the reference API's path segments."""

    BASES = "bases"
    PLANS = "plans"
    DEFERRALS = "deferrals"
    TITLE_APPLICANTS = "title-applicants"


def parse_kind(kind: str | ReferenceKind) -> ReferenceKind:
    """``title_applicants`` is accepted too (a CLI user's spelling); anything else raises."""
    try:
        return ReferenceKind(str(kind).strip().lower().replace("_", "-"))
    except ValueError:
        names = ", ".join(k.value for k in ReferenceKind)
        raise UnknownReferenceKind(f"unknown reference kind {kind!r} (one of: {names})") from None


# -- item shapes (SPEC §5) ------------------------------------------------------------------

class BaseLevel(StrEnum):
    NATIONAL = "national"
    PROVINCIAL = "provincial"


class BaseStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"


class DeferralReason(StrEnum):
    # 青人社厅函〔2022〕394号: management-to-professional post transfer, serious illness, pregnancy.
    POST_TRANSFER = "post_transfer"
    ILLNESS = "illness"
    PREGNANCY = "pregnancy"


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_date(value: object) -> object:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value.strip()):
        try:
            return date.fromisoformat(value.strip())
        except ValueError as exc:
            raise ValueError(f"not a real date: {exc}") from None
    raise ValueError("must be an ISO date (YYYY-MM-DD)")


IsoDate = Annotated[date, BeforeValidator(_iso_date)]
Code = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
def _resident_id(value: str) -> str:
    """An 18-character number is a resident id and must pass GB 11643 as records' ids do.

    A deferral or title applicant whose check digit fails could never match a record (every
    record with that number is refused ID_NUMBER_INVALID), yet ops would believe the person
    deferred.  The detail shows the number masked.
    """
    if len(value) == 18:
        bad = [f for f in resident_id_findings(value) if f.code == "ID_NUMBER_INVALID"]
        if bad:
            raise ValueError(bad[0].detail)
    return value


# Upper-cased before the pattern is checked: a resident id's check character may be "x".
IdNumber = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[0-9A-Z()\-]+$"),
                     BeforeValidator(lambda v: v.strip().upper() if isinstance(v, str) else v),
                     AfterValidator(_resident_id)]
Year = Annotated[int, Field(ge=1990, le=2100)]


class _Item(BaseModel):
    # Extra keys (the API's ``updated_at``, a CSV's spare columns) are ignored, not refused.
    model_config = ConfigDict(extra="ignore", frozen=True)


class BaseItem(_Item):
    code: Code
    name: Text
    level: BaseLevel
    status: BaseStatus
    assessed_on: IsoDate


class PlanItem(_Item):
    plan_id: Code
    base_code: Code
    title: Text
    category: Category
    hours: Annotated[Decimal, Field(ge=0, max_digits=9, decimal_places=2)]
    starts_on: IsoDate
    ends_on: IsoDate
    filed_on: IsoDate

    @field_validator("ends_on")
    @classmethod
    def _after_start(cls, value: date, info: ValidationInfo) -> date:
        starts_on = info.data.get("starts_on")
        if isinstance(starts_on, date) and value < starts_on:
            raise ValueError("is before starts_on")
        return value


class DeferralItem(_Item):
    id_number: IdNumber
    from_year: Year
    reason: DeferralReason
    approved_on: IsoDate


class TitleApplicantItem(_Item):
    id_number: IdNumber
    year: Year


def _hours_text(hours: Decimal) -> str:
    # "24", "24.0" and "24.00" are one value: store one spelling so a resend is no change.
    return format(hours.normalize(), "f")


def _base_row(item: BaseModel, _: PersonKeys) -> dict[str, Any]:
    assert isinstance(item, BaseItem)
    return {"code": item.code, "name": item.name, "level": item.level.value,
            "status": item.status.value, "assessed_on": item.assessed_on}


def _plan_row(item: BaseModel, _: PersonKeys) -> dict[str, Any]:
    assert isinstance(item, PlanItem)
    return {"plan_id": item.plan_id, "base_code": item.base_code, "title": item.title,
            "category": item.category.value, "hours": _hours_text(item.hours),
            "starts_on": item.starts_on, "ends_on": item.ends_on, "filed_on": item.filed_on}


def _deferral_row(item: BaseModel, keys: PersonKeys) -> dict[str, Any]:
    assert isinstance(item, DeferralItem)
    return {"person_key": keys.of("resident_id", item.id_number), "from_year": item.from_year,
            "id_masked": mask_id(item.id_number), "reason": item.reason.value,
            "approved_on": item.approved_on}


def _title_applicant_row(item: BaseModel, keys: PersonKeys) -> dict[str, Any]:
    assert isinstance(item, TitleApplicantItem)
    return {"person_key": keys.of("resident_id", item.id_number), "year": item.year,
            "id_masked": mask_id(item.id_number)}


@dataclass(frozen=True)
class KindSpec:
    """How one kind is validated, stored and keyed (a table row, not an if-chain)."""

    kind: ReferenceKind
    table: Table
    model: type[_Item]
    key_columns: tuple[str, ...]  # of the stored row
    key_fields: tuple[str, ...]  # of the item (what a CSV row error names)
    to_row: Callable[[BaseModel, PersonKeys], dict[str, Any]]  # the stored row

    @property
    def columns(self) -> tuple[str, ...]:
        """The stored columns other than ``version``."""
        return tuple(c.name for c in self.table.columns if c.name != "version")

    @property
    def fields(self) -> tuple[str, ...]:
        """The item's field names: the CSV headers."""
        return tuple(self.model.model_fields)

    def key(self, row: Mapping[Any, Any]) -> tuple[Any, ...]:
        return tuple(row[c] for c in self.key_columns)


KINDS: dict[ReferenceKind, KindSpec] = {
    spec.kind: spec for spec in (
        KindSpec(ReferenceKind.BASES, reference_bases, BaseItem, ("code",), ("code",), _base_row),
        KindSpec(ReferenceKind.PLANS, reference_plans, PlanItem, ("plan_id",), ("plan_id",),
                 _plan_row),
        KindSpec(ReferenceKind.DEFERRALS, reference_deferrals, DeferralItem,
                 ("person_key", "from_year"), ("id_number", "from_year"), _deferral_row),
        KindSpec(ReferenceKind.TITLE_APPLICANTS, reference_title_applicants, TitleApplicantItem,
                 ("person_key", "year"), ("id_number", "year"), _title_applicant_row),
    )
}


# -- versions and watermarks ------------------------------------------------------------------

def version_label(seq: int | None) -> str:
    return NO_VERSION if not seq else f"ref-{seq:06d}"


def latest_seq(conn: Connection) -> int:
    """The newest version's number (0 before the first): one index lookup."""
    return int(conn.execute(select(func.coalesce(func.max(reference_versions.c.seq), 0)))
               .scalar_one())


def watermark_source(kind: ReferenceKind) -> str:
    """The ``pull_state`` row holding a kind's upstream ``since`` watermark."""
    return f"reference:{kind.value}"


@dataclass(frozen=True)
class Watermark:
    """Where a kind's sync resumes: ``since`` (inclusive) and the items already taken there.

    ``seen``: :func:`item_digest` of each item stamped exactly at ``since`` that the sync which
    set it took.  ``since`` being inclusive, they come again on every sync; one that comes
    unchanged is not new and must not undo an ops import made since.
    """

    since: str | None = None
    seen: frozenset[str] = frozenset()


def item_digest(row: Mapping[str, Any]) -> str:
    """A short digest of a stored row (``KindSpec.to_row``): its key and every value.

    Identity numbers never reach it in clear (rows carry person keys); 64 bits are plenty to
    tell apart the items that share one timestamp.
    """
    return hashlib.sha256(orjson.dumps(dict(row), option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def read_watermarks(conn: Connection) -> dict[ReferenceKind, Watermark]:
    rows = conn.execute(select(pull_state.c.source, pull_state.c.cursor, pull_state.c.seen)
                        .where(pull_state.c.source.in_([watermark_source(k) for k in KINDS])))
    stored = {source: Watermark(cursor, _seen_at(cursor, seen)) for source, cursor, seen in rows}
    return {kind: stored.get(watermark_source(kind), Watermark()) for kind in KINDS}


def _seen_at(cursor: str | None, seen: str | None) -> frozenset[str]:
    # Kept with the watermark they were seen at: a writer that moved ``cursor`` without them
    # (code before migration 0022, in a rolling release) leaves them for another timestamp.
    held = orjson.loads(seen) if seen else None
    if not isinstance(held, dict) or held.get("since") != cursor:
        return frozenset()
    return frozenset(str(d) for d in held.get("items", ()))


def save_watermark(conn: Connection, kind: ReferenceKind, *, since: str | None, fetched: int,
                   ok: bool, note: str | None, now: datetime,
                   seen: Iterable[str] = ()) -> None:
    """Store a kind's watermark, the items ``seen`` at it, and how its last sync went.

    ``since=None`` leaves the watermark and its items.  ``ok`` runs also count ``fetched`` and stamp ``last_success_at``; ``note`` (a fetch error,
    or the items that were refused) becomes ``last_error``.
    """
    source = watermark_source(kind)
    insert_ignore(conn, pull_state, {"source": source, "cursor": None, "pulled_total": 0,
                                     "updated_at": now})
    values: dict[str, Any] = {"last_error": note[:2000] if note else None, "updated_at": now}
    if since is not None:
        values["cursor"] = since
        values["seen"] = orjson.dumps({"since": since, "items": sorted(seen)}).decode()
    if ok:
        values["last_success_at"] = now
        values["pulled_total"] = pull_state.c.pulled_total + fetched
    conn.execute(update(pull_state).where(pull_state.c.source == source).values(**values))


def lock_writers(conn: Connection, now: datetime) -> None:
    """Serialise reference writers on their watermark rows.

    SQLite's ``BEGIN IMMEDIATE`` serialises them already; PostgreSQL needs the row locks.
    """
    sources = sorted(watermark_source(k) for k in KINDS)  # one order: no deadlock
    for source in sources:
        insert_ignore(conn, pull_state, {"source": source, "cursor": None, "pulled_total": 0,
                                         "updated_at": now})
    conn.execute(select(pull_state.c.source).where(pull_state.c.source.in_(sources))
                 .order_by(pull_state.c.source).with_for_update())


# -- applying changes -----------------------------------------------------------------------

@dataclass
class Applied:
    """What :func:`apply_items` changed; ``version`` is ``None`` when nothing did."""

    version: str | None = None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)


def _diff(conn: Connection, spec: KindSpec, rows: Sequence[dict[str, Any]]
          ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows to insert, rows to update) against the current rows of ``spec``'s table."""
    columns = spec.columns
    current = {spec.key(r): r for r in conn.execute(
        select(*(spec.table.c[c] for c in columns))).mappings()}
    inserts, updates = [], []
    for row in rows:
        old = current.get(spec.key(row))
        if old is None:
            inserts.append(row)
        elif any(old[c] != row[c] for c in columns):
            updates.append(row)
    return inserts, updates


def apply_items(conn: Connection, rows_by_kind: Mapping[ReferenceKind, Sequence[dict[str, Any]]],
                *, source: str, actor: str, now: datetime,
                cursors: Mapping[str, str | None] | None = None) -> Applied:
    """Upsert stored rows (``KindSpec.to_row`` output, one per key) under one new version.

    The caller holds the transaction and should have called :func:`lock_writers` first.
    """
    changes: dict[ReferenceKind, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    result = Applied()
    for kind, rows in rows_by_kind.items():
        inserts, updates = _diff(conn, KINDS[kind], rows)
        result.counts[kind.value] = {"received": len(rows), "inserted": len(inserts),
                                     "updated": len(updates),
                                     "unchanged": len(rows) - len(inserts) - len(updates)}
        if inserts or updates:
            changes[kind] = (inserts, updates)
    if not changes:
        return result
    seq = latest_seq(conn) + 1
    version = result.version = version_label(seq)
    conn.execute(reference_versions.insert().values(
        seq=seq, version_id=version, source=source, kinds=",".join(k.value for k in changes),
        actor=actor[:64], counts=orjson.dumps(result.counts).decode(),
        cursors=orjson.dumps(dict(cursors)).decode() if cursors is not None else None,
        created_at=now))
    history: list[dict[str, Any]] = []
    for kind, (inserts, updates) in changes.items():
        spec = KINDS[kind]
        if inserts:
            conn.execute(spec.table.insert(), [{**r, "version": version} for r in inserts])
        if updates:
            where = and_(*(spec.table.c[c] == bindparam(f"k_{c}") for c in spec.key_columns))
            conn.execute(update(spec.table).where(where), [
                {**r, "version": version, **{f"k_{c}": r[c] for c in spec.key_columns}}
                for r in updates])
        history.extend(_history_rows(spec, [*inserts, *updates], version, now))
    conn.execute(reference_history.insert(), history)
    return result


def _history_rows(spec: KindSpec, rows: Iterable[dict[str, Any]], version: str,
                  now: datetime) -> list[dict[str, Any]]:
    return [{"kind": spec.kind.value, "key": "/".join(str(v) for v in spec.key(r)),
             "version": version, "at": now,
             "payload": orjson.dumps(r, option=orjson.OPT_SORT_KEYS).decode()}
            for r in rows]


# -- CSV files (``ce-gateway reference import``) ---------------------------------------------

@dataclass(frozen=True)
class RowError:
    """A refused CSV row: the row number a person sees in the file (the header is row 1)."""

    row: int
    field: str | None
    message: str


@dataclass
class ParsedCsv:
    rows: int = 0  # data rows read (blank rows not counted)
    good: list[dict[str, Any]] = field(default_factory=list)  # stored rows, one per key
    errors: list[RowError] = field(default_factory=list)
    error: str | None = None  # the file as a whole was refused


def read_reference_csv(stream: IO[bytes], spec: KindSpec, keys: PersonKeys) -> ParsedCsv:
    """Validate every row of a reference CSV whose headers are ``spec``'s field names.

    UTF-8, UTF-8 with BOM or GB18030 (:func:`adapters.tabular.iter_csv`).  Empty cells count
    as missing; spare columns are ignored; a key given twice is refused on its later row (one
    file must say one thing per key).
    """
    parsed = ParsedCsv()
    seen: dict[tuple[Any, ...], int] = {}
    checked_header = False
    for number, cells in iter_csv(stream):
        broken = row_error(cells)
        if broken is None and not checked_header:
            checked_header = True
            missing = [name for name in spec.fields if name not in cells]
            if missing:
                parsed.error = f"row 1: missing column(s) {', '.join(missing)}"
                return parsed
        parsed.rows += 1
        if broken is not None:
            parsed.errors.append(RowError(number, None, broken))
            continue
        data = {k: v for k, v in cells.items() if not (isinstance(v, str) and not v.strip())}
        try:
            row = spec.to_row(spec.model.model_validate(data), keys)
        except ValidationError as exc:
            parsed.errors.extend(
                RowError(number, str(e["loc"][0]) if e["loc"] else None, e["msg"])
                for e in exc.errors())
            continue
        key = spec.key(row)
        if key in seen:
            parsed.errors.append(RowError(number, spec.key_fields[0],
                                          f"same {' and '.join(spec.key_fields)} as row {seen[key]}"))
            continue
        seen[key] = number
        parsed.good.append(row)
    return parsed
