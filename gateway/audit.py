"""Append-only, hash-chained audit trail (SPEC §7 "Audit").

Every state change of a record and every operator action becomes an event whose hash covers
the previous event's hash, its own sequence number and its content.  ``verify`` walks the chain
and names the first event that was edited, deleted or moved; the one-row ``audit_head`` table
(locked by every appender, so the chain stays linear across processes) also exposes truncation
of the tail.  Identity numbers are masked before anything is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, select, update

from gateway.masking import mask_text, masked
from gateway.store.bulk import bulk_insert
from gateway.store.tables import audit_events, audit_head
from gateway.store.util import dumps_storable

GENESIS_HASH = "0" * 64
# Who acted, as the column holds it: a longer name (an operator's --actor) is cut, as shown.
ACTOR_LENGTH = 64


@dataclass(frozen=True)
class Event:
    kind: str
    record_id: str | None = None
    version: int | None = None
    actor: str = "gateway"
    detail: dict[str, Any] = field(default_factory=dict)


_DETAIL_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS


def _canonical_detail(detail: dict[str, Any]) -> str:
    # A partner's text may hold what orjson refuses (a lone surrogate in a rejected row's id).
    text = dumps_storable(detail, _DETAIL_OPTIONS)
    if "\\" not in text and mask_text(text) == text:  # the common case: nothing to mask
        return text
    # Mask the values, then write them: JSON writes a tab or a line break as an escape, which
    # hides an identity number whose groups they split from the text's masking, and a number
    # held as a JSON number, masked in the text, would no longer parse.
    return dumps_storable(masked(orjson.loads(text)), _DETAIL_OPTIONS)


def _material(prev_hash: str, seq: int, event_id: str, at: str, kind: str,
              record_id: str | None, version: int | None, actor: str, detail: str) -> bytes:
    """What an event's hash covers: its fields after the previous hash, joined by U+001F."""
    return "\x1f".join([prev_hash, str(seq), event_id, at, kind, record_id or "",
                         "" if version is None else str(version), actor, detail]).encode()


def _hash(prev_hash: str, seq: int, row: dict[str, Any]) -> str:
    return hashlib.sha256(_material(
        prev_hash, seq, row["event_id"], row["occurred_at"].astimezone(UTC).isoformat(),
        row["kind"], row["record_id"], row["version"], row["actor"], row["detail"])).hexdigest()


def append(conn: Connection, events: Sequence[Event], now: datetime | None = None) -> None:
    """Append ``events`` in order inside the caller's transaction."""
    if not events:
        return
    now = now or datetime.now(UTC)
    head = conn.execute(
        select(audit_head.c.last_seq, audit_head.c.last_hash)
        .where(audit_head.c.id == 1)
        .with_for_update()
    ).one()
    seq, prev = int(head.last_seq), str(head.last_hash)
    # A batch chunk appends thousands of events at one time by a handful of actors: the time's
    # text, the masked actors and the random ids (one read of the OS's generator) once each.
    at = now.astimezone(UTC).isoformat()
    ids = os.urandom(12 * len(events)).hex()
    actors: dict[str, str] = {}
    rows = []
    for n, event in enumerate(events):
        seq += 1
        actor = actors.get(event.actor)
        if actor is None:
            actor = actors[event.actor] = mask_text(event.actor)[:ACTOR_LENGTH]
        event_id = ids[24 * n:24 * n + 24]
        detail = _canonical_detail(event.detail) if event.detail else "{}"
        digest = hashlib.sha256(_material(prev, seq, event_id, at, event.kind, event.record_id,
                                          event.version, actor, detail)).hexdigest()
        rows.append({"seq": seq, "event_id": event_id, "occurred_at": now, "kind": event.kind,
                     "record_id": event.record_id, "version": event.version, "actor": actor,
                     "detail": detail, "prev_hash": prev, "hash": digest})
        prev = digest
    bulk_insert(conn, audit_events, rows)
    conn.execute(update(audit_head).where(audit_head.c.id == 1).values(last_seq=seq, last_hash=prev))


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None
    # What is wrong, for code: missing | rewritten | unchained | altered | truncated | anchor
    problem: str | None = None
    # A sound chain's head (its last event's number and hash): the anchor to keep outside the
    # database, so a later rewrite of everything from some event on is seen.
    head_seq: int | None = None
    head_hash: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "first_bad_seq": self.first_bad_seq,
                "reason": self.reason, "problem": self.problem, "head_seq": self.head_seq,
                "head_hash": self.head_hash}


