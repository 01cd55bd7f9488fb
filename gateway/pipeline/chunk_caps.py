"""Caps across records (SPEC §4 R10): the part of ``Chunk`` that credits capped hours.

:class:`ChunkCaps` locks cap groups in the one order every writer keeps (:meth:`_lock_groups`),
allocates each group the chunk touches (:meth:`_apply_caps`), counting in the held reports
expected to take over activities let go here (:meth:`_successors`), and re-issues stored
records whose share moved (:meth:`_reissue`, :meth:`_recredit`).  After the writes and the
succession, ``Chunk._settle_caps`` re-issues the rest of a group from what then stands in it.

It touches the store through :mod:`gateway.pipeline.caps` (the ledger rows it locks, the pins)
and reads ``records`` and ``record_versions``; the rows it decides are written by the chunk
(:mod:`gateway.pipeline.chunk_writes`).
"""

from __future__ import annotations

from decimal import Decimal

import orjson
from sqlalchemy import select

from contracts import RecordStatus
from gateway import audit
from gateway.pipeline import caps
from gateway.pipeline.chunk_state import ChunkState, _Pending
from gateway.pipeline.credit import allocate, cap_note
from gateway.pipeline.succession import _holds, _may_succeed
from gateway.pipeline.versions import next_version
from gateway.pipeline.writer_retry import _KeyRaceLost
from gateway.store.tables import record_versions, records


