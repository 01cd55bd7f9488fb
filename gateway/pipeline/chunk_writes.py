"""The chunk's writes: check what its decisions read, then one ``executemany`` a table.

:class:`ChunkWrites` first locks and checks what the chunk decided on (:meth:`_check_reads`): a
change lost to a concurrent replica raises ``_KeyRaceLost``, and the chunk runs again
(:mod:`gateway.pipeline.writer_retry`).  Then it writes the natural keys (claimed with
``ON CONFLICT DO NOTHING`` and read back, :meth:`_check_named`), records, versions, the outbox,
rejections, batch repeats and the audit events.  ``RULES_COLUMNS`` and :func:`_rules_columns`
are the rules' verdict as ``records`` columns.

The only part of ``Chunk`` that writes; it decides nothing.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, delete, select, update

from gateway import audit
from gateway.pipeline import caps
from gateway.pipeline.chunk_state import ChunkState, _chunks
from gateway.pipeline.items import Prepared
from gateway.pipeline.succession import _NAMED, _still_holds
from gateway.pipeline.writer_retry import _KeyRaceLost
from gateway.store.bulk import bulk_insert
from gateway.store.tables import (
    batch_repeats,
    natural_keys,
    outbox,
    record_versions,
    records,
    rejections,
)

RULES_COLUMNS = ("category", "activity_type", "counts_year", "hours", "credited_hours",
                 "cap_type", "review_authority", "reference_version", "mode", "started_on",
                 "time_hours", "covers_professional")


def _rules_columns(sub: Prepared) -> dict[str, Any]:
    """The rules' verdict as record columns; ``credited_hours`` is final after caps."""
    return {"category": sub.category, "activity_type": sub.activity_type,
            "counts_year": sub.counts_year, "hours": str(sub.hours),
            "credited_hours": str(sub.hours), "cap_type": sub.cap_type,
            "review_authority": sub.review_authority, "reference_version": sub.reference_version,
            "mode": sub.mode, "started_on": sub.started_on,
            "time_hours": None if sub.time_hours is None else str(sub.time_hours),
            "covers_professional": sub.covers_professional}