def parse_anchor(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` as ``verify --json`` printed them (``head_seq``, ``head_hash``).

    Raises :class:`ValueError` for anything else.
    """
    seq, _, digest = text.strip().partition(":")
    if not (seq.isascii() and seq.isdigit() and 0 < int(seq) < 2**63
            and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError("an anchor is SEQ:HASH, the head_seq and head_hash a sound chain's "
                         "verify printed (a positive number, a colon, 64 lowercase hex digits)")
    return int(seq), digest


def verify(conn: Connection, chunk: int = 5000, anchor: tuple[int, str] | None = None
           ) -> VerifyResult:
    """Walk the whole chain; the first mismatch is reported, with its sequence number.

    An edited event fails its own hash; a deleted or renumbered one leaves a gap or breaks its
    successor's ``prev_hash``; swapped events fail at the first of them; an event edited *and
    re-hashed* is named through its successor; a cut tail disagrees with ``audit_head``.  A
    rewrite of everything from some event on, head included, needs an anchor kept outside the
    database to be seen (docs/retention-and-audit.md): given ``anchor`` (an earlier sound
    verify's ``head_seq`` and ``head_hash``), a sound chain whose event at that number carries
    another hash, or that has no such event, is reported too (problem ``anchor``).

    A running gateway appends while this walks, and each read sees what is committed by then
    (READ COMMITTED; SQLite outside a write).  An appender moves the head and adds its events
    in one transaction, so after the head is read every event up to it can be read too: the
    walk goes on to the head it read, and only a chain that still ends short of it is cut.
    """
    walk = _Walk()
    if (bad := walk.through(conn, chunk)) is not None:
        return bad
    head = conn.execute(select(audit_head).where(audit_head.c.id == 1)).mappings().one()
    head_seq = int(head["last_seq"])
    if head_seq > walk.last_seq:  # appended since the walk's last read: read on to this head
        if (bad := walk.through(conn, chunk, up_to=head_seq)) is not None:
            return bad
    if head_seq != walk.last_seq or head["last_hash"] != walk.prev:
        return VerifyResult(False, walk.checked, walk.last_seq + 1,
                            f"chain ends at {walk.last_seq} but the head says {head_seq}",
                            "truncated")
    if anchor is not None and (bad := _off_anchor(conn, anchor, walk.checked)) is not None:
        return bad
    return VerifyResult(True, walk.checked, head_seq=walk.last_seq, head_hash=walk.prev)


def _off_anchor(conn: Connection, anchor: tuple[int, str], checked: int) -> VerifyResult | None:
    seq, digest = anchor
    held = conn.execute(select(audit_events.c.hash).where(audit_events.c.seq == seq)).scalar()
    if held == digest:
        return None
    # Every link is sound, so the chain was rewritten from this event or an earlier one:
    # nothing from the anchor back can be vouched for beyond its being consistent.
    said = ("the chain ends before it" if held is None else "it now carries another hash")
    return VerifyResult(False, min(checked, seq - 1), seq,
                        f"event {seq} does not match the kept anchor ({said}): the chain was "
                        f"rewritten from event {seq} or earlier", "anchor")


@dataclass
class _Walk:
    """Where a walk of the chain stands: the last good event and its hash."""

    prev: str = GENESIS_HASH
    last_seq: int = 0
    checked: int = 0

    def through(self, conn: Connection, chunk: int, up_to: int | None = None) -> VerifyResult | None:
        """Check every event after the last good one (up to ``up_to``); the first bad one."""
        while True:
            query = select(audit_events).where(audit_events.c.seq > self.last_seq)
            if up_to is not None:
                query = query.where(audit_events.c.seq <= up_to)
            rows = conn.execute(query.order_by(audit_events.c.seq).limit(chunk)).mappings().all()
            if not rows:
                return None
            for row in rows:
                if (bad := self._check(row)) is not None:
                    return bad

    def _check(self, row: Any) -> VerifyResult | None:
        seq, expected = int(row["seq"]), self.last_seq + 1
        if seq != expected:
            return VerifyResult(False, self.checked, expected,
                                f"event {expected} is missing (next present is {seq})", "missing")
        if row["prev_hash"] != self.prev:
            if seq > 1 and _hash(row["prev_hash"], seq, dict(row)) == row["hash"]:
                # This event is intact as chained; its predecessor is not the event it was
                # chained to: that one was edited and re-hashed (or replaced).
                return VerifyResult(False, self.checked - 1, seq - 1,
                                    f"event {seq - 1} was rewritten: event {seq} was chained "
                                    "to a different hash", "rewritten")
            return VerifyResult(False, self.checked, seq,
                                "prev_hash does not match the previous event", "unchained")
        if _hash(self.prev, seq, dict(row)) != row["hash"]:
            return VerifyResult(False, self.checked, seq, "event content does not match its hash",
                                "altered")
        self.prev, self.last_seq = row["hash"], seq
        self.checked += 1
        return None


def events_for(conn: Connection, record_ids: Iterable[str]) -> list[dict[str, Any]]:
    ids = list(record_ids)
    rows = conn.execute(
        select(audit_events).where(audit_events.c.record_id.in_(ids)).order_by(audit_events.c.seq)
    ).mappings().all()
    return [
        {
            "seq": int(r["seq"]),
            "at": r["occurred_at"].isoformat(),
            "kind": r["kind"],
            "record_id": r["record_id"],
            "version": r["version"],
            "actor": r["actor"],
            "detail": orjson.loads(r["detail"]),
            "hash": r["hash"],
        }
        for r in rows
    ]
