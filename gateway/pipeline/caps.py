"""The caps ledger (SPEC §4 R10): per person, activity year and capped type, across all sources.

Papers, books, lectures and exam setting have yearly caps (青人社厅函〔2022〕394号 四(二)1–4:
"当年…发表", "每年最多折算为 20 学时"): the cap is the year's of the activity itself, the
submission's ``year``.  A record accepted late under a deferral (R11, 七(二)) counts its hours
toward the next CE year (``counts_year``), but it stays under its own year's cap: the deferral
moves the *required* hours, it does not merge two years' caps.  So a cap group is
``(person_key, year, cap_type)`` — ``records.year``, not ``records.counts_year`` — and so is a
``caps_ledger`` row's key.
Whenever a record of such a group is accepted, corrected or withdrawn, the group's hours are
allocated again in arrival order (:func:`gateway.pipeline.credit.allocate`), so the credited
total is always ``min(cap, sum of hours)`` — also after a withdrawal frees hours that an earlier
record was cut short of.  Records whose share moved get a new version (forwarded like any
correction).

A record the management system refused for good (its current version dead-lettered
``DOWNSTREAM_REJECTED``, and no earlier version of it counted in its group there) counts
nowhere, so it holds no share: :func:`stored_records` leaves it out, and the delivery worker
allocates its group again when the refusal lands, as ops reprocessing does when it brings the
record back (:func:`gateway.pipeline.succession.reallocate_after_delivery`).  One of which an
earlier version was applied keeps a share at that version's hours, in the group that version
counts in: ``refused_pins`` says which, since a refused correction may have moved the records
row to another type, person or year (:func:`pins_for`, :func:`pinned_elsewhere`).

Concurrency: the group's ``caps_ledger`` row is locked (``SELECT … FOR UPDATE``) before its
records are read, so two replicas crediting the same person at the same moment queue on it;
SQLite's single writer serialises them anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Connection, and_, delete, select, tuple_, update

from contracts import ActivityType
from gateway.person_keys import PersonKeys
from gateway.pipeline.credit import allocate
from gateway.pipeline.rules_tables import CAP_TYPE_OF
from gateway.store.bulk import bulk_insert
from gateway.store.tables import caps_ledger, outbox, record_versions, records, refused_pins

Group = tuple[str, int, str]  # (person_key, year of the activity, cap_type): see the docstring
ZERO = Decimal(0)

# Dead-letter codes that mean "the management system will never count this version" (SPEC §5
# downstream: a per-record ``rejected`` and a 400 are permanent).  RETRIES_EXHAUSTED is not one:
# the failure was ours or transient, and ops reprocess it.
REFUSED_FOR_GOOD = frozenset({"DOWNSTREAM_REJECTED"})


# A record whose applied version's group cannot be known (pruned by a stub with no counts): taken
# to hold its share wherever it is, as before the payloads were read.
ANY_GROUP: Group = ("", 0, "*")


@dataclass(frozen=True)
class Counted:
    """What the management system counts of a record in a cap group: its last applied version."""

    group: Group
    hours: Decimal | None  # that version's credited hours; None: unknown (pruned)


@dataclass(frozen=True)
class Applied:
    """A record's last applied (``delivered``) version: what the management system counts."""

    version: int
    hours: Decimal | None  # its credited hours there (0: a withdrawal); None: payload pruned
    category: str | None = None
    activity_type: str | None = None
    person_key: str | None = None  # whose hours they are there
    year: int | None = None  # the CE year they count toward there (a deferral's: the next)
    cap_year: int | None = None  # the activity's own year: its cap group's (四(二)1–4 "当年")


def last_applied(conn: Connection, record_ids: Iterable[str], keys: PersonKeys,
                 ) -> dict[str, Applied]:
    """The last applied version of each record that has one (rare records: payloads are read).

    The outbox is read by record id only, through its ``(record_id, version)`` index, and
    filtered here: with ``status = 'delivered'`` in the query SQLite walked the status index,
    every delivered row a record (0.65 ms a probe on a young store, growing with it).
    """
    found: dict[str, Applied] = {}
    pairs = sorted(last_delivered(conn, record_ids).items())
    for start in range(0, len(pairs), 500):
        for v in conn.execute(select(record_versions.c.record_id, record_versions.c.version,
                                     record_versions.c.payload)
                              .where(tuple_(record_versions.c.record_id, record_versions.c.version)
                                     .in_(pairs[start:start + 500]))):
            found[v.record_id] = _applied(int(v.version), orjson.loads(v.payload), keys)
    return found


