"""What other records do when one stops or starts counting (SPEC §7 "Dedup", §4 R10).

- Succession: an activity a record let go (withdrawn, corrected away) goes to the next report
  of it held as a duplicate (:func:`succeed`), which is accepted and forwarded
  (:func:`accept_held`, which ops also use to resolve a conflict).
- A refusal downstream that lands or is requeued moves its cap group's shares
  (:func:`reallocate_after_delivery`, for the delivery worker and ops).
- Who holds an activity: the ``natural_keys`` row and whether the record it names still holds
  it (:func:`_still_holds`, :func:`_live_holder`, :func:`_claim_key`), which the chunk reads too.

Each runs in its caller's transaction, writing through a :class:`gateway.pipeline.ingest.Chunk`
it makes, and returns the audit events for the caller to append last.  ``Chunk`` is imported
where it is used: ``Chunk.run`` calls :func:`succeed`, so ingest imports this module first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from sqlalchemy import Connection, select, text, update

from contracts import RecordStatus
from gateway import audit
from gateway.pipeline import caps
from gateway.pipeline.chunk_state import _chunks, _Known, _queued
from gateway.pipeline.items import PartnerRef
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.writer_retry import _KeyRaceLost
from gateway.store.bulk import bulk_insert
from gateway.store.tables import HELD, natural_keys, record_versions, records

if TYPE_CHECKING:
    from gateway.pipeline.ingest import Chunk


def reallocate_after_delivery(conn: Connection, config: RulesConfig, now: datetime,
                              touched: Iterable[tuple[str, int]], *, actor: str,
                              reason: str) -> list[audit.Event]:
    """Allocate again the cap groups of records whose refusal downstream came or went (R10).

    ``touched`` are ``(record_id, version)`` deliveries the caller moved in this transaction:
    dead-lettered ``DOWNSTREAM_REJECTED`` by the delivery worker, or requeued by ops.  A record
    whose *current* version is refused for good counts nowhere (the compliance report lists it
    under ``not_counted``), so :func:`caps.stored_records` leaves it out: its share goes to the
    rest of its group, and a requeued record takes it back.  Records whose share moved are
    re-issued and forwarded, as after a withdrawal.  A refused record the management system
    still counts in its group by an earlier version keeps a share, but of that version's hours
    (:func:`caps.stored_records`), so its group is allocated again too; a requeued one takes
    back the hours freed meanwhile.  ``cap_reallocated`` is recorded only when a share moved.
    An older version's
    delivery changes nothing, and neither does a record no longer counted (withdrawn, held),
    which holds no share.

    Locks as ingest does: the groups in sorted order, then the records it re-issues.  A record
    corrected meanwhile was allocated by its own chunk under the same lock; this allocation then
    finds nothing to move.  Returns the audit events for the caller to append last.
    """
    from gateway.pipeline.ingest import Chunk  # not above: Chunk.run calls succeed()
    wanted = dict(touched)
    # Where a refused record's applied version counts is pinned (caps.refused_pins): its
    # records row may say another type, person or year.  A requeued record's pin goes: its
    # version will count where the row says.  The groups of both are allocated again.
    before = caps.pins_of(conn, wanted)
    pins = caps.pins_for(conn, caps.refused_now(conn, wanted), now, config.keys)
    moved = {g for g in before.values() if g} | {
        g for g in caps.pin_groups(conn, pins).values() if g}
    current: list[tuple[str, int, caps.Group]] = []
    for part in _chunks(sorted(wanted)):
        for r in conn.execute(select(
                records.c.record_id, records.c.current_version, records.c.person_key,
                records.c.year, records.c.cap_type).where(
                records.c.record_id.in_(part), records.c.status == RecordStatus.ACCEPTED.value,
                records.c.withdrawn.is_(False))).mappings():
            group = caps.group_of(r)
            if group is not None and int(r["current_version"]) == wanted[r["record_id"]]:
                current.append((r["record_id"], int(r["current_version"]), group))
    groups = {group for _, _, group in current} | moved
    caps.lock_groups(conn, groups, now)
    if before or pins:
        # The records after their groups, the order chunks lock in: a correction committed
        # meanwhile made the refusal old news, and one waiting sees the pins (_check_reads).
        ids = sorted(wanted)
        for part in _chunks(ids):
            conn.execute(select(records.c.record_id).where(records.c.record_id.in_(part))
                         .with_for_update(read=True)).all()
        still = caps.refused_now(conn, [p["record_id"] for p in pins])
        caps.write_pins(conn, ids, [p for p in pins if p["record_id"] in still])
    if not groups:
        return []
    chunk = Chunk(conn, PartnerRef(actor, "gateway"), now, None, config)
    for group in sorted(groups):
        chunk._reissue(group)
    if not chunk.recredited:
        return []  # nothing moved (a pinned record kept the hours it held): nothing to say
    chunk._write(with_audit=False)
    return [audit.Event("cap_reallocated", rid, version, actor,
                        {"cap_type": group[2], "reason": reason})
            for rid, version, group in current] + chunk.events


def accept_held(chunk: Chunk, rec: Any, leaving: dict[caps.Group, set[str]] | None = None,
                joining: Sequence[Any] = ()) -> int:
    """Accept a held record (a duplicate or a conflict) and queue its current version.

    Its hours join its cap group (R10) in one allocation with the records ``leaving`` theirs
    and the held records ``joining`` next in this transaction (each accepted by its own call);
    records whose share moves are re-issued.  It takes its activity's natural key.  Returns
    the version queued: a new one when its share of a cap differs from what its held version
    says.  The caller writes the chunk.
    """
    conn, now = chunk.conn, chunk.now
    record_id, version = str(rec["record_id"]), int(rec["current_version"])
    groups: dict[caps.Group, tuple[dict[str, Decimal], set[str]]] = {
        group: ({}, set(gone)) for group, gone in (leaving or {}).items()}
    hours = Decimal(rec["hours"] or "0")
    credited_this, this_cap = hours, None
    for other in joining:  # held records accepted next, in this transaction: counted in now
        if (group := caps.group_of(other)) is not None:
            groups.setdefault(group, ({}, set()))[0][str(other["record_id"])] = Decimal(
                other["hours"] or "0")
    if (group := caps.group_of(rec)) is not None:
        groups.setdefault(group, ({}, set()))[0][record_id] = hours
    # Pinned where its refused 0-hour version's predecessor counts (caps.refused_pins): the
    # version queued now replaces that one there, so the pin ends and that group is freed.
    pinned = caps.pins_of(conn, [record_id])
    if pinned:
        caps.write_pins(conn, [record_id], [])
        for pin in pinned.values():
            if pin is not None and pin != group:  # in its own group it claims its hours
                groups.setdefault(pin, ({}, set()))[1].add(record_id)
    for group in sorted(groups):  # one lock order for every writer (as ingest)
        mine, gone = groups[group]
        caps.lock_group(conn, group, now)
        credited = chunk._reissue(group, mine, frozenset(gone))
        if record_id in mine:
            credited_this, this_cap = credited[record_id], (chunk.config.caps[group[2]], group[2])
    if _claim_key(conn, rec["natural_key"], record_id) != record_id:
        raise _KeyRaceLost(rec["natural_key"])  # a live record took the activity first: run again
    held = orjson.loads(conn.execute(select(record_versions.c.payload).where(
        record_versions.c.record_id == record_id,
        record_versions.c.version == version)).scalar_one())
    stored_credited = Decimal(str(held["credited_hours"]))
    conn.execute(update(records).where(records.c.record_id == record_id).values(
        status="accepted", duplicate_of=None, credited_hours=str(credited_this), updated_at=now))
    if (credited_this != stored_credited or _queued(conn, record_id, version)
            or any(n["code"] == "NOT_COUNTED" for n in held["warnings"])):
        # Its held version says other hours (its share of a cap, or none: a correction that
        # stopped counting was sent so), or was sent already: re-issue it, counting.
        return chunk._recredit(caps.Stored(record_id, version, hours, stored_credited),
                               credited_this, *(this_cap or (None, None)))
    # Its held version is stored already: only queue it.
    chunk.outbox_rows.append({"record_id": record_id, "version": version, "status": "pending",
                              "attempts": 0, "created_at": now, "updated_at": now})
    chunk.events.append(audit.Event("queued", record_id, version))
    return version


def succeed(conn: Connection, config: RulesConfig, now: datetime,
            freed: dict[str, set[str]]) -> list[audit.Event]:
    """Hand each activity a record let go to the next report of it (SPEC §7 "Dedup").

    ``freed`` maps a natural key to the records that let it go here: withdrawn, or corrected
    to another person, activity or date.  Other sources' reports of that activity were kept
    as duplicates, not forwarded; left so, the person would lose hours two systems recorded.
    If a live record holds the key now (a newcomer), they are linked to it.  Otherwise the
    earliest duplicate takes the key, is accepted and forwarded (its hours join its cap
    group), and the others are linked to it.  Conflicts (other hours) stay held for ops, who
    choose with ``resolve_conflict``.  Runs in the caller's transaction, after its writes;
    returns the audit events for the caller to append last (see :meth:`Chunk.run`).
    """
    from gateway.pipeline.ingest import Chunk  # not above: Chunk.run calls succeed()
    events: list[audit.Event] = []
    successors: list[Any] = []
    for key in sorted(freed):
        held = conn.execute(select(records).where(
            records.c.natural_key == key, text(HELD),
            records.c.withdrawn.is_(False)).order_by(records.c.created_at, records.c.record_id)
        ).mappings().all()
        if not held:
            continue
        holder = _live_holder(conn, key)
        successor = None if holder is not None else next(
            (r for r in held if _may_succeed(conn, r)), None)
        if successor is not None:
            holder = _claim_key(conn, key, str(successor["record_id"]))
        if holder is None:
            continue  # only conflicts: ops choose
        if successor is not None and holder == successor["record_id"]:
            successors.append(successor)
        others = [r["record_id"] for r in held
                  if r["record_id"] != holder and r["duplicate_of"] != holder]
        if others:
            conn.execute(update(records).where(records.c.record_id.in_(others))
                         .values(duplicate_of=holder, updated_at=now))
    # Accepted one by one, each in one allocation with those still to come: a record behind
    # them in a cap group moves once, not up with the first and down with the next.
    for i, successor in enumerate(successors):
        holder = str(successor["record_id"])
        chunk = Chunk(conn, PartnerRef(successor["partner_id"], successor["adapter"]), now,
                      None, config)
        chunk.events.append(audit.Event("succeeded", holder, int(successor["current_version"]),
                                        "gateway", {"replaces": sorted(freed[successor["natural_key"]])}))
        accept_held(chunk, successor, joining=successors[i + 1:])
        chunk._write(with_audit=False)
        events += chunk.events
    return events


def _still_holds(withdrawn: bool, status: str, natural_key: str, key: str) -> bool:
    """Whether the record a natural_keys row names for ``key`` still holds that activity.

    Not withdrawn, still counted (not a repeat or conflict), still reporting it.
    """
    return not withdrawn and status == RecordStatus.ACCEPTED.value and natural_key == key


def _holds(known: _Known, key: str) -> bool:
    return _still_holds(known.withdrawn, known.status, known.natural_key, key)


# The record a natural_keys row names, with what _still_holds needs.
_NAMED = (select(natural_keys.c.natural_key, natural_keys.c.record_id, records.c.withdrawn,
                 records.c.status, records.c.natural_key.label("holds"))
          .join(records, records.c.record_id == natural_keys.c.record_id))


def _live_holder(conn: Connection, key: str) -> str | None:
    """The record holding ``key``: none if the row names one that no longer holds it."""
    row = conn.execute(_NAMED.where(natural_keys.c.natural_key == key)).first()
    if row is None or not _still_holds(row.withdrawn, row.status, row.holds, key):
        return None
    return str(row.record_id)


def _claim_key(conn: Connection, key: str, record_id: str) -> str | None:
    """Give ``key`` to ``record_id`` unless a live record holds it; its live holder after."""
    if _live_holder(conn, key) is None:
        conn.execute(update(natural_keys).where(natural_keys.c.natural_key == key)
                     .values(record_id=record_id))
        bulk_insert(conn, natural_keys, [{"natural_key": key, "record_id": record_id}],
                    ignore_conflicts=True)
    named = conn.execute(select(natural_keys.c.record_id)
                         .where(natural_keys.c.natural_key == key)).scalar()
    return record_id if named == record_id else _live_holder(conn, key)


def _may_succeed(conn: Connection, rec: Any) -> bool:
    """Whether a held record may take over its activity.

    A repeat (not a conflict: ops decide those) whose payload is still there to send.
    """
    return rec["status"] == RecordStatus.DUPLICATE.value and not _pruned(conn, rec)


def _pruned(conn: Connection, rec: Any) -> bool:
    payload = conn.execute(select(record_versions.c.payload).where(
        record_versions.c.record_id == rec["record_id"],
        record_versions.c.version == rec["current_version"])).scalar()
    return payload is None or orjson.loads(payload).get("pruned") is True