class ChunkCaps(ChunkState):
    """Caps (R10) for a chunk: lock, allocate, credit, re-issue."""

    # -- caps (R10) -----------------------------------------------------------------------
    def _apply_caps(self, last: dict[str, _Pending]) -> None:
        """Credit this chunk's capped records; their groups' other records are settled later.

        A record that lets an activity go here (withdrawn, corrected away) is succeeded by the
        next report of it after the writes (:func:`succeed`), which joins the group then.  So
        that a record behind them is not lifted by one re-issued version and cut back by the
        next, the successor expected is counted in now (:meth:`_successors`), and the stored
        records whose share moved are re-issued once, after the succession
        (:meth:`_settle_caps`), from the group as it then stands.
        """
        groups: dict[caps.Group, dict[str, _Pending]] = {}
        withdrawn = {w["rid"] for w in self.withdrawals}  # a version of this chunk, withdrawn in it
        # Capped versions forwarded before the record's last word here, with their groups.
        earlier: list[tuple[_Pending, caps.Group]] = []
        for p in self.pending:
            if p.queue and (group := self._group_of(p)) is not None:
                if p is last[p.record_id] and p.record_id not in withdrawn:
                    groups.setdefault(group, {})[p.record_id] = p
                else:
                    earlier.append((p, group))
                    groups.setdefault(group, {})
        for group in self.leaving:
            groups.setdefault(group, {})
        joining = self._successors(last) if self.freed else {}
        for group in joining:
            groups.setdefault(group, {})
        claims: dict[caps.Group, dict[str, Decimal]] = {}
        for group in sorted(groups):  # one lock order for every writer: no deadlocks
            mine = groups[group]
            gone = frozenset(self.leaving.get(group, set()) - set(mine))
            cap = self.config.caps[group[2]]
            self._lock_groups({group})
            hours = {**joining.get(group, {}), **{rid: p.sub.hours for rid, p in mine.items()}}
            credited, stored = caps.reallocate(self.conn, group, cap, self.now, hours,
                                               gone=gone, keys=self.config.keys)
            for rid, p in mine.items():
                self._credit(p, credited[rid], cap)
            claims[group] = {**{rid: s.hours for rid, s in stored.items() if rid not in gone},
                             **hours}
            # Stored records whose share moved are re-issued after the succession; so are those
            # of a group a successor may join or a record leaves.
            if group in joining or group in self.leaving or any(
                    rid not in hours and rid not in gone and credited[rid] != old.credited
                    for rid, old in stored.items()):
                self.unsettled.add(group)
        for p, group in earlier:
            # Forwarded too (every acknowledged version is), so capped too: as if it were the
            # record's last word, against the group as this chunk leaves it.
            cap = self.config.caps[group[2]]
            alone = allocate(sorted({**claims[group], p.record_id: p.sub.hours}.items()), cap)
            self._credit(p, alone[p.record_id], cap)

    @staticmethod
    def _group_of(p: _Pending) -> caps.Group | None:
        # The activity's year, not the year it counts toward (caps: 四(二)1–4 "当年")
        cap_type = p.sub.cap_type
        return (p.sub.person_key, p.sub.year, cap_type) if cap_type else None

    @staticmethod
    def _credit(p: _Pending, credited: Decimal, cap: Decimal) -> None:
        p.credited = credited
        p.row["credited_hours"] = str(credited)
        p.cap = cap_note(p.sub.hours, credited, cap, p.sub.cap_type or "")
        if p.cap is not None:
            p.answer.warnings.append(p.cap[0])

    def _successors(self, last: dict[str, _Pending]) -> dict[caps.Group, dict[str, Decimal]]:
        """The held reports expected to take over activities let go here, by cap group.

        :func:`succeed` decides after the writes; this reads the same beforehand: the earliest
        live duplicate of an activity nobody in the chunk holds, in arrival order — a stored
        report as stored, one this chunk versions or first sees as its last word here says.
        A guess that misses (a stored report corrected onto the activity here) only costs an
        extra re-issue: :meth:`_settle_caps` allocates each group again from what was written.
        """
        mine = self.born | set(self._versioned_ids())
        joining: dict[caps.Group, dict[str, Decimal]] = {}

        def held_here(rid: str, key: str) -> _Pending | None:
            known, p = self.by_record.get(rid), last.get(rid)
            live = (known is not None and p is not None and not known.withdrawn
                    and known.status == RecordStatus.DUPLICATE.value and known.natural_key == key)
            return p if live else None

        for key in sorted(self.freed):
            holder = self.holders.get(key)
            if holder is not None and _holds(self.by_record[holder], key):
                continue
            stored = self.conn.execute(select(records).where(
                records.c.natural_key == key, records.c.withdrawn.is_(False))
                .order_by(records.c.created_at, records.c.record_id)).mappings().all()
            first: tuple[str, Decimal, caps.Group | None] | None = None
            for r in stored:
                if r["record_id"] in mine:
                    p = held_here(r["record_id"], key)
                    if p is not None:
                        first = (p.record_id, p.sub.hours, self._group_of(p))
                elif _may_succeed(self.conn, r):
                    first = (r["record_id"], Decimal(r["hours"] or "0"), caps.group_of(r))
                if first is not None:
                    break
            if first is None:  # first seen here (arrived last, in record id order)
                born = sorted(rid for rid in self.born if held_here(rid, key) is not None)
                if born:
                    p = last[born[0]]
                    first = (p.record_id, p.sub.hours, self._group_of(p))
            if first is not None and first[2] is not None:
                joining.setdefault(first[2], {})[first[0]] = first[1]
        return joining

    def _versioned_ids(self) -> list[str]:
        """The records this chunk versions (corrections, withdrawals) — not new ones."""
        return [u["rid"] for u in self.record_updates] + [w["rid"] for w in self.withdrawals]

    def _reissue(self, group: caps.Group, hours: dict[str, Decimal] | None = None,
                 gone: frozenset[str] = frozenset()) -> dict[str, Decimal]:
        """Allocate a locked ``group`` again; re-issue its stored records whose share moved.

        ``hours`` are records joining or changing here, ``gone`` records leaving (see
        :func:`caps.reallocate`); neither is re-issued.  Returns the credited hours by record.
        """
        hours = hours or {}
        cap = self.config.caps[group[2]]
        credited, stored = caps.reallocate(self.conn, group, cap, self.now, hours, gone=gone,
                                           keys=self.config.keys)
        for rid, old in stored.items():
            if rid not in hours and rid not in gone and credited[rid] != old.credited:
                self._recredit(old, credited[rid], cap, group[2])
        return credited

    def _lock_groups(self, groups: set[caps.Group]) -> None:
        """Lock cap groups in the one order every writer keeps (sorted), or start again.

        A group sorting before one already held cannot be locked now without risking a
        deadlock: it joins ``lock_first`` and the chunk runs again, locking it first.
        """
        new = groups - self.locked
        if not new:
            return
        if self.locked and min(new) < max(self.locked):
            self.lock_first |= new
            raise _KeyRaceLost("cap groups out of order")
        caps.lock_groups(self.conn, new, self.now)
        self.locked |= new

    def _recredit(self, old: caps.Stored, credited: Decimal, cap: Decimal | None,
                  cap_type: str | None) -> int:
        """Re-issue a stored record whose credited hours moved, as a version that counts.

        Its share of a cap moved (another record came or went), or a held record was accepted
        (no cap: ``cap_type`` None).  The notes of a version that did not count go.  Returns
        the new version's number.
        """
        payload = self.conn.execute(
            select(record_versions.c.payload, record_versions.c.content_hash,
                   records.c.version_floor)
            .join(records, records.c.record_id == record_versions.c.record_id)
            .where(record_versions.c.record_id == old.record_id,
                   record_versions.c.version == old.version)).one()
        record = orjson.loads(payload.payload)
        note = (cap_note(old.hours, credited, cap, cap_type)
                if cap is not None and cap_type is not None else None)
        dropped = ("CAP_APPLIED", "NOT_COUNTED")
        keep = [n for n in record["warnings"] if n["code"] not in dropped]
        notes = [n for n in record["rule_notes"] if n["code"] not in dropped]
        version = next_version(old.version, payload.version_floor)
        record.update(version=version, credited_hours=str(credited),
                      warnings=keep + ([note[0].model_dump(mode="json")] if note else []),
                      rule_notes=notes + ([note[1].model_dump(mode="json")] if note else []))
        record["source"]["received_at"] = self.now_iso
        self._store_version(old.record_id, version, orjson.dumps(record).decode(),
                            payload.content_hash, True)
        self.recredited.append({"rid": old.record_id, "current_version": version,
                                "credited_hours": str(credited), "updated_at": self.now})
        self.events.append(audit.Event("recredited", old.record_id, version, "gateway", {
            "cap_type": cap_type, "credited_hours": str(credited),
            "previous_credited_hours": str(old.credited)}))
        return version