def last_delivered(conn: Connection, record_ids: Iterable[str]) -> dict[str, int]:
    """The last delivered version of each record that has one (no payload is read)."""
    ids = sorted(set(record_ids))
    last: dict[str, int] = {}
    for start in range(0, len(ids), 500):
        for r in conn.execute(select(outbox.c.record_id, outbox.c.version, outbox.c.status)
                              .where(outbox.c.record_id.in_(ids[start:start + 500]))):
            if r.status == "delivered" and int(r.version) > last.get(r.record_id, 0):
                last[r.record_id] = int(r.version)
    return last


def counts_of(body: dict[str, Any], keys: PersonKeys) -> dict[str, Any] | None:
    """What a version counts there, without whose it is: kept by a retention stub.

    ``person_key`` (``keys``' digest, not the identity number), the CE year it counts toward
    (a deferral's: the next), the activity's own year (``cap_year``: its cap group's), category,
    activity type and credited hours (0 for a withdrawal).  A stub gives what it kept (None for
    one written before stubs kept it; one written before they kept ``cap_year`` lacks it, see
    :func:`cap_year_of`).
    """
    if body.get("pruned") is True:  # a retention stub (gateway.retention.stub)
        kept = body.get("counts")
        return kept if isinstance(kept, dict) else None
    person = body["person"]
    deferred = any(n.get("code") == "DEFERRAL" for n in body.get("rule_notes", ()))
    return {"person_key": keys.of(person.get("id_type", "resident_id"), person["id_number"]),
            "year": int(body["year"]) + deferred, "cap_year": int(body["year"]),
            "category": body.get("category"),
            "activity_type": body.get("activity_type"),
            "credited_hours": "0" if body.get("withdrawn") else str(body["credited_hours"])}


def cap_year_of(counts: Mapping[str, Any]) -> int:
    """The year whose cap a version's hours fall under: its activity's (:func:`counts_of`).

    A retention stub written before stubs kept ``cap_year`` has only the CE year it counts
    toward; that is the activity's year unless the version was deferred (R11), which a stub
    cannot tell any more.
    """
    return int(counts.get("cap_year", counts["year"]))


def _applied(version: int, body: dict[str, Any], keys: PersonKeys) -> Applied:
    counts = counts_of(body, keys)
    if counts is None:  # pruned before stubs kept what it counts
        return Applied(version, None)
    return Applied(version, Decimal(counts["credited_hours"]), counts["category"],
                   counts["activity_type"], counts["person_key"], int(counts["year"]),
                   cap_year_of(counts))


def applied_groups(conn: Connection, record_ids: Iterable[str], keys: PersonKeys,
                   ) -> dict[str, Counted]:
    """The cap group in which the management system counts each record, for those it does.

    That is the group of the record's last applied version (:func:`last_applied`), when that
    version counts capped hours: not a withdrawal, more than 0 credited hours, a capped type.
    A record corrected from a training into a paper, then refused as a paper, still counts its
    training there and nothing of papers: it must not keep a paper share.  A pruned payload
    gives :data:`ANY_GROUP`.
    """
    held: dict[str, Counted] = {}
    for rid, there in last_applied(conn, record_ids, keys).items():
        if there.hours is None:
            held[rid] = Counted(ANY_GROUP, None)
            continue
        try:
            cap_type = CAP_TYPE_OF.get(ActivityType(str(there.activity_type)))
        except ValueError:
            continue
        if cap_type is not None and there.hours and there.person_key and there.cap_year:
            held[rid] = Counted((there.person_key, there.cap_year, cap_type), there.hours)
    return held


