"""What one ingest chunk knows and carries: the base of :class:`gateway.pipeline.ingest.Chunk`.

:class:`ChunkState` holds a chunk's memory of the records it met (:class:`_Known`, read as
``_KNOWN_COLUMNS``), the versions it decided (:class:`_Pending`), and the rows and audit events
it will write; :meth:`ChunkState._store_version` adds a version's rows (and its outbox row when
it is sent).  The parts of ``Chunk`` build on it: caps (:mod:`gateway.pipeline.chunk_caps`),
integrity (:mod:`gateway.pipeline.chunk_integrity`), writes (:mod:`gateway.pipeline.chunk_writes`)
and the reads and decisions in :mod:`gateway.pipeline.ingest`.  Also what they share: whether
the management system has a record (:func:`_reaches_downstream`), and ``IN (…)`` lists cut to
size (:func:`_chunks`).

It reads ``outbox`` and writes nothing itself: :class:`ChunkState` only gathers rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, select

from contracts import Note, RecordAnswer, RecordStatus
from gateway import audit
from gateway.pipeline import caps
from gateway.pipeline.items import PartnerRef, Prepared
from gateway.pipeline.rules_tables import RulesConfig
from gateway.store.tables import outbox, records


@dataclass
class _Known:
    """What the chunk knows of a stored (or just decided) record."""

    record_id: str
    version: int
    content_hash: str
    withdrawn: bool
    status: str
    duplicate_of: str | None
    claim: str | None  # the hours its current version is worth (_claim); None: unknown
    natural_key: str  # of its current version (who, what, when)
    cap_group: caps.Group | None = None  # the capped group its current version counts in
    # (version, status, withdrawn) as read from the store; None: first seen in this chunk
    loaded: tuple[int, str, bool] | None = None
    # Its next version is numbered at least this after a restore (gateway.pipeline.versions)
    floor: int | None = None


# What the chunk reads of a stored record (_Known), not its thirty columns.
_KNOWN_COLUMNS = (records.c.record_id, records.c.source_record_id, records.c.current_version,
                  records.c.content_hash, records.c.withdrawn, records.c.status,
                  records.c.duplicate_of, records.c.cap_type, records.c.person_key,
                  records.c.year, records.c.natural_key, records.c.hours,
                  records.c.version_floor)


@dataclass
class _Pending:
    """A version decided in this chunk; its payload is built once caps are allocated."""

    record_id: str
    version: int
    sub: Prepared
    content_hash: str
    queue: bool
    row: dict[str, Any]  # its records insert/update row, to carry the credited hours
    answer: RecordAnswer
    credited: Decimal
    cap: tuple[Note, Note] | None = None  # the CAP_APPLIED warning and rule note
    flags: list[Note] = field(default_factory=list)  # R14 warnings found across records
    # The NOT_COUNTED warning and rule note of a version that is forwarded with no hours: it
    # replaces a counted version the management system holds (queue is False: not accepted)
    uncounted: tuple[Note, Note] | None = None
    received_at: str | None = None  # the item's own arrival (Item.received_at); None: now


class ChunkState:
    """A chunk's memory and the rows it gathers; see the module."""

    def __init__(self, conn: Connection, partner: PartnerRef, now: datetime,
                 batch_id: str | None, config: RulesConfig,
                 lock_first: set[caps.Group] | None = None) -> None:
        self.conn, self.partner, self.now, self.batch_id = conn, partner, now, batch_id
        self.config = config
        self.locked: set[caps.Group] = set()  # cap groups this transaction holds
        # Groups to lock before reading: shared across the attempts of one ingest (see
        # _lock_groups), so a chunk that met a group late locks it first next time.
        self.lock_first: set[caps.Group] = lock_first if lock_first is not None else set()
        self.pending: list[_Pending] = []
        self.leaving: dict[caps.Group, set[str]] = {}
        self.unsettled: set[caps.Group] = set()  # groups whose other records _settle_caps re-issues
        self.recredited: list[dict[str, Any]] = []
        self.now_iso = now.isoformat()
        self.events: list[audit.Event] = []
        self.by_source: dict[str, _Known] = {}
        self.by_record: dict[str, _Known] = {}
        self.holders: dict[str, str] = {}  # natural key → record id holding it
        self.claimed_keys: dict[str, str] = {}  # keys this chunk claims (new)
        self.moved_keys: dict[str, str] = {}  # keys taken over from withdrawn holders
        self.released_keys: dict[str, str] = {}  # keys a correction moved its record away from
        self.new_records: list[dict[str, Any]] = []
        self.record_updates: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.outbox_rows: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.seen_again: list[dict[str, Any]] = []
        self.withdrawals: list[dict[str, Any]] = []  # records withdrawn here (a failed assessment)
        # Activities whose record stopped holding them here (withdrawn, corrected away): another
        # source's report of one, held as a duplicate of that record, takes over (succeed()).
        self.freed: dict[str, set[str]] = {}  # natural key → the records that let it go
        self.stored_holders: dict[str, str] = {}  # natural key → holder in natural_keys
        self.judged: dict[str, str] = {}  # natural key → the holder a record was judged against
        self.born: set[str] = set()  # records first seen in this chunk
        # Stored records pinned where a refused correction's applied version counts (R10,
        # caps.refused_pins), with that cap group; a version sent from here ends the pin.
        self.pins: dict[str, caps.Group | None] = {}
        self.unpinned: list[str] = []
        # This partner's records met here (record id → its source id), and the activity each
        # source id's last valid item in the chunk reports (_last_words): where the chunk
        # leaves the record, so that a record it moves away from an activity does not keep it
        # from an earlier item of the same request (_let_go_for).
        self.sources: dict[str, str] = {}
        self.last_keys: dict[str, str] = {}

    def _store_version(self, record_id: str, version: int, payload: str, chash: str,
                       queue: bool) -> None:
        self.versions.append({"record_id": record_id, "version": version, "content_hash": chash,
                              "payload": payload, "batch_id": self.batch_id,
                              "created_at": self.now})
        if queue:
            self.outbox_rows.append({"record_id": record_id, "version": version,
                                     "status": "pending", "attempts": 0, "created_at": self.now,
                                     "updated_at": self.now})
            self.events.append(audit.Event("queued", record_id, version))


def _queued(conn: Connection, record_id: str, version: int | None = None) -> bool:
    """Whether a version of the record (``version``, or any) was ever queued for delivery."""
    found = select(outbox.c.record_id).where(outbox.c.record_id == record_id)
    if version is not None:
        found = found.where(outbox.c.version == version)
    return conn.execute(found.limit(1)).first() is not None


def _reaches_downstream(conn: Connection, record_id: str, status: str) -> bool:
    """Whether the management system has (or will have) a version of the record.

    An accepted one, or one that counted once and was told so with a version of no hours
    (NOT_COUNTED).  Only such a record needs its withdrawal forwarded.
    """
    return status == RecordStatus.ACCEPTED.value or _queued(conn, record_id)


def _chunks(values: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start: start + size]
