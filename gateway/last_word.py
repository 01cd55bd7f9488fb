"""A partner's last word on a source id: which stored rejections it has overtaken since.

Revalidation (:mod:`gateway.revalidate`) and an ops edit of a rejection replay what a partner
sent and was refused.  Only its *last word* on that ``source_record_id`` may be replayed: an
older rejection the partner has since followed with another submission — accepted, corrected,
resent unchanged, refused again, or a ``DELETE`` — would, replayed, make old content the record's
newest version or bring a withdrawn record back.

The partner's words are already stored, in time order: its rejections (``received_at``, kept
when a rejection is refused again) and, for a record it sent, the audit trail's events with the
partner as actor (:data:`WORDS`).  Versions the gateway or ops made (caps re-issued, a successor,
a conflict resolved) are not the partner's word and overtake nothing.  Words of one moment (one
request or batch chunk, which commit together) are ordered by the audit trail, which has them in
the order they were decided.

May touch: ``rejections``, ``records`` and ``audit_events`` — read only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection, select

from gateway.masking import mask_text
from gateway.store.tables import audit_events, records, rejections

__all__ = ["WORDS", "Arrival", "parts", "stale_rejections"]

# The audit events that are a partner's word on a record it sent (actor: the partner): a
# submission stored (first, a correction, a resend of it unchanged) or a withdrawal (DELETE, or
# a failed result).
WORDS = ("received", "corrected", "duplicate", "withdrawn")
_PAGE = 500  # rows a read


@dataclass(frozen=True)
class Arrival:
    """What :func:`stale_rejections` reads of a rejection (a row of ``rejections`` will do)."""

    id: int
    partner_id: str
    source_record_id: str | None
    received_at: datetime


def stale_rejections(conn: Connection, rows: Sequence[Any], *,
                     ignore_at: datetime | None = None) -> set[int]:
    """The ids of ``rows`` (rejections) that are no longer their partner's last word.

    A rejection is overtaken by the same partner's later submission of the same source id:
    another rejection (later by arrival, then id), or a word on its record in the audit trail
    (:data:`WORDS`).  ``ignore_at`` leaves out what was written at that time: the caller's own
    transaction, when it checks again before committing.
    """
    keyed = [r for r in rows if r.source_record_id is not None]
    by_partner: dict[str, set[str]] = {}
    for r in keyed:
        by_partner.setdefault(r.partner_id, set()).add(r.source_record_id)
    last_refused: dict[tuple[str, str], tuple[datetime, int]] = {}
    record_of: dict[str, tuple[str, str]] = {}  # record id → (partner, source id)
    for pid, sids in sorted(by_partner.items()):
        for part in parts(sorted(sids)):
            refused = select(rejections.c.id, rejections.c.source_record_id,
                             rejections.c.received_at).where(
                rejections.c.partner_id == pid, rejections.c.source_record_id.in_(part))
            if ignore_at is not None:
                refused = refused.where(rejections.c.received_at != ignore_at)
            for rid, sid, at in conn.execute(refused):
                if (at, rid) > last_refused.get((pid, sid), (at, 0)):
                    last_refused[(pid, sid)] = (at, rid)
            record_of.update((rec, (pid, sid)) for rec, sid in conn.execute(
                select(records.c.record_id, records.c.source_record_id).where(
                    records.c.partner_id == pid, records.c.source_record_id.in_(part))))
    actors = {pid: mask_text(pid) for pid in by_partner}  # as audit.append wrote them
    last_word: dict[tuple[str, str], tuple[datetime, int]] = {}
    for part in parts(sorted(record_of)):
        words = select(audit_events.c.record_id, audit_events.c.actor, audit_events.c.occurred_at,
                       audit_events.c.seq).where(audit_events.c.record_id.in_(part),
                                                 audit_events.c.kind.in_(WORDS))
        if ignore_at is not None:
            words = words.where(audit_events.c.occurred_at != ignore_at)
        for rec, actor, at, seq in conn.execute(words):
            key = record_of[rec]
            if actor == actors[key[0]] and (at, seq) > last_word.get(key, (at, 0)):
                last_word[key] = (at, seq)
    stale: set[int] = set()
    ties: list[tuple[Any, int]] = []  # (rejection, seq of the word stored at its moment)
    for r in keyed:
        key = (r.partner_id, r.source_record_id)
        if last_refused.get(key, (r.received_at, r.id)) > (r.received_at, r.id):
            stale.add(r.id)
        elif (word := last_word.get(key)) is not None and word[0] >= r.received_at:
            if word[0] > r.received_at:
                stale.add(r.id)
            else:
                ties.append((r, word[1]))
    if ties:
        stale |= _decided_before(conn, ties, actors)
    return stale


def _decided_before(conn: Connection, ties: list[tuple[Any, int]],
                    actors: dict[str, str]) -> set[int]:
    """Of rejections stored at the moment of a word on their record, those decided before it.

    Both came in one request or batch chunk (or at one ``now``): the audit trail has that
    moment's events in the order they were decided, one after another.  The rejection stands
    only if its ``rejected`` event comes after the word's.  One walk per moment, from its first
    word on, while the events are of that moment.
    """
    by_moment: dict[datetime, list[tuple[Any, int]]] = {}
    for r, seq in ties:
        by_moment.setdefault(r.received_at, []).append((r, seq))
    stale: set[int] = set()
    for at, group in by_moment.items():
        refused: dict[tuple[str, str], int] = {}  # (actor, source id) → its last rejected event
        after = min(seq for _, seq in group)
        while True:
            page = conn.execute(select(audit_events.c.seq, audit_events.c.occurred_at,
                                       audit_events.c.kind, audit_events.c.actor,
                                       audit_events.c.detail)
                                .where(audit_events.c.seq > after)
                                .order_by(audit_events.c.seq).limit(_PAGE)).all()
            moment = [e for e in page if e.occurred_at == at]
            for e in moment:
                if e.kind == "rejected":
                    sid = orjson.loads(e.detail).get("source_record_id")
                    if isinstance(sid, str):
                        refused[(e.actor, sid)] = e.seq
            if len(moment) < _PAGE:
                break
            after = page[-1].seq
        for r, seq in group:
            actor, sid = actors[r.partner_id], r.source_record_id
            # The audit text masks identity numbers, a source id's too.
            if max(refused.get((actor, sid), 0), refused.get((actor, mask_text(sid)), 0)) < seq:
                stale.add(r.id)
    return stale


def parts(values: Sequence[Any], size: int = _PAGE) -> Iterable[Sequence[Any]]:
    """``values`` in slices of ``size``: bounded ``IN (…)`` lists."""
    for start in range(0, len(values), size):
        yield values[start:start + size]