def holds_share(held: Mapping[str, Counted], record_id: str, group: Group) -> bool:
    """Whether the management system counts ``record_id`` in ``group`` (see applied_groups)."""
    counted = held.get(record_id)
    return counted is not None and counted.group in (group, ANY_GROUP)


def refused_now(conn: Connection, record_ids: Iterable[str]) -> dict[str, int]:
    """Of ``record_ids``, those whose last queued version was refused for good: its number.

    The last version sent to the management system (the highest queued) is dead with a code
    of REFUSED_FOR_GOOD, whatever the record is here: a correction (the compliance report's
    ``not_counted``), or a withdrawal or a 0-hour version of a repeat (``refused_changes``).
    A later version that is never sent (a correction into a repeat of a record no longer
    counted) changes nothing there.  The management system keeps counting the version it
    applied last.  Read through the outbox's ``(record_id, version)`` index.
    """
    return {rid: int(r.version) for rid, r in refusals(conn, record_ids).items()}


def refusals(conn: Connection, record_ids: Iterable[str]) -> dict[str, Any]:
    """The refused deliveries behind :func:`refused_now`: version, error_code, last_error."""
    ids = sorted(set(record_ids))
    last: dict[str, Any] = {}
    for start in range(0, len(ids), 500):
        for r in conn.execute(select(outbox.c.record_id, outbox.c.version, outbox.c.status,
                                     outbox.c.error_code, outbox.c.last_error)
                              .where(outbox.c.record_id.in_(ids[start:start + 500]))):
            if r.record_id not in last or int(r.version) > int(last[r.record_id].version):
                last[r.record_id] = r
    return {rid: r for rid, r in last.items()
            if r.status == "dead" and r.error_code in REFUSED_FOR_GOOD}


def pins_for(conn: Connection, refused: Iterable[str], now: datetime, keys: PersonKeys,
             ) -> list[dict[str, Any]]:
    """The ``refused_pins`` rows of records refused for good (:func:`refused_now`).

    Each says where, and at how many hours, the management system still counts the record's
    last applied version.  The records row of a refused correction says where its *current*
    version would count — another person, year or type, maybe — so the person, CE year and cap
    type of the applied version are kept for :func:`stored_records` and the compliance report.
    ``year`` is the CE year it counts toward (the compliance report's); its cap group's year,
    the activity's, is read back from the pinned version (:func:`pin_groups`).  An applied
    version counting nothing there (a withdrawal, 0 h) or pruned pins nothing.
    """
    rows: list[dict[str, Any]] = []
    for rid, there in sorted(last_applied(conn, refused, keys).items()):
        if not there.hours or there.person_key is None or there.year is None:
            continue
        try:
            cap_type = CAP_TYPE_OF.get(ActivityType(str(there.activity_type)))
        except ValueError:
            cap_type = None
        rows.append({"record_id": rid, "version": there.version, "person_key": there.person_key,
                     "year": there.year, "cap_type": cap_type, "hours": str(there.hours),
                     "created_at": now})
    return rows


def pin_groups(conn: Connection, rows: Iterable[Mapping[Any, Any]]) -> dict[str, Group | None]:
    """The cap group each ``refused_pins`` row pins its record in; None for an uncapped type.

    The group's year is the pinned version's activity year (四(二)1–4 "当年"), which the row
    does not keep: its ``year`` is the CE year that version counts toward, the next one for a
    deferral (R11).  Read from the pinned version's payload (pins are rare), or from what its
    retention stub kept (:func:`cap_year_of`).
    """
    pins = list(rows)
    years = {str(p["record_id"]): int(p["year"]) for p in pins}
    pairs = sorted({(str(p["record_id"]), int(p["version"])) for p in pins if p["cap_type"]})
    for start in range(0, len(pairs), 500):
        for v in conn.execute(select(record_versions.c.record_id, record_versions.c.payload)
                              .where(tuple_(record_versions.c.record_id, record_versions.c.version)
                                     .in_(pairs[start:start + 500]))):
            body = orjson.loads(v.payload)
            if body.get("pruned") is not True:
                years[v.record_id] = int(body["year"])
            elif isinstance(kept := body.get("counts"), dict):
                years[v.record_id] = cap_year_of(kept)
    return {str(p["record_id"]): (p["person_key"], years[str(p["record_id"])], p["cap_type"])
            if p["cap_type"] else None for p in pins}


