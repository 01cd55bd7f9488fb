"""Partner side of the HTTP API (SPEC §5, §7) against a real gateway on SQLite and PostgreSQL.

Every test serves ``create_app`` with uvicorn on 127.0.0.1 and talks to it with the signing
client partners use; the forwarding test also runs the delivery worker against the mock
management system and reads back what it applied.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.tables import outbox, record_versions, records
from mock_partners.ce_system import Faults
from mock_partners.generators import canonical_submission, corrupt_check_digit, make_person
from tests.support.servers import poll, uvicorn_thread

MakeSettings = Callable[..., Settings]
NewPartner = Callable[..., Partner]


@contextmanager
def gateway(settings: Settings, *, run_worker: bool = False) -> Iterator[str]:
    with uvicorn_thread(create_app(settings, run_worker=run_worker)) as url:
        yield url


def _client(url: str, partner: Partner) -> SigningClient:
    return SigningClient(url, partner.app_key, partner.secret, timeout=30)


def _assert_coded(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["message_zh"]
    return error


def _one(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    results: list[dict[str, Any]] = resp.json()["results"]
    assert len(results) == 1
    return results[0]


def test_one_bad_id_is_rejected_alone_and_never_echoed(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    rng = random.Random(11)
    partner = new_partner(store)
    good_a = canonical_submission(rng, "A-1")
    bad = canonical_submission(rng, "A-2")
    bad_id = corrupt_check_digit(bad["person"]["id_number"])
    bad["person"]["id_number"] = bad_id
    good_b = canonical_submission(rng, "A-3")

    with gateway(make_settings(db_url)) as url, _client(url, partner) as client:
        resp = client.submit([good_a, bad, good_b])

    assert resp.status_code == 200, resp.text
    body = resp.json()
    answers = body["results"]
    assert [a["index"] for a in answers] == [0, 1, 2]
    assert [a["source_record_id"] for a in answers] == ["A-1", "A-2", "A-3"]
    assert [a["status"] for a in answers] == ["accepted", "rejected", "accepted"]
    assert body["counts"]["accepted"] == 2 and body["counts"]["rejected"] == 1

    rejected = answers[1]
    assert rejected["record_id"] is None
    (error,) = [e for e in rejected["errors"] if e["code"] == "ID_NUMBER_INVALID"]
    assert error["field"] == "person.id_number"
    assert error["message"] and error["message_zh"]
    for full_id in (bad_id, good_a["person"]["id_number"], good_b["person"]["id_number"]):
        assert full_id not in resp.text

    record_ids = [answers[0]["record_id"], answers[2]["record_id"]]
    assert all(record_ids) and record_ids[0] != record_ids[1]
    with store.connect() as conn:
        stored = set(conn.execute(select(records.c.record_id)).scalars())
    assert stored == set(record_ids)


def test_resend_correction_cross_partner_withdrawal_and_forwarding(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner,
    mock_ce: tuple[str, Faults],
) -> None:
    mock_url, _ = mock_ce
    rng = random.Random(12)
    first, other = new_partner(store), new_partner(store)
    person = make_person(rng)
    original = canonical_submission(rng, "J-1", person=person, hours="24")
    corrected = {**original, "claimed": {**original["claimed"], "quantity": "32"}}

    with gateway(make_settings(db_url, mock_url), run_worker=True) as url, \
            _client(url, first) as a, _client(url, other) as b:
        accepted = _one(a.submit([original]))
        assert accepted["status"] == "accepted" and accepted["version"] == 1
        record_id = accepted["record_id"]

        resent = _one(a.submit([original]))
        assert (resent["status"], resent["record_id"], resent["version"]) == (
            "duplicate", record_id, 1)

        fixed = _one(a.submit([corrected]))
        assert (fixed["status"], fixed["record_id"], fixed["version"]) == (
            "corrected", record_id, 2)

        # Another source reports the same activity: same hours → duplicate, else conflict.
        same = _one(b.submit([{**corrected, "source_record_id": "B-1"}]))
        assert same["status"] == "duplicate"
        assert same["record_id"] not in (None, record_id)
        differing = _one(b.submit([{**original, "source_record_id": "B-2"}]))
        assert differing["status"] == "conflict"
        assert [e["code"] for e in differing["errors"]] == ["CONFLICT_WITH_EXISTING"]
        held = {same["record_id"], differing["record_id"]}

        gone = a.delete("/v1/records/J-1")
        assert gone.status_code == 200, gone.text
        withdrawal = gone.json()
        assert (withdrawal["record_id"], withdrawal["version"]) == (record_id, 3)

        def applied() -> dict[str, Any] | None:
            snap: dict[str, Any] = httpx.get(f"{mock_url}/_mock/applied").json()
            versions = [x["version"] for x in snap["applied"] if x["record_id"] == record_id]
            taken_over = any(x["record_id"] == same["record_id"] for x in snap["applied"])
            return snap if versions == [1, 2, 3] and taken_over else None

        snapshot = poll(applied, 30, what="v1, v2, the withdrawal and the successor applied")

    mine = [x for x in snapshot["applied"] if x["record_id"] == record_id]
    assert [x["withdrawn"] for x in mine] == [False, False, True]
    assert not snapshot["out_of_order"] and not snapshot["double_applied"]
    # The activity is still done: the other source's same report takes over and is forwarded
    # (after the withdrawal); the conflicting one stays held for ops.
    order = [x["record_id"] for x in snapshot["applied"]]
    assert order.index(same["record_id"]) > max(i for i, r in enumerate(order) if r == record_id)
    assert differing["record_id"] not in order
    with store.connect() as conn:
        queued = set(conn.execute(select(outbox.c.record_id)).scalars())
        payload = conn.execute(select(record_versions.c.payload).where(
            record_versions.c.record_id == record_id, record_versions.c.version == 3)).scalar_one()
        statuses = dict(conn.execute(select(records.c.record_id, records.c.status)
                                     .where(records.c.record_id.in_(held))).all())
    assert queued == {record_id, same["record_id"]}  # the conflict was never queued
    assert statuses == {same["record_id"]: "accepted", differing["record_id"]: "conflict"}
    assert orjson.loads(payload)["withdrawn"] is True


def test_unknown_keys_are_schema_errors_naming_the_key(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    rng = random.Random(13)
    partner = new_partner(store)
    gateway_owned = {**canonical_submission(rng, "K-1"), "record_id": "R123"}
    typo = canonical_submission(rng, "K-2")
    typo["person"] = {("idnumber" if k == "id_number" else k): v for k, v in typo["person"].items()}
    fine = canonical_submission(rng, "K-3")

    with gateway(make_settings(db_url)) as url, _client(url, partner) as client:
        resp = client.submit([gateway_owned, typo, fine])

    assert resp.status_code == 200, resp.text
    answers = resp.json()["results"]
    assert [a["status"] for a in answers] == ["rejected", "rejected", "accepted"]
    for answer, key in ((answers[0], "record_id"), (answers[1], "person.idnumber")):
        assert answer["source_record_id"] in ("K-1", "K-2")
        named = [e for e in answer["errors"] if e["field"] == key]
        assert named, answer["errors"]
        assert named[0]["code"] == "SCHEMA"
        assert key.rsplit(".", 1)[-1] in named[0]["message"]
        assert named[0]["message_zh"]


def test_request_shape_and_size_limits(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    rng = random.Random(14)
    partner = new_partner(store)
    json_headers = {"Content-Type": "application/json"}

    with gateway(make_settings(db_url)) as url, _client(url, partner) as client:
        _assert_coded(client.submit([]), 422, "SCHEMA")
        too_many = [canonical_submission(rng, f"L-{i}") for i in range(1001)]
        _assert_coded(client.submit(too_many), 413, "PAYLOAD_TOO_LARGE")
        for body in (b"records=1", b'{"records": [', b"\xff\xfe\x00", b"[1, 2]",
                     b'{"records": {}}', b'{"records": [], "extra": 1}'):
            resp = client.post("/v1/records", content=body, headers=json_headers)
            error = _assert_coded(resp, 422, "SCHEMA")
            if b"extra" in body:  # the Chinese message names what was wrong, as the English does
                assert "extra" in error["message"] and "extra" in error["message_zh"], error
        # The limit is exactly 1,000: the largest legal request goes through.
        at_limit = client.submit(too_many[:1000])
        assert at_limit.status_code == 200, at_limit.text[:500]
        assert at_limit.json()["counts"]["accepted"] == 1000


def test_withdraw_unknown_or_foreign_record_is_404(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    rng = random.Random(15)
    owner, stranger = new_partner(store), new_partner(store)

    with gateway(make_settings(db_url)) as url, _client(url, owner) as a, \
            _client(url, stranger) as b:
        accepted = _one(a.submit([canonical_submission(rng, "W-1")]))
        _assert_coded(a.delete("/v1/records/W-404"), 404, "NOT_FOUND")
        _assert_coded(b.delete("/v1/records/W-1"), 404, "NOT_FOUND")  # partner-scoped
        gone = a.delete("/v1/records/W-1")
        assert gone.status_code == 200, gone.text
        assert (gone.json()["record_id"], gone.json()["version"]) == (accepted["record_id"], 2)
        again = a.delete("/v1/records/W-1")
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        # A partner's id may hold "/": sent as %2F (or raw), it can still be withdrawn.
        slashed = _one(a.submit([canonical_submission(rng, "JD/2026/1")]))
        assert slashed["status"] == "accepted"
        out = a.delete("/v1/records/JD%2F2026%2F1")
        assert out.status_code == 200, out.text
        assert (out.json()["record_id"], out.json()["version"]) == (slashed["record_id"], 2)
        assert a.delete("/v1/records/JD/2026/1").json()["status"] == "duplicate"
        assert again.json()["version"] == 2


def test_a_record_the_store_cannot_hold_fails_alone(
    db_url: str, store: Engine, make_settings: MakeSettings, new_partner: NewPartner
) -> None:
    rng = random.Random(16)
    partner = new_partner(store)
    huge = canonical_submission(rng, "H-1", hours="9999999")  # beyond CERecord's 999999.9
    nul_id = canonical_submission(rng, "H-\u00002")  # PostgreSQL text cannot hold NUL
    nul_and_bad = {**canonical_submission(rng, "H-\u00003"), "year": 1900}
    first, last = canonical_submission(rng, "H-4"), canonical_submission(rng, "H-5")

    with gateway(make_settings(db_url)) as url, _client(url, partner) as client:
        resp = client.submit([first, huge, nul_id, nul_and_bad, last])
        assert resp.status_code == 200, resp.text
        answers = resp.json()["results"]
        assert [a["status"] for a in answers] == [
            "accepted", "rejected", "rejected", "rejected", "accepted"]
        assert [e["code"] for a in answers[1:4] for e in a["errors"]] == ["SCHEMA"] * 3
        assert answers[1]["errors"][0]["field"] == "claimed.quantity"
        assert answers[2]["errors"][0]["field"] == "source_record_id"
        _assert_coded(client.delete("/v1/records/H-%002"), 404, "NOT_FOUND")