class ChunkWrites(ChunkState):
    """The checks and writes that end a chunk."""

    # -- writes ---------------------------------------------------------------------------
    def _check_reads(self) -> None:
        """Lock, and check, what the decisions read.

        On PostgreSQL another writer may have changed it since (READ COMMITTED); SQLite has
        one writer, and the checks just pass.

        - Records this chunk versions: still as read (a promotion, a correction, a withdrawal
          by another replica would otherwise be overwritten).  ``FOR UPDATE``.
        - Activities a record was judged a repeat or conflict of: still held by that record
          (else its withdrawal's succession ran before this chunk's record existed, and the
          record would be nobody's).  ``FOR SHARE``, so such a withdrawal waits for us.
        - Activities given back here: ``FOR UPDATE``, so a chunk judging against them waits.
        - The pins of the records it versions (caps.refused_pins): still as read.  A refusal
          landing meanwhile pinned the record; it locks the record before it writes the pin.
        A change lost to a twin raises :class:`_KeyRaceLost`: the chunk runs again.
        """
        conn = self.conn
        touched = sorted({u["rid"] for u in self.record_updates}
                         | {w["rid"] for w in self.withdrawals})
        for part in _chunks(touched):
            for r in conn.execute(select(records.c.record_id, records.c.current_version,
                                         records.c.status, records.c.withdrawn)
                                  .where(records.c.record_id.in_(part)).with_for_update()):
                loaded = self.by_record[r.record_id].loaded
                if loaded is not None and loaded != (int(r.current_version), r.status,
                                                     bool(r.withdrawn)):
                    raise _KeyRaceLost(r.record_id)
        if touched and caps.pins_of(conn, touched) != {
                rid: self.pins[rid] for rid in touched if rid in self.pins}:
            raise _KeyRaceLost("refused_pins")
        freed = sorted(self.freed)
        for part in _chunks(freed):
            conn.execute(select(natural_keys.c.natural_key).where(
                natural_keys.c.natural_key.in_(part)).with_for_update()).all()
        # Not the keys this chunk writes itself (freed, claimed, moved: checked as written).
        mine = self.freed.keys() | self.claimed_keys.keys() | self.moved_keys.keys()
        judged = sorted(k for k, holder in self.judged.items()
                        if k not in mine and holder not in self.born)
        for part in _chunks(judged):
            rows = {r.natural_key: r for r in conn.execute(
                _NAMED.where(natural_keys.c.natural_key.in_(part))
                .with_for_update(read=True, of=natural_keys))}
            for key in part:
                row = rows.get(key)
                if (row is None or row.record_id != self.judged[key]
                        or not _still_holds(row.withdrawn, row.status, row.holds, key)):
                    raise _KeyRaceLost(key)

    def _check_named(self, wanted: dict[str, str]) -> None:
        """The natural_keys rows just written name the records this chunk gave them to."""
        for part in _chunks(sorted(wanted)):
            for row in self.conn.execute(select(natural_keys.c.natural_key, natural_keys.c.record_id)
                                         .where(natural_keys.c.natural_key.in_(part))):
                if wanted[row.natural_key] != row.record_id:
                    raise _KeyRaceLost(row.natural_key)

    def _write(self, with_audit: bool = True) -> None:
        conn = self.conn
        self._check_reads()
        if self.unpinned:
            caps.write_pins(conn, self.unpinned, [])
        if self.released_keys:  # before the claims: a key given back here may be taken here
            conn.execute(delete(natural_keys).where(
                natural_keys.c.natural_key == bindparam("k"),
                natural_keys.c.record_id == bindparam("r")),
                [{"k": k, "r": r} for k, r in self.released_keys.items()])
        if self.claimed_keys:
            rows = [{"natural_key": k, "record_id": r} for k, r in self.claimed_keys.items()]
            bulk_insert(conn, natural_keys, rows, ignore_conflicts=True)
            self._check_named(self.claimed_keys)
        if self.moved_keys:
            # Only from the record this chunk read there: a concurrent twin that took the key
            # first wins, and this chunk runs again (it then sees the twin as the holder).
            conn.execute(update(natural_keys).where(natural_keys.c.natural_key == bindparam("k"),
                                                    natural_keys.c.record_id == bindparam("was"))
                         .values(record_id=bindparam("r")),
                         [{"k": k, "r": r, "was": self.stored_holders.get(k)}
                          for k, r in self.moved_keys.items()])
            self._check_named(self.moved_keys)
        bulk_insert(conn, records, self.new_records)
        if self.record_updates:
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(current_version=bindparam("current_version"),
                                 content_hash=bindparam("content_hash"),
                                 withdrawn=bindparam("withdrawn"), status=bindparam("status"),
                                 updated_at=bindparam("updated_at"),
                                 completed_on=bindparam("completed_on"),
                                 last_batch_id=bindparam("last_batch_id"),
                                 natural_key=bindparam("natural_key"),
                                 person_key=bindparam("person_key"), year=bindparam("year"),
                                 duplicate_of=bindparam("duplicate_of"),
                                 **{c: bindparam(c) for c in RULES_COLUMNS}),
                         self.record_updates)
        if self.withdrawals:
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(current_version=bindparam("current_version"), withdrawn=True,
                                 credited_hours="0", updated_at=bindparam("updated_at")),
                         self.withdrawals)
        if self.recredited:
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(current_version=bindparam("current_version"),
                                 credited_hours=bindparam("credited_hours"),
                                 updated_at=bindparam("updated_at")), self.recredited)
        if self.seen_again:
            # Reconciliation needs to know which batches repeated a record unchanged: every one
            # of them (batch_repeats), not only the last (a resent file must not rewrite it).
            conn.execute(update(records).where(records.c.record_id == bindparam("rid"))
                         .values(last_batch_id=bindparam("b")), self.seen_again)
            bulk_insert(conn, batch_repeats, [{"batch_id": r["b"], "record_id": r["rid"]}
                                              for r in self.seen_again], ignore_conflicts=True)
        bulk_insert(conn, record_versions, self.versions)
        bulk_insert(conn, outbox, self.outbox_rows)
        bulk_insert(conn, rejections, self.rejected)
        if with_audit:
            audit.append(conn, self.events, self.now)