def write_pins(conn: Connection, record_ids: Iterable[str], rows: list[dict[str, Any]]) -> None:
    """Replace the pins of ``record_ids`` with ``rows`` (:func:`pins_for`)."""
    ids = sorted(set(record_ids))
    for start in range(0, len(ids), 500):
        conn.execute(delete(refused_pins).where(refused_pins.c.record_id.in_(ids[start:start + 500])))
    bulk_insert(conn, refused_pins, rows)


def pins_of(conn: Connection, record_ids: Iterable[str]) -> dict[str, Group | None]:
    """The pinned records among ``record_ids``, with the cap group each is pinned in."""
    ids = sorted(set(record_ids))
    rows: list[Mapping[Any, Any]] = []
    for start in range(0, len(ids), 500):
        rows += conn.execute(select(refused_pins).where(
            refused_pins.c.record_id.in_(ids[start:start + 500]))).mappings().all()
    return pin_groups(conn, rows) if rows else {}


def pinned_elsewhere(conn: Connection, group: Group, here: Iterable[str]) -> dict[str, Stored]:
    """Records pinned in ``group`` whose records row is not in it (not among ``here``).

    Checked against the store, so a pin left behind counts for nothing: the record must still
    be refused for good (:func:`refused_now`) and its pinned version still the last applied.
    A pin's ``year`` is the CE year it counts toward, the group's year or (deferred) the next.
    """
    person_key, year, cap_type = group
    pins = {r.record_id: r for r in conn.execute(select(refused_pins).where(
        refused_pins.c.person_key == person_key, refused_pins.c.year.in_((year, year + 1)),
        refused_pins.c.cap_type == cap_type))}
    for rid in set(here):
        pins.pop(rid, None)
    if pins:
        groups = pin_groups(conn, (r._mapping for r in pins.values()))
        pins = {rid: pin for rid, pin in pins.items() if groups[rid] == group}
    if not pins:
        return {}
    refused = refused_now(conn, pins)
    applied = last_delivered(conn, refused)
    return {rid: Stored(rid, refused[rid], Decimal(pin.hours), Decimal(pin.hours), pinned=True)
            for rid, pin in pins.items()
            if rid in refused and applied.get(rid) == int(pin.version)}


@dataclass(frozen=True)
class Stored:
    """A record holding a share of a group: stored, accepted and not withdrawn, or pinned."""

    record_id: str
    version: int
    hours: Decimal
    credited: Decimal
    # Refused for good, but counted downstream at ``credited`` by an earlier version: those
    # hours are the management system's, and no re-issue of ours changes them.  (Pinned from
    # elsewhere, ``version`` is its current one, in another group or withdrawn: never re-issued.)
    pinned: bool = False


def group_of(row: Mapping[Any, Any]) -> Group | None:
    """A records row's cap group (person, activity year, capped type); None for an uncapped type.

    The activity's year (``year``), not the CE year it counts toward (``counts_year``): a
    deferred record keeps its own year's cap (see the module docstring).
    """
    cap_type = row["cap_type"]
    return (row["person_key"], int(row["year"]), cap_type) if cap_type else None


def lock_group(conn: Connection, group: Group, now: datetime) -> None:
    lock_groups(conn, [group], now)


def lock_groups(conn: Connection, groups: Iterable[Group], now: datetime) -> None:
    """Lock the groups' ledger rows (made if missing), in sorted order: one order for all.

    Two statements however many groups (500 to a statement): a chunk of a batch may hold a
    thousand people's groups.  PostgreSQL locks the rows as the sorted scan returns them.
    """
    wanted = sorted(set(groups))
    if not wanted:
        return
    bulk_insert(conn, caps_ledger, [{"person_key": p, "year": y, "cap_type": t, "credited": "0",
                                     "updated_at": now} for p, y, t in wanted],
                ignore_conflicts=True)
    key = (caps_ledger.c.person_key, caps_ledger.c.year, caps_ledger.c.cap_type)
    for start in range(0, len(wanted), 500):
        conn.execute(select(*key).where(tuple_(*key).in_(wanted[start:start + 500]))
                     .order_by(*key).with_for_update()).all()


