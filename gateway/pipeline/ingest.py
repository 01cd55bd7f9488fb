"""Ingest: judged submissions → dedup → records + versions + outbox + audit, one transaction.

With the modules named below, this is the only writer of partner records.  A call takes one
request's (or one file chunk's) items and commits them together, so a 2xx always means
committed (SPEC §7), while one bad record never fails its neighbours: it is answered
``rejected`` and kept in ``rejections`` for revalidation.

The work is set-based (STYLE.md, "the hot path"): a handful of ``IN (…)`` reads load what the
chunk needs to know, the decisions are taken in memory in input order (so a chunk may resend or
correct its own earlier rows), and every table gets one ``executemany``.  Natural keys are
claimed with ``ON CONFLICT DO NOTHING`` and read back: if a concurrent replica won a key between
our read and our write, the chunk is rolled back and judged again.

Where each part lives: what is judged before the store (items, :func:`prepare`) in
:mod:`gateway.pipeline.items`; the chunk's state in :mod:`gateway.pipeline.chunk_state`, its
caps (R10) in :mod:`gateway.pipeline.chunk_caps`, integrity flags (R14) in
:mod:`gateway.pipeline.chunk_integrity` and writes in :mod:`gateway.pipeline.chunk_writes`,
which :class:`Chunk` inherits; here its reads and decisions.  Succession and allocation after
delivery in :mod:`gateway.pipeline.succession`, a partner's withdrawal in
:mod:`gateway.pipeline.withdraw`, and when a writer runs again in
:mod:`gateway.pipeline.writer_retry`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, select

from contracts import CONTRACT_VERSION, Note, RecordAnswer, RecordStatus
from gateway import audit, metrics
from gateway.pipeline import caps
from gateway.pipeline.chunk_caps import ChunkCaps
from gateway.pipeline.chunk_integrity import ChunkIntegrity
from gateway.pipeline.chunk_state import (
    _KNOWN_COLUMNS,
    _chunks,
    _Known,
    _Pending,
    _reaches_downstream,
)
from gateway.pipeline.chunk_writes import ChunkWrites, _rules_columns
from gateway.pipeline.credit import coded, explain
from gateway.pipeline.items import (
    Item,
    PartnerRef,
    Prepared,
    RulesContext,
    _claim,
    _no_nul,
    _source_id_of,
    error_note,
    item_from_raw,
    new_record_id,
    prepare,
)
from gateway.pipeline.rules_tables import RulesConfig
from gateway.pipeline.succession import _holds, succeed
from gateway.pipeline.versions import next_version
from gateway.pipeline.writer_retry import writer_retries
from gateway.store.tables import natural_keys, record_versions, records
from gateway.store.util import dumps_storable


@contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while one request's records (or one batch chunk) are judged and stored.

    A 1,000-record request allocates tens of thousands of objects that live until it ends;
    the collections they trigger walk them again and again: ~80 of ~260 µs of CPU a record
    on SQLite (benchmarks/RESULTS.md).  Only the caller that found the GC on turns it back on,
    so concurrent requests never leave it off, and collections still run between requests.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def ingest(engine: Engine, partner: PartnerRef, raws: Sequence[object], *,
           batch_id: str | None = None, now: datetime | None = None,
           rules: RulesContext | None = None) -> list[RecordAnswer]:
    """Validate and store canonical ``raws`` (dicts from JSON); one answer per input."""
    with paused_gc():
        return ingest_items(engine, partner, [item_from_raw(raw) for raw in raws],
                            batch_id=batch_id, now=now, rules=rules)


def ingest_items(engine: Engine, partner: PartnerRef, items: Sequence[Item], *,
                 batch_id: str | None = None, now: datetime | None = None,
                 in_tx: Callable[[Connection, list[RecordAnswer]], None] | None = None,
                 rules: RulesContext | None = None) -> list[RecordAnswer]:
    """Judge and store ``items`` in one transaction.

    ``in_tx`` runs inside that transaction before commit (a pull advances its cursor there, a
    batch its checkpoint), so both commit or neither.
    """
    now = now or datetime.now(UTC)
    rules = rules or RulesContext.empty()
    for item in items:
        prepare(item, partner, now, rules)
    answers: list[RecordAnswer] = []
    lock_first: set[caps.Group] = set()
    for attempt in writer_retries():
        with attempt, engine.begin() as conn:
            # A concurrent twin (same partner and source ids, or the same activity from
            # another source) may commit first; the retry then sees its rows.
            answers = Chunk(conn, partner, now, batch_id, rules.config, lock_first).run(items)
            if in_tx is not None:
                in_tx(conn, answers)
    metrics.count_ingested(partner.partner_id, partner.adapter, answers)  # committed: count it
    return answers


def closed_year_detail(config: RulesConfig, year: int) -> dict[str, str]:
    """The detail of a YEAR_CLOSED refusal to take back what counts in ``year`` (closed)."""
    closes = config.closes(year)
    return {"detail": f"(it counts in CE year {year}, closed at the end of {closes}; it can no "
                      "longer be withdrawn)",
            "detail_zh": f"（该记录计入 {year} 年度，该年度已于 {closes} 日终关闭，不能再撤回）"}


def _stored_claim(hours: str | None) -> str | None:
    """A stored record's claim; None when its hours are unknown (then: a conflict)."""
    return _claim(Decimal(hours)) if hours else None


