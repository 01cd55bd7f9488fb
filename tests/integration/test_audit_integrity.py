"""Audit integrity (issue 5 item 5): tampering found by the CLI and the API, on both stores.

``ce-gateway audit verify`` and ``GET /v1/audit/verify`` read the same chain.  A real trail (records ingested and delivered to the mock management system) is edited,
re-hashed, cut short, holed and reordered behind the gateway's back; both the CLI and the API
must name the exact first bad event, and the untampered trail — also after a retention prune,
which keeps every event — must verify.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, Engine, delete, event, insert, select, update
from typer.testing import CliRunner

from gateway import audit
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.cli import app as cli_app
from gateway.config import Settings, get_settings
from gateway.ops.deliveries import DeliveryFilter, reprocess
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.retention import prune
from gateway.store.db import make_engine, reading
from gateway.store.tables import audit_events, audit_head
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.support.delivery import drain_at
from tests.support.servers import uvicorn_thread

T1 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)
Tamper = Callable[[Connection, int], int]  # edits the trail of n events; returns the bad seq


def _build_trail(engine: Engine, partner: Partner, settings: Settings) -> list[str]:
    rng = random.Random(5)
    subs = [gen.canonical_submission(rng, f"AU-{i}") for i in range(3)]
    answers = ingest(engine, PartnerRef(partner.partner_id, "canonical"), subs, now=T1)
    drain_at(engine, settings, T1)
    return [str(a.record_id) for a in answers]


# -- the ways to tamper --------------------------------------------------------------------------

def _edit(column: str, value: str, where: Callable[[int], int]) -> Tamper:
    def tamper(conn: Connection, n: int) -> int:
        seq = where(n)
        conn.execute(update(audit_events).where(audit_events.c.seq == seq).values({column: value}))
        return seq
    return tamper


def _edit_and_rehash(conn: Connection, n: int) -> int:
    """Someone who knows the hash formula edits an event and fixes its own hash."""
    seq = n // 2
    row = dict(conn.execute(select(audit_events).where(audit_events.c.seq == seq)).mappings().one())
    row["detail"] = '{"receipt_no":"forged"}'
    conn.execute(update(audit_events).where(audit_events.c.seq == seq).values(
        detail=row["detail"], hash=audit._hash(row["prev_hash"], seq, row)))
    return seq


def _delete_middle(conn: Connection, n: int) -> int:
    conn.execute(delete(audit_events).where(audit_events.c.seq == n // 2))
    return n // 2


def _truncate(conn: Connection, n: int) -> int:
    conn.execute(delete(audit_events).where(audit_events.c.seq >= n - 1))
    return n - 1


def _swap_seq(conn: Connection, n: int) -> int:
    a, b = 3, n - 2
    for old, new in ((a, -1), (b, a), (-1, b)):  # through -1: seq is the primary key
        conn.execute(update(audit_events).where(audit_events.c.seq == old).values(seq=new))
    return a


CONTENT = ("event_id", "occurred_at", "kind", "record_id", "version", "actor", "detail")


def _swap_contents(conn: Connection, n: int) -> int:
    a, b = n // 2, n // 2 + 1
    rows = {r["seq"]: r for r in conn.execute(
        select(audit_events).where(audit_events.c.seq.in_((a, b)))).mappings()}
    for mine, other in ((a, b), (b, a)):
        conn.execute(update(audit_events).where(audit_events.c.seq == mine).values(
            {c: rows[other][c] for c in CONTENT}))
    return a


# name → (tamper, words of the reason, VerifyResult.problem)
TAMPERS: dict[str, tuple[Tamper, str, str]] = {
    "edit detail": (_edit("detail", '{"credited_hours":"999"}', lambda n: n // 2), "content",
                    "altered"),
    "edit kind": (_edit("kind", "withdrawn", lambda n: 2), "content", "altered"),
    "edit actor": (_edit("actor", "mallory", lambda n: n - 1), "content", "altered"),
    "edit and re-hash": (_edit_and_rehash, "rewritten", "rewritten"),
    "delete a middle event": (_delete_middle, "missing", "missing"),
    "truncate the tail": (_truncate, "head", "truncated"),
    "swap two events' seq": (_swap_seq, "prev_hash", "unchained"),
    "swap two events' contents": (_swap_contents, "content", "altered"),
}


def _snapshot(engine: Engine) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings()]
        head = dict(conn.execute(select(audit_head)).mappings().one())
    return rows, head


def _restore(engine: Engine, snap: tuple[list[dict[str, Any]], dict[str, Any]]) -> None:
    rows, head = snap
    with engine.begin() as conn:
        conn.execute(delete(audit_events))
        conn.execute(insert(audit_events), rows)
        conn.execute(update(audit_head).values(last_seq=head["last_seq"], last_hash=head["last_hash"]))


def _cli_verify(db_url: str, *flags: str) -> tuple[int, str]:
    get_settings.cache_clear()  # the CLI reads CE_GATEWAY_DATABASE_URL through the cached Settings
    try:
        result = CliRunner().invoke(cli_app, ["audit", "verify", *flags],
                                    env={"CE_GATEWAY_DATABASE_URL": db_url})
    finally:
        get_settings.cache_clear()
    return result.exit_code, result.stdout



def _sound(store: Engine, events: int) -> dict[str, Any]:
    """What verify answers for a sound chain of ``events`` events: its head is the anchor."""
    with store.connect() as conn:
        last = conn.execute(select(audit_events.c.hash).where(audit_events.c.seq == events)).scalar_one()
        head = conn.execute(select(audit_head.c.last_seq, audit_head.c.last_hash)).one()
    assert tuple(head) == (events, last)
    return {"ok": True, "checked": events, "first_bad_seq": None, "reason": None, "problem": None,
            "head_seq": events, "head_hash": last}

def test_every_kind_of_tampering_is_named_at_its_first_bad_event_by_cli_and_api(
        db_url: str, store: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], new_operator: Callable[..., str],
        mock_ce: tuple[str, Faults]) -> None:
    record_ids = _build_trail(store, new_partner(store), make_settings(db_url, mock_ce[0]))
    viewer = {"Authorization": f"Bearer {new_operator(store, role='viewer')}"}
    snap = _snapshot(store)
    n = len(snap[0])
    assert n >= 12 and {r["kind"] for r in snap[0]} >= {"received", "queued", "delivered"}

    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        def api_verify() -> dict[str, Any]:
            resp = httpx.get(f"{url}/v1/audit/verify", headers=viewer)
            assert resp.status_code == 200, resp.text
            body: dict[str, Any] = resp.json()
            return body

        code, out = _cli_verify(db_url, "--json")
        assert code == 0 and json.loads(out) == api_verify() == _sound(store, n)

        for name, (tamper, why, problem) in TAMPERS.items():
            with store.begin() as conn:
                bad = tamper(conn, n)
            code, out = _cli_verify(db_url, "--json")
            by_cli, by_api = json.loads(out), api_verify()
            assert code == 1, name
            assert by_cli == by_api, name
            assert (by_cli["ok"], by_cli["first_bad_seq"]) == (False, bad), (name, by_cli)
            assert by_cli["checked"] == bad - 1, (name, by_cli)  # every event before it is fine
            assert why in by_cli["reason"] and by_cli["problem"] == problem, (name, by_cli)
            code, text = _cli_verify(db_url)  # the human form names it too
            assert code == 1 and f"broken at event {bad}" in text, (name, text)
            _restore(store, snap)
            assert api_verify()["ok"] is True, f"restoring after {name!r} failed"

        # Retention prunes payloads, never events: the chain still verifies, every event of the
        # pruned records is still there, and one event more records the prune itself.
        with store.connect() as conn:
            before = {rid: audit.events_for(conn, [rid]) for rid in record_ids}
        closed = make_settings(db_url, year_close_extensions={}, retention_payload_days=400)
        result = prune(store, closed, actor="ops-lead", now=datetime(2028, 3, 1, tzinfo=UTC))
        assert result.versions == len(record_ids)
        code, out = _cli_verify(db_url, "--json")
        assert code == 0 and json.loads(out) == api_verify() == _sound(store, n + 1)
    with store.connect() as conn:
        assert {rid: audit.events_for(conn, [rid]) for rid in record_ids} == before
        last = conn.execute(select(audit_events).where(audit_events.c.seq == n + 1)).mappings().one()
    assert (last["kind"], last["actor"], last["record_id"]) == ("retention_pruned", "ops-lead", None)


@pytest.mark.parametrize("when", ["before the head is read", "between two reads of the chain"])
def test_a_trail_the_gateway_appends_to_while_it_is_walked_verifies(
        db_url: str, store: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], mock_ce: tuple[str, Faults], when: str) -> None:
    """``audit verify`` on a live gateway: events committed during the walk are not a cut tail.

    Verify reads as the CLI and the API do (``store.db.reading``: each read sees what is
    committed by then, PostgreSQL's READ COMMITTED and SQLite without a transaction), and a
    gateway engine appends real events from another connection at the scripted moment.
    Before, an append just before the head was read made a sound trail 'truncated' (a CI run
    of the SIGKILL batch test: 'chain ends at 22922 but the head says 23778'); and on SQLite
    verify held the write lock for its whole walk, so the append mid-walk waited for it (here
    it gives up after 2 s instead of the gateway's 60).
    """
    _build_trail(store, new_partner(store), make_settings(db_url, mock_ce[0]))
    with store.connect() as conn:
        n = int(conn.execute(select(audit_head.c.last_seq)).scalar_one())
    gateway_engine = make_engine(db_url)
    if gateway_engine.dialect.name == "sqlite":
        event.listen(gateway_engine, "connect",
                     lambda dbapi_conn, _: dbapi_conn.execute("PRAGMA busy_timeout=2000"))
    reader = make_engine(db_url)
    chain_reads: list[str] = []
    appended: list[int] = []

    def append_once(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        reads_head = "FROM audit_head" in statement
        if not reads_head:
            chain_reads.append(statement)
        due = reads_head if when.startswith("before") else len(chain_reads) == 2
        if due and not appended:
            with gateway_engine.begin() as conn:
                audit.append(conn, [audit.Event("delivered", actor="gateway")] * 3)
            appended.append(3)

    event.listen(reader, "before_cursor_execute", append_once)
    try:
        with reading(reader) as conn:
            result = audit.verify(conn, chunk=4)
    finally:
        reader.dispose()
        gateway_engine.dispose()
    assert appended == [3], "the append never happened: the test tested nothing"
    assert result.as_dict() == _sound(store, n + 3)

    # A tail cut for real is still found while the gateway appends.
    with store.begin() as conn:
        conn.execute(delete(audit_events).where(audit_events.c.seq == n + 3))
    with store.connect() as conn:
        cut = audit.verify(conn, chunk=4)
    assert (cut.ok, cut.first_bad_seq, cut.problem) == (False, n + 3, "truncated")


@pytest.mark.parametrize("gap", ["\t", "\n", "\r\n", " \t "])
def test_an_identity_number_split_by_tabs_or_line_breaks_is_masked_in_the_audit_text(
        store: Engine, gap: str) -> None:
    r"""An operator's reason is free text: JSON writes its tab or line break as an escape.

    Masked as JSON text, ``630102\t19870413\t9126`` was no longer a number in groups, and the
    stored detail (what the API, the CLI and the console show, and what the chain hashes) kept
    the birth date.
    """
    id_number = gen.make_id_number(random.Random(7))
    written = gap.join([id_number[:6], id_number[6:14], id_number[14:]])
    plain = "查 " + id_number[:6] + " " + id_number[6:]  # the unescaped neighbour still masked
    result = reprocess(store, DeliveryFilter(partner_id="p-1"), dry_run=False,
                       reason=f"{written}；{plain}", actor="ops-lead")
    assert result.matched == 0  # nothing dead: the run is audited all the same
    with store.connect() as conn:
        stored = conn.execute(select(audit_events.c.detail)
                              .where(audit_events.c.kind == "ops_reprocess")).scalar_one()
    reason = json.loads(stored)["reason"]
    assert reason.endswith(f"查 {id_number[:6]} ********{id_number[14:]}"), reason
    assert reason.startswith(gap.join([id_number[:6], "********"])), reason  # shape kept
    for text in (stored, reason):
        assert id_number[6:14] not in text, text
    with store.connect() as conn:
        assert audit.verify(conn).ok


def test_a_kept_anchor_finds_a_rewrite_the_chain_alone_hides_by_cli_and_api(
        db_url: str, store: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], new_operator: Callable[..., str],
        mock_ce: tuple[str, Faults]) -> None:
    """docs/retention-and-audit.md: keep head_seq:head_hash; ``--anchor`` / ``?anchor=`` check it."""
    _build_trail(store, new_partner(store), make_settings(db_url, mock_ce[0]))
    code, out = _cli_verify(db_url, "--json")
    kept = json.loads(out)
    anchor = f"{kept['head_seq']}:{kept['head_hash']}"
    assert code == 0 and _cli_verify(db_url, "--anchor", anchor)[0] == 0  # unchanged: sound
    middle = kept["head_seq"] // 2
    with store.begin() as conn:  # every event from the middle on re-hashed, the head too
        prev = conn.execute(select(audit_events.c.hash)
                            .where(audit_events.c.seq == middle - 1)).scalar_one()
        for row in conn.execute(select(audit_events).where(audit_events.c.seq >= middle)
                                .order_by(audit_events.c.seq)).mappings().all():
            row = {**row, "actor": "mallory"} if row["seq"] == middle else dict(row)
            digest = audit._hash(prev, row["seq"], row)
            conn.execute(update(audit_events).where(audit_events.c.seq == row["seq"])
                         .values(actor=row["actor"], prev_hash=prev, hash=digest))
            prev = digest
        conn.execute(update(audit_head).values(last_hash=prev))
    viewer = {"Authorization": f"Bearer {new_operator(store, role='viewer')}"}
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        plain = httpx.get(f"{url}/v1/audit/verify", headers=viewer).json()
        by_api = httpx.get(f"{url}/v1/audit/verify", params={"anchor": anchor},
                           headers=viewer, timeout=10).json()
        bad = httpx.get(f"{url}/v1/audit/verify", params={"anchor": "12:nothex"},
                        headers=viewer, timeout=10)
    assert plain["ok"] is True  # the documented limit without an anchor
    code, out = _cli_verify(db_url, "--anchor", anchor, "--json")
    assert code == 1 and json.loads(out) == by_api
    assert (by_api["ok"], by_api["first_bad_seq"], by_api["problem"]) == (
        False, kept["head_seq"], "anchor")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "anchor", bad.text
    code, _ = _cli_verify(db_url, "--anchor", "12")
    assert code == 2
