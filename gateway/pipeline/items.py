"""What ingest takes in, and its judging: partners, items, and the values they are judged into.

Database-free: :func:`prepare` judges an :class:`Item` (the partner's scope, what the store can
hold, the policy rules of :mod:`gateway.pipeline.rules`) into a :class:`Prepared` of plain
values or coded errors.  It is the CPU-heavy half of ingest, which batch processing runs in a
parse worker process (:mod:`gateway.batch_parse`).  Also the small values every writer makes:
record ids (:func:`new_record_id`), catalogued notes (:func:`error_note`), the hours dedup
compares (:func:`_claim`), and the partner's id of a row that never parsed (:func:`_source_id_of`).

It may touch the contracts and the pure pipeline steps (validate, rules, dedup), and read the
settings for :meth:`RulesContext.empty`; never the store.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from decimal import Decimal
from operator import attrgetter
from typing import Any

from pydantic import TypeAdapter, ValidationError

from contracts import CESubmission, Note
from contracts.errors import message
from contracts.records import Hours
from gateway.config import Settings
from gateway.masking import mask_id
from gateway.pipeline import dedup
from gateway.pipeline.rules import judge
from gateway.pipeline.rules_tables import (
    BASE_ADAPTERS,
    NOT_BASE_PROVIDERS,
    TIME_ACTIVITIES,
    EmptyReference,
    Reference,
    RulesConfig,
)
from gateway.pipeline.validate import validate_submission
from gateway.store.util import storable_text


@dataclass(frozen=True)
class PartnerRef:
    partner_id: str
    adapter: str
    base_code: str | None = None


@dataclass
class Item:
    """One submission on its way in: the raw form (kept if rejected) and what was judged."""

    raw: object
    submission: CESubmission | None
    errors: list[Note] = field(default_factory=list)
    warnings: list[Note] = field(default_factory=list)
    credited_hours: Decimal | None = None  # set by the judging step; else converted here
    rule_notes: list[Note] = field(default_factory=list)
    row: int | None = None  # row number in a batch file
    prepared: Prepared | None = None  # filled by :func:`prepare` (here or in a parse worker)
    source_record_id: str | None = None  # the native id, to name a row rejected unparsed
    # (source id, content hash) of a submission the rules refused: if it repeats the stored
    # version exactly, it is a resend (duplicate), whatever today's rules say of it
    refused: tuple[str, str] | None = None
    # When it reached the gateway, for a stored rejection judged again (revalidation, an ops
    # edit): the version it makes says so in ``source.received_at``, not the time of the rerun.
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Prepared:
    """Everything ingest needs of a valid submission, as plain values.

    Computing it is the CPU-heavy, database-free half of ingest (serialise, hash, convert), so
    batch processing does it in a parse worker process and ships this across: plain values
    pickle in a few microseconds where the pydantic models took ~25 µs a row.
    """

    source_record_id: str
    sub_json: str
    content_hash: str
    natural_key: str
    person_key: str
    claim: str  # the hours it is worth, before caps (_claim): what "the same hours" compares
    year: int
    completed_on: date
    masked_id: str
    hours: Decimal  # after conversion, before caps
    rule_notes: tuple[dict[str, Any], ...]
    warnings: tuple[dict[str, Any], ...]
    category: str
    activity_type: str
    counts_year: int
    cap_type: str | None
    review_authority: str
    reference_version: str
    mode: str
    started_on: date | None
    time_hours: Decimal | None  # claimed time (hours units), for R14's day totals
    # What R11 says of it as a change of a stored record (rules.Judgement.change_errors):
    # refused, or counted toward another year with more rule notes (a deferral)
    change_errors: tuple[dict[str, Any], ...] = ()
    change_counts_year: int | None = None
    change_rule_notes: tuple[dict[str, Any], ...] = ()
    # R7: a national competition award that covers the tenure's professional hours
    covers_professional: bool = False

    def __reduce__(self) -> tuple[type[Prepared], tuple[Any, ...]]:
        # Pickled as a tuple of its fields: the dataclass default (a state list, set back field
        # by field) made a shipped row cost 13-15 µs to pickle in a parse worker, now 10.
        return Prepared, _prepared_fields(self)


_prepared_fields = attrgetter(*(f.name for f in fields(Prepared)))


@dataclass(frozen=True)
class RulesContext:
    """What the rules judge with: reference data (one version per chunk) and configuration."""

    reference: Reference
    config: RulesConfig

    @classmethod
    def empty(cls) -> RulesContext:
        """No reference data, and the deployment's configuration (``CE_GATEWAY_*``).

        Not the notice's bare defaults: a caller that passes no rules must still honour a
        configured year-close extension or credit rate, or it would judge otherwise than
        the gateway does.
        """
        return cls(EmptyReference(), RulesConfig.from_settings(Settings()))


def prepare(item: Item, partner: PartnerRef, now: datetime, rules: RulesContext) -> None:
    """Judge an item with a parsed submission: fill ``item.prepared`` or ``item.errors``."""
    sub = item.submission
    if item.prepared is not None or sub is None or item.errors:
        return
    item.errors = _unstorable(sub)
    if item.errors:
        return
    item.errors = _scope_errors(partner, sub)
    if item.errors:
        item.refused = (sub.source_record_id, dedup.hash_json(sub.model_dump_json()))
        return
    verdict = judge(sub, adapter=partner.adapter, received_at=now, reference=rules.reference,
                    config=rules.config)
    item.warnings = [*item.warnings, *verdict.warnings]
    if verdict.errors:
        item.errors = verdict.errors
        # Judged today, an accepted record resent after its year closed (R11) or its base
        # was revoked is refused; the chunk answers it as the duplicate it is (SPEC §2, §7).
        item.refused = (sub.source_record_id, dedup.hash_json(sub.model_dump_json()))
        return
    try:
        _HOURS.validate_python(verdict.hours)
    except ValidationError:
        item.errors = [error_note("SCHEMA", "claimed.quantity",
                                  f"(worth {verdict.hours} hours; at most 999999.9)")]
        return
    item.credited_hours, item.rule_notes = verdict.hours, verdict.rule_notes
    sub_json, keys = sub.model_dump_json(), rules.config.keys
    item.prepared = Prepared(
        source_record_id=sub.source_record_id, sub_json=sub_json,
        content_hash=dedup.hash_json(sub_json), natural_key=dedup.natural_key(sub, keys),
        person_key=dedup.person_key(sub, keys), claim=_claim(verdict.hours), year=sub.year,
        completed_on=sub.activity.completed_on, masked_id=mask_id(sub.person.id_number),
        hours=verdict.hours,
        rule_notes=tuple(n.model_dump(mode="json") for n in item.rule_notes),
        warnings=tuple(n.model_dump(mode="json") for n in item.warnings),
        category=sub.category.value, activity_type=sub.activity_type.value,
        counts_year=verdict.counts_toward_year, cap_type=verdict.cap_type,
        review_authority=verdict.review_authority, reference_version=verdict.reference_version,
        mode=sub.activity.mode.value, started_on=sub.activity.started_on,
        time_hours=sub.claimed.quantity
        if sub.claimed.unit.value == "hours" and sub.activity_type in TIME_ACTIVITIES else None,
        change_errors=tuple(n.model_dump(mode="json") for n in verdict.change_errors),
        change_counts_year=verdict.change_counts_toward_year,
        change_rule_notes=tuple(n.model_dump(mode="json") for n in verdict.change_rule_notes),
        covers_professional=verdict.covers_professional_requirement)


_id_lock = threading.Lock()
_last_id = 0


def new_record_id() -> str:
    """``R`` + 12 hex digits of milliseconds + 12 random: unique and time-ordered.

    Time order lets the primary-key index grow at its end instead of splitting pages all
    over the tree during bulk ingest (measured: +20 % rows/s on SQLite).
    """
    global _last_id
    with _id_lock:
        # Strictly increasing within a process, so records of one chunk keep their input order
        # (caps are allocated in record-id order: first come, first served).
        candidate = (time.time_ns() // 1_000_000) << 48 | int.from_bytes(os.urandom(6), "big")
        _last_id = max(candidate, _last_id + 1)
        return f"R{_last_id:024x}"


def error_note(code: str, field_name: str | None = None, detail: str | None = None,
               detail_zh: str | None = None) -> Note:
    """A catalogued code's note, built unvalidated.

    Every part is a string made here (the catalogue's words, a detail), and R14 makes one
    for many rows of a batch: validating each cost 28 µs.
    """
    en, zh = message(code)
    return Note.model_construct(code=code, field=field_name,
                                message=f"{en} {detail}" if detail else en,
                                message_zh=f"{zh}{detail_zh}" if detail_zh else zh)


def item_from_raw(raw: object) -> Item:
    v = validate_submission(raw)
    return Item(raw, v.submission, list(v.errors), list(v.warnings))


def _scope_errors(partner: PartnerRef, sub: CESubmission) -> list[Note]:
    """A partner may only report its own base's activities (SPEC §7), and a partner of no base none.

    A base partner with no base code (stored before registration required one) may report
    nothing: its rows are refused here too, whichever way they came (a queued roster, a
    revalidation).  ``provider_code`` names a base (SPEC §3, "when from a base"), and a record
    naming one is judged as that base's training against its filed plans (R5), so a partner
    registered for no base (a canonical relay) may not name one.  The college, health and
    finance adapters set their own provider code, not a base's (``NOT_BASE_PROVIDERS``).
    """
    if partner.adapter in BASE_ADAPTERS and not partner.base_code:
        return [error_note("SCOPE_VIOLATION", "activity.provider_code",
                           "(partner has no base code registered)", "（合作方未登记基地代码）")]
    provider = sub.activity.provider_code
    if not provider or provider == partner.base_code or partner.adapter in NOT_BASE_PROVIDERS:
        return []
    if partner.base_code:
        return [error_note("SCOPE_VIOLATION", "activity.provider_code",
                           f"(partner is registered for base {partner.base_code})",
                           f"（合作方登记的基地为 {partner.base_code}）")]
    return [error_note("SCOPE_VIOLATION", "activity.provider_code",
                       "(partner is registered for no base)", "（合作方未登记为任何基地）")]


_HOURS = TypeAdapter(Hours)


def _unstorable(sub: CESubmission) -> list[Note]:
    """Errors for a submission that parses but cannot be stored, so it fails alone.

    PostgreSQL text refuses NUL (and credited hours beyond ``CERecord``'s 999999.9 are refused
    after judging): either would otherwise fail the whole chunk (SPEC §5 "one bad record never
    fails its neighbours").
    """
    if "\x00" in sub.source_record_id:
        return [error_note("SCHEMA", "source_record_id", "(contains a NUL character)")]
    return []


def _no_nul(text: str | None) -> str | None:
    """A partner's id as a column takes it: no NUL, no lone surrogate (``storable_text``)."""
    return None if text is None else storable_text(text)


# A partner's own id for a record, by the name its native format gives it (SPEC §8).
_SOURCE_ID_KEYS = ("source_record_id", "result_id", "xh", "记录编号", "流水号")


def _source_id_of(raw: object) -> str | None:
    """The partner's id of a submission rejected before it parsed, to answer and file it by."""
    if isinstance(raw, dict):
        for key in _SOURCE_ID_KEYS:
            value = raw.get(key)
            if value not in (None, ""):
                return str(value)[:64]
    return None


def _claim(hours: Decimal) -> str:
    """What two reports of one activity compare: the hours each is worth, before caps.

    SPEC §7: the same activity with the same hours is a ``duplicate``, with other hours a
    ``conflict``.  Hours, not the claimed unit and quantity: a paper one source reports as
    sole-authored (10 h) and another as co-authored (5 h) claims "1 paper" in both, and two
    credits at 3.6 h a credit are the same 7.2 h as 7.2 hours.  One spelling for a number
    (``7.20`` is ``7.2``).
    """
    return format(hours.normalize(), "f")