class Chunk(ChunkCaps, ChunkIntegrity, ChunkWrites):
    """One transaction's items: read what they need, decide in input order, write."""

    # -- reads ----------------------------------------------------------------------------
    def _load(self, items: Sequence[Item]) -> None:
        subs = [i.prepared for i in items if i.prepared is not None and not i.errors]
        source_ids = sorted({s.source_record_id for s in subs}
                            | {i.refused[0] for i in items if i.refused is not None})
        for part in _chunks(source_ids):
            self._remember(self.conn.execute(select(*_KNOWN_COLUMNS).where(
                records.c.partner_id == self.partner.partner_id,
                records.c.source_record_id.in_(part))).mappings().all())
        # The activities of the chunk's records, and those its known records hold now (a
        # correction or a withdrawal may give one back).
        keys = sorted({s.natural_key for s in subs} | {k.natural_key for k in self.by_source.values()})
        for part in _chunks(keys):
            self.stored_holders.update((r.natural_key, r.record_id) for r in self.conn.execute(
                select(natural_keys.c.natural_key, natural_keys.c.record_id)
                .where(natural_keys.c.natural_key.in_(part))))
        self.holders.update(self.stored_holders)
        missing = sorted(set(self.holders.values()) - set(self.by_record))
        for part in _chunks(missing):
            self._remember(self.conn.execute(select(*_KNOWN_COLUMNS).where(
                records.c.record_id.in_(part))).mappings().all(), by_source=False)
        if self.by_source:
            self.pins = caps.pins_of(self.conn, (k.record_id for k in self.by_source.values()))

    def _remember(self, rows: Iterable[Any], by_source: bool = True) -> None:
        for r in rows:
            counted = r["status"] == "accepted" and not r["withdrawn"]
            group = caps.group_of(r) if counted else None
            known = _Known(r["record_id"], int(r["current_version"]), r["content_hash"],
                           bool(r["withdrawn"]), r["status"], r["duplicate_of"],
                           _stored_claim(r["hours"]), r["natural_key"], group,
                           (int(r["current_version"]), r["status"], bool(r["withdrawn"])),
                           r["version_floor"])
            self.by_record[known.record_id] = known
            if by_source:
                self.by_source[r["source_record_id"]] = known
                self.sources[known.record_id] = r["source_record_id"]

    # -- decisions --------------------------------------------------------------------------
    def run(self, items: Sequence[Item]) -> list[RecordAnswer]:
        # The cap groups this chunk's records join, locked before anything is read: another
        # writer re-issuing a record of the group (R10) would otherwise change it under our
        # decisions, and _check_reads would send the chunk round again and again.  With them
        # the groups an earlier attempt found its stored records in (they may leave them).
        self._lock_groups({(i.prepared.person_key, i.prepared.year, i.prepared.cap_type)
                           for i in items if i.prepared is not None and i.prepared.cap_type}
                          | self.lock_first)
        self._load(items)
        # The groups its stored records count in (a correction or failure takes them out),
        # and those a refused one is pinned in.
        self._lock_groups({k.cap_group for k in self.by_source.values() if k.cap_group}
                          | {g for g in self.pins.values() if g})
        self.last_keys = _last_words(items)
        answers = [self._decide(index, item) for index, item in enumerate(items)]
        last = {p.record_id: p for p in self.pending}  # each record's last word in this chunk
        self._apply_caps(last)
        self._flag_integrity()
        # A record first seen in this chunk whose last word here is "withdrawn", or a version
        # that does not count (a repeat, a conflict), never reaches the management system: a
        # version forwarded first would count there, uncapped or twice.
        unsent = self.born & ({w["rid"] for w in self.withdrawals}
                              | {rid for rid, p in last.items()
                                 if not p.queue and p.uncounted is None})
        for p in self.pending:
            self._store_version(p.record_id, p.version, self._build(p), p.content_hash,
                                (p.queue or p.uncounted is not None) and p.record_id not in unsent)
        self._write(with_audit=False)
        # Audit last: its head row is the one lock every writer takes, so holding it while
        # succeed() updates other partners' records would deadlock with a crosswise twin.
        self.events += succeed(self.conn, self.config, self.now, self.freed)
        self.events += self._settle_caps()
        audit.append(self.conn, self.events, self.now)
        return answers

    def _settle_caps(self) -> list[audit.Event]:
        """Re-issue the records whose share of a group this chunk touched has moved.

        Runs after the writes and the succession, so a group is allocated from what now
        stands in it: its records, the chunk's and a successor's among them.
        """
        if not self.unsettled:
            return []
        after = Chunk(self.conn, self.partner, self.now, self.batch_id, self.config)
        for group in sorted(self.unsettled):  # locked by this transaction already
            after._reissue(group)
        after._write(with_audit=False)
        return after.events

    def _decide(self, index: int, item: Item) -> RecordAnswer:
        sub = item.prepared
        if sub is None or item.errors:
            resent = self._resent(item)
            if resent is not None:
                return self._duplicate(index, item, resent, item.refused[0] if item.refused else "")
            failed = self._failed_assessment(item)
            if failed is not None:
                return self._withdraw_failed(index, item, failed)
            return self._reject(index, item)
        known = self.by_source.get(sub.source_record_id)
        if known is None:
            return self._first_seen(index, item, sub)
        if known.withdrawn or known.content_hash != sub.content_hash:
            # A change pulled after its year closed (R11): judged as a pushed one is.
            if sub.change_errors:
                item.errors = [Note.model_validate(e) for e in sub.change_errors]
                return self._reject(index, item)
            if sub.change_counts_year is not None:
                sub = replace(sub, counts_year=sub.change_counts_year,
                              rule_notes=sub.rule_notes + sub.change_rule_notes)
        return self._resubmitted(index, item, sub, known)

    def _reject(self, index: int, item: Item) -> RecordAnswer:
        source_id = _no_nul(item.submission.source_record_id if item.submission
                            else item.source_record_id or _source_id_of(item.raw))
        self.rejected.append({
            "partner_id": self.partner.partner_id, "adapter": self.partner.adapter,
            # A file row only: a push or a page numbers its items too, from 0 (rejections.row_no).
            "source_record_id": source_id, "batch_id": self.batch_id,
            "row_no": item.row if self.batch_id is not None else None,
            "payload": dumps_storable(item.raw),
            "errors": dumps_storable([e.model_dump(mode="json") for e in item.errors]), "status": "open",
            "received_at": self.now})
        self.events.append(audit.Event("rejected", actor=self.partner.partner_id, detail={
            "source_record_id": source_id, "row": item.row, "batch_id": self.batch_id,
            "codes": [e.code for e in item.errors], "fields": [e.field for e in item.errors]}))
        return RecordAnswer(index=index, source_record_id=source_id, status=RecordStatus.REJECTED,
                            errors=item.errors, warnings=item.warnings)

    def _give_back(self, known: _Known) -> None:
        """A record corrected away from its activity gives the activity back, if it holds it.

        A duplicate holds none.  The stored row is deleted only if it names this record; a
        key this chunk gave it (claimed, or taken from a withdrawn holder) is simply not given.
        """
        key = known.natural_key
        if self.holders.get(key) != known.record_id:
            return
        del self.holders[key]
        self.claimed_keys.pop(key, None)
        self.moved_keys.pop(key, None)
        stored = self.stored_holders.get(key)
        if stored == known.record_id:
            self.released_keys[key] = known.record_id
        elif stored is not None and key not in self.released_keys:
            # The row still names the withdrawn record this one took the key from: a newcomer
            # takes it from there (an insert would find the row).
            self.holders[key] = stored
        self.freed.setdefault(key, set()).add(known.record_id)

    def _let_go_for(self, key: str, record_id: str) -> None:
        """Give ``key`` back now if its holder is this partner's record the chunk moves off it.

        A request is judged as a whole (SPEC §2, §7 "Dedup"): a base swapping two of its
        results' dates corrects both, though the first correction meets the activity while the
        other result, corrected away from it later in the request, still holds it.  That
        holder is the same source, not "another source"; its own correction then finds the
        key given back already (:meth:`_give_back` does nothing twice).
        """
        holder = self.holders.get(key)
        if holder is None or holder == record_id or not _holds(self.by_record[holder], key):
            return
        source = self.sources.get(holder)
        if source is not None and self.last_keys.get(source, key) != key:
            self._give_back(self.by_record[holder])

    def _holder(self, key: str, record_id: str) -> str:
        """The record holding ``key``; ``record_id`` takes it if it is free or withdrawn."""
        holder = self.holders.get(key)
        if holder is None:
            self.claimed_keys[key] = record_id
        elif not _holds(self.by_record[holder], key):
            # A withdrawn record gives its activity back: the newcomer becomes the holder (as
            # from a row naming a record that no longer holds it: another activity, a repeat).
            if key in self.claimed_keys:  # claimed in this chunk: its row is not written yet
                self.claimed_keys[key] = record_id
            else:
                self.moved_keys[key] = record_id
        else:
            return holder
        self.holders[key] = record_id
        return record_id

    def _judge(self, sub: Prepared, holder: str) -> RecordStatus:
        self.judged[sub.natural_key] = holder
        claim = self.by_record[holder].claim
        same = claim is not None and claim == sub.claim
        return RecordStatus.DUPLICATE if same else RecordStatus.CONFLICT

    def _build(self, p: _Pending) -> str:
        """The CERecord's JSON for this version.

        Every part was validated already (the submission, the notes, hours rounded to one
        place), so the record is spliced from the submission's JSON rather than built and
        validated again as a model: this runs for every row of a million-row batch.  Tests
        check that the result validates as a :class:`CERecord`.
        """
        sub = p.sub
        body = orjson.loads(sub.sub_json)
        source_record_id = body.pop("source_record_id")
        cap_warning, cap_rule = ((p.cap[0].model_dump(mode="json"),), (p.cap[1].model_dump(mode="json"),)) \
            if p.cap else ((), ())
        record = {
            "contract_version": CONTRACT_VERSION, "record_id": p.record_id, "version": p.version,
            "withdrawn": False,
            "source": {"partner_id": self.partner.partner_id, "adapter": self.partner.adapter,
                       "source_record_id": source_record_id, "batch_id": self.batch_id,
                       "received_at": p.received_at or self.now_iso},
            **body,
            "credited_hours": str(p.credited),
            "rule_notes": sub.rule_notes + cap_rule,
            "review_authority": sub.review_authority,
            "warnings": sub.warnings + cap_warning + tuple(n.model_dump(mode="json") for n in p.flags),
        }
        if p.uncounted is not None:
            record["credited_hours"] = "0"
            record["warnings"] += (p.uncounted[0].model_dump(mode="json"),)
            record["rule_notes"] += (p.uncounted[1].model_dump(mode="json"),)
        return orjson.dumps(record).decode()

    def _first_seen(self, index: int, item: Item, sub: Prepared) -> RecordAnswer:
        record_id, key, chash = new_record_id(), sub.natural_key, sub.content_hash
        self._let_go_for(key, record_id)
        holder = self._holder(key, record_id)
        status = RecordStatus.ACCEPTED if holder == record_id else self._judge(sub, holder)
        duplicate_of = None if holder == record_id else holder
        known = _Known(record_id, 1, chash, False, status.value, duplicate_of, sub.claim, key)
        self.by_source[sub.source_record_id] = self.by_record[record_id] = known
        self.sources[record_id] = sub.source_record_id
        self.born.add(record_id)
        self.new_records.append({
            "record_id": record_id, "partner_id": self.partner.partner_id,
            "adapter": self.partner.adapter, "source_record_id": sub.source_record_id,
            "current_version": 1, "status": status.value, "withdrawn": False,
            "duplicate_of": duplicate_of, "natural_key": key, "content_hash": chash,
            "person_key": sub.person_key, "year": sub.year, "batch_id": self.batch_id,
            "completed_on": sub.completed_on, "last_batch_id": self.batch_id,
            **_rules_columns(sub), "created_at": self.now, "updated_at": self.now})
        self.events.append(audit.Event("received", record_id, 1, self.partner.partner_id, {
            "source_record_id": sub.source_record_id, "person": sub.masked_id,
            "credited_hours": str(sub.hours), "batch_id": self.batch_id,
            "row": item.row, "warnings": [w["code"] for w in sub.warnings]}))
        errors: list[Note] = []
        if status is RecordStatus.DUPLICATE:
            self.events.append(audit.Event("duplicate", record_id, 1, detail={"duplicate_of": holder}))
        elif status is RecordStatus.CONFLICT:
            errors = [error_note("CONFLICT_WITH_EXISTING", "claimed.quantity", f"(record {holder})")]
            self.events.append(audit.Event("conflict", record_id, 1, detail={"conflicts_with": holder}))
        answer = RecordAnswer.model_construct(
            index=index, source_record_id=sub.source_record_id, status=status,
            record_id=record_id, version=1, warnings=list(item.warnings), errors=errors)
        self.pending.append(_Pending(record_id, 1, sub, chash, status is RecordStatus.ACCEPTED,
                                     self.new_records[-1], answer, sub.hours,
                                     received_at=_arrival(item)))
        return answer

    def _resent(self, item: Item) -> _Known | None:
        """The stored record a refused submission repeats exactly, if it does."""
        if item.refused is None:
            return None
        known = self.by_source.get(item.refused[0])
        if known is None or known.withdrawn or known.content_hash != item.refused[1]:
            return None
        return known

    def _duplicate(self, index: int, item: Item, known: _Known, source_record_id: str) -> RecordAnswer:
        """A resend of the stored version: nothing new is stored or forwarded."""
        if self.batch_id is not None:
            self.seen_again.append({"rid": known.record_id, "b": self.batch_id})
        self.events.append(audit.Event("duplicate", known.record_id, known.version,
                                       self.partner.partner_id, {"resend_of": known.record_id,
                                                                 "row": item.row}))
        return RecordAnswer(index=index, source_record_id=source_record_id,
                            status=RecordStatus.DUPLICATE, record_id=known.record_id,
                            version=known.version, warnings=item.warnings)

    def _resubmitted(self, index: int, item: Item, sub: Prepared, known: _Known) -> RecordAnswer:
        chash = sub.content_hash
        if known.content_hash == chash and not known.withdrawn:
            return self._duplicate(index, item, known, sub.source_record_id)
        if any(w["rid"] == known.record_id for w in self.withdrawals):
            # Withdrawn earlier in this chunk (a failed result), sent again: the new version is
            # its last word, judged and capped as any correction of a withdrawn record.
            self.withdrawals = [w for w in self.withdrawals if w["rid"] != known.record_id]
        # Its current version counts (the management system has it, or will): if this version
        # does not, the management system must hear so, or it keeps counting the old hours.
        was_counted = known.status == RecordStatus.ACCEPTED.value and not known.withdrawn
        status = RecordStatus.ACCEPTED
        if sub.natural_key != known.natural_key:
            # The correction changes who, what or when (another person, a new date): the record
            # gives back the activity it held.
            self._give_back(known)
        self._let_go_for(sub.natural_key, known.record_id)
        if known.withdrawn or self.holders.get(sub.natural_key) != known.record_id:
            # It does not hold this activity (a new one; withdrawn, it gave it back; a repeat
            # or a conflict): judged against whoever holds it now — the record it repeated, a
            # newcomer, a duplicate that took over — or it takes the activity if nobody does,
            # as a first report of it would (SPEC §7 "Dedup").
            holder = self._holder(sub.natural_key, known.record_id)
            known.duplicate_of = None if holder == known.record_id else holder
            if known.duplicate_of is not None:
                status = self._judge(sub, known.duplicate_of)
        known.natural_key = sub.natural_key
        previous, known.version = known.version, next_version(known.version, known.floor)
        known.content_hash, known.withdrawn, known.status = chash, False, status.value
        known.claim = sub.claim
        new_group = ((sub.person_key, sub.year, sub.cap_type)
                     if sub.cap_type and status is RecordStatus.ACCEPTED else None)
        if known.cap_group is not None and known.cap_group != new_group:
            # It leaves its cap group (another type, person or year, or no longer accepted):
            # the hours it held there go back to the group's other records.
            self.leaving.setdefault(known.cap_group, set()).add(known.record_id)
        known.cap_group = new_group
        uncounted = (_not_counted(status, known.duplicate_of)
                     if was_counted and status is not RecordStatus.ACCEPTED else None)
        if status is RecordStatus.ACCEPTED or uncounted is not None:
            self._unpin(known)  # a version that is sent: it replaces the pinned one there
        self.record_updates.append({"rid": known.record_id, "current_version": known.version,
                                    "content_hash": chash, "withdrawn": False,
                                    "status": status.value, "updated_at": self.now,
                                    "completed_on": sub.completed_on,
                                    "last_batch_id": self.batch_id,
                                    "natural_key": sub.natural_key, "person_key": sub.person_key,
                                    "year": sub.year, "duplicate_of": known.duplicate_of,
                                    **_rules_columns(sub)})
        if uncounted is not None:
            self.record_updates[-1]["credited_hours"] = "0"
        self.events.append(audit.Event("corrected", known.record_id, known.version,
                                       self.partner.partner_id, {
                                           "previous_version": previous, "row": item.row,
                                           "credited_hours": str(sub.hours),
                                           "judged": status.value}))
        answer_status = RecordStatus.CORRECTED if status is RecordStatus.ACCEPTED else status
        errors = ([error_note("CONFLICT_WITH_EXISTING", "claimed.quantity")]
                  if status is RecordStatus.CONFLICT else [])
        answer = RecordAnswer.model_construct(
            index=index, source_record_id=sub.source_record_id, status=answer_status,
            record_id=known.record_id, version=known.version,
            warnings=list(item.warnings) + ([uncounted[0]] if uncounted else []), errors=errors)
        self.pending.append(_Pending(known.record_id, known.version, sub, chash,
                                     status is RecordStatus.ACCEPTED, self.record_updates[-1],
                                     answer, Decimal(0) if uncounted else sub.hours,
                                     uncounted=uncounted, received_at=_arrival(item)))
        return answer

    def _unpin(self, known: _Known) -> None:
        """A new version of a pinned record, sent downstream, ends its pin.

        It will count where its records row says, so the group it was pinned in (by its
        refused correction's applied version) is allocated again.  A version that is not sent
        (a correction into a repeat of a record no longer counted) leaves the pin: the
        management system keeps counting the applied version.
        """
        if known.record_id not in self.pins or known.record_id in self.unpinned:
            return
        self.unpinned.append(known.record_id)
        if (group := self.pins[known.record_id]) is not None:
            self.leaving.setdefault(group, set()).add(known.record_id)

    def _failed_assessment(self, item: Item) -> _Known | None:
        """The stored, not withdrawn record a refused submission reports as failed, if any.

        R9 "A failed assessment earns no hours" (青人社厅函〔2022〕394号 六(二) "根据考试考核结果
        如实出具…证明"): a base that corrects a result to failed takes its hours back.  Only
        when the failure is all that is wrong: a correction refused for anything else (a closed
        year, a revoked base, a bad id) changes nothing, as any refused correction — until
        revalidation finds the other error fixed and judges it again, as the base's last word
        (an older failed result the base has since corrected is closed unread there).
        """
        if item.refused is None or {e.code for e in item.errors} != {"ASSESSMENT_FAILED"}:
            return None
        known = self.by_source.get(item.refused[0])
        if known is None or known.withdrawn:
            return None
        if known.loaded is not None:  # stored: it may count in a closed year (a deferred
            # person's late result passes R11), whose hours a failed result no longer takes back
            stored = self.conn.execute(select(
                records.c.status, records.c.withdrawn, records.c.counts_year, records.c.year).where(
                records.c.record_id == known.record_id)).mappings().one()
            if (closed := self.config.closed_year_counted(stored, self.now)) is not None:
                item.errors.append(coded("YEAR_CLOSED", field="year",
                                         **closed_year_detail(self.config, closed)))
                return None
        return known

    def _forwarded(self, known: _Known) -> bool:
        """Whether the management system has (or will have) a version of the record.

        Not one first seen in this chunk: withdrawn here, none of its versions is sent (run()).
        """
        if known.record_id in self.born:
            return False
        return _reaches_downstream(self.conn, known.record_id, known.status)

    def _withdraw_failed(self, index: int, item: Item, known: _Known) -> RecordAnswer:
        """Refuse the failed result and withdraw the record it corrects (as ``withdraw`` does)."""
        # Its current version may be one decided earlier in this chunk (not stored yet).
        payload = next((self._build(p) for p in self.pending
                        if p.record_id == known.record_id and p.version == known.version), None)
        if payload is None:
            payload = self.conn.execute(select(record_versions.c.payload).where(
                record_versions.c.record_id == known.record_id,
                record_versions.c.version == known.version)).scalar_one()
        record = orjson.loads(payload)
        if record.get("pruned") is True:  # a closed year's stub (retention): it stays as it is
            return self._reject(index, item)
        answer = self._reject(index, item)
        known.version = next_version(known.version, known.floor)
        known.withdrawn = True
        if known.cap_group is not None:  # its capped hours go back to the group's other records
            self.leaving.setdefault(known.cap_group, set()).add(known.record_id)
            known.cap_group = None
        forwarded = self._forwarded(known)
        if forwarded:
            self._unpin(known)
        self.freed.setdefault(known.natural_key, set()).add(known.record_id)
        self.withdrawals.append({"rid": known.record_id, "current_version": known.version,
                                 "updated_at": self.now})
        self.events.append(audit.Event("withdrawn", known.record_id, known.version,
                                       self.partner.partner_id, {
                                           "source_record_id": item.refused[0] if item.refused else "",
                                           "reason": "ASSESSMENT_FAILED", "row": item.row,
                                           "batch_id": self.batch_id}))
        # Only a record the management system has (or will have) needs the withdrawal.
        self._store_version(known.record_id, known.version,
                            withdrawn_version(record, known.version, item.received_at or self.now),
                            known.content_hash, forwarded)
        answer.record_id, answer.version = known.record_id, known.version
        answer.errors = [coded(
            "ASSESSMENT_FAILED", f"(record {known.record_id}, which counted the earlier result, "
            f"is withdrawn as version {known.version})",
            f"（此前计入学时的记录 {known.record_id} 已撤回，版本 {known.version}）",
            field=e.field) if e.code == "ASSESSMENT_FAILED" else e for e in answer.errors]
        return answer