def stored_records(conn: Connection, group: Group, keys: PersonKeys) -> dict[str, Stored]:
    """The group's records that hold a share: accepted, not withdrawn, counted somewhere.

    A record whose current version is dead-lettered with a code of REFUSED_FOR_GOOD counts
    nowhere and holds none, unless the management system still counts an earlier version of
    it in this group (:func:`applied_groups`): then it is pinned at that version's credited
    hours, which the management system counts whatever we send, and :func:`reallocate` takes
    them off the cap before the others share it, so the person stays within the cap there.
    Reprocessing the refused delivery puts it back to pending with its code cleared.
    """
    person_key, year, cap_type = group
    # Each record's current delivery rides along (one probe of the outbox's unique index).
    current = and_(outbox.c.record_id == records.c.record_id,
                   outbox.c.version == records.c.current_version)
    rows = conn.execute(select(records.c.record_id, records.c.current_version, records.c.hours,
                               records.c.credited_hours, outbox.c.status, outbox.c.error_code)
                        .select_from(records.outerjoin(outbox, current))
                        # counts_year too (the group's year, or the next when deferred): the
                        # (person_key, counts_year, …) index's range, not the person's every year
                        .where(records.c.person_key == person_key,
                               records.c.counts_year.in_((year, year + 1)), records.c.year == year,
                               records.c.cap_type == cap_type, records.c.status == "accepted",
                               records.c.withdrawn.is_(False))).all()
    # Refused for good and never applied in any version: it counts nowhere (rare: read only then).
    refused = {r.record_id for r in rows
               if r.status == "dead" and r.error_code in REFUSED_FOR_GOOD}
    held = applied_groups(conn, refused, keys) if refused else {}
    nowhere = {rid for rid in refused if not holds_share(held, rid, group)}
    stored = {r.record_id: Stored(r.record_id, int(r.current_version), Decimal(r.hours or "0"),
                                  Decimal(r.credited_hours or "0"))
              for r in rows if r.record_id not in nowhere}
    for rid in refused - nowhere:
        # Counted there by the version it applied, at that version's hours: pinned at them.
        there = held[rid].hours
        if there is not None:
            stored[rid] = Stored(rid, stored[rid].version, there, there, pinned=True)
    # Refused records the management system counts here by an applied version while their
    # records row has moved on (a refused correction to another type, person or year).
    stored.update(pinned_elsewhere(conn, group, (r.record_id for r in rows)))
    return stored


def reallocate(conn: Connection, group: Group, cap: Decimal, now: datetime,
               hours: Mapping[str, Decimal], gone: frozenset[str] = frozenset(), *,
               keys: PersonKeys) -> tuple[dict[str, Decimal], dict[str, Stored]]:
    """Allocate ``group`` again after a change; returns (credited by record, stored records).

    ``hours`` overrides or adds records of this transaction (new versions not yet written);
    ``gone`` are records leaving the group (withdrawn).  The caller re-issues every stored
    record whose credited hours changed.
    """
    stored = stored_records(conn, group, keys)
    # What the management system counts whatever we send (pinned) comes off the cap first.
    pinned = {rid: s.credited for rid, s in stored.items()
              if s.pinned and rid not in gone and rid not in hours}
    claims = {rid: s.hours for rid, s in stored.items() if rid not in gone and rid not in pinned}
    claims.update({rid: h for rid, h in hours.items() if rid not in gone})
    # Record ids are time-ordered: sorting them is arrival order (a correction keeps its place).
    credited = allocate(sorted(claims.items()), cap - sum(pinned.values(), Decimal(0)))
    credited.update(pinned)
    person_key, year, cap_type = group
    conn.execute(update(caps_ledger).where(
        caps_ledger.c.person_key == person_key, caps_ledger.c.year == year,
        caps_ledger.c.cap_type == cap_type).values(
        credited=str(sum(credited.values(), Decimal(0))), updated_at=now))
    return credited, stored