def _last_words(items: Sequence[Item]) -> dict[str, str]:
    """The activity (natural key) each source id's last valid item in ``items`` reports.

    A refused item (R11's ``change_errors`` included: a refused change) leaves its record where
    it was, so it is not a last word.
    """
    return {i.prepared.source_record_id: i.prepared.natural_key for i in items
            if i.prepared is not None and not i.errors and not i.prepared.change_errors}


def _arrival(item: Item) -> str | None:
    """``source.received_at`` of the version an item makes: its arrival, if it came earlier.

    A stored rejection judged again (revalidation) reached the gateway then, and the rules
    judged it as of then (R11); the management system is told so, not the time of the rerun.
    """
    return None if item.received_at is None else item.received_at.isoformat()


WITHDRAWN_NOTE = explain("WITHDRAWN", "0 h: this version withdraws the record",
                         "0 学时：本版本撤回该记录").model_dump(mode="json")


def withdrawn_version(record: dict[str, Any], version: int, now: datetime) -> str:
    """The CERecord JSON of a record's withdrawn ``version``, from its current payload.

    Its rule notes say why it counts 0 h: the conversions and caps that explained the version
    before it explain hours it no longer has (SPEC §3 ``rule_notes``).
    """
    record.update(version=version, withdrawn=True, credited_hours="0",
                  rule_notes=[WITHDRAWN_NOTE])
    record["source"]["received_at"] = now.isoformat()
    return orjson.dumps(record).decode()


def _not_counted(status: RecordStatus, holder: str | None) -> tuple[Note, Note]:
    """The NOT_COUNTED warning and rule note of a counted record's version that no longer counts.

    A correction that now repeats another source's report of the activity (or conflicts with
    it, held for ops) counts no hours; its version is still forwarded, with none, so the
    management system stops counting the version it holds (SPEC §7: versions in order).
    """
    if status is RecordStatus.CONFLICT:
        en, zh = (f"(conflicts with record {holder}, held for review)",
                  f"（与记录 {holder} 冲突，待人工处理）")
    else:
        en, zh = f"(repeats record {holder}, which counts it)", f"（与记录 {holder} 重复，已由其计入）"
    return (coded("NOT_COUNTED", en, zh, field="credited_hours"),
            explain("NOT_COUNTED", f"0 h: {en[1:-1]}", f"0 学时：{zh[1:-1]}"))
