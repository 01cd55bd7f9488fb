"""Partner input that is valid JSON and a valid id, yet was mishandled (review 31, session 30).

Over real HTTP (uvicorn on 127.0.0.1), on SQLite and PostgreSQL:

- an id the contract took with a line break, or with spaces around it (full-width ones too,
  common in Chinese data), could not be withdrawn: ``DELETE`` of the id as sent matched no
  route (405) or looked up the unstripped id (404), and the record stayed counted;
- a quantity sent as a JSON number went through a double: ``8.000000000000000001`` h was taken
  as 8 h, where the same text is refused (hours are decimals, SPEC §3);
- one number no double holds (``1e400``, valid JSON) refused the whole request, good
  neighbours included (SPEC §5: one bad record never fails its neighbours).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import signed_headers
from gateway.store.tables import records
from mock_partners.generators import canonical_submission
from tests.support.servers import uvicorn_thread


def _send(url: str, partner: Partner, method: str, target: str, body: bytes = b"") -> httpx.Response:
    headers = signed_headers(partner.app_key, partner.secret, method, target, body)
    if body:
        headers["Content-Type"] = "application/json"
    with httpx.Client() as client:  # the target exactly as signed: no re-encoding by httpx
        return client.send(httpx.Request(method, url + target, content=body, headers=headers))


def _with_quantity(sub: dict[str, object], number: bytes) -> bytes:
    """A ``{"records": [...]}`` body whose first record's quantity is the JSON number given."""
    body = orjson.dumps({"records": [sub]})
    quoted = b'"quantity":"' + str(sub["claimed"]["quantity"]).encode() + b'"'  # type: ignore[index]
    assert quoted in body
    return body.replace(quoted, b'"quantity":' + number, 1)


@pytest.mark.parametrize(("sent", "target"), [
    ("JD\n1", "/v1/records/JD%0A1"),
    (" WS-1 ", "/v1/records/%20WS-1%20"),
    ("JD-1\u3000", "/v1/records/JD-1%E3%80%80"),
])
def test_an_id_is_withdrawn_by_the_id_as_the_partner_sent_it(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner], sent: str, target: str) -> None:
    partner = new_partner(engine)
    sub = canonical_submission(random.Random(31), sent)
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        [answer] = _send(url, partner, "POST", "/v1/records",
                         orjson.dumps({"records": [sub]})).json()["results"]
        assert answer["status"] == "accepted", answer
        gone = _send(url, partner, "DELETE", target)
        assert gone.status_code == 200, gone.text
        assert gone.json()["record_id"] == answer["record_id"]
        again = _send(url, partner, "DELETE", target)  # withdrawn already: nothing new
        assert again.status_code == 200, again.text
    with engine.connect() as conn:
        stored = conn.execute(select(records.c.source_record_id, records.c.withdrawn, records.c.current_version)
                              .where(records.c.record_id == answer["record_id"])).one()
    assert stored == (sent.strip(), True, 2)


def test_a_quantity_sent_as_a_json_number_is_read_as_a_decimal(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    partner = new_partner(engine)
    rng = random.Random(32)
    precise = canonical_submission(rng, "NUM-1", hours="8")
    plain = canonical_submission(rng, "NUM-2", hours="8")
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        [refused] = _send(url, partner, "POST", "/v1/records",
                          _with_quantity(precise, b"8.000000000000000001")).json()["results"]
        [taken] = _send(url, partner, "POST", "/v1/records",
                        _with_quantity(plain, b"8.5")).json()["results"]
        [same] = _send(url, partner, "POST", "/v1/records",
                       _with_quantity(plain, b"8.50")).json()["results"]
        [tiny] = _send(url, partner, "POST", "/v1/records",
                       _with_quantity({**plain, "source_record_id": "NUM-3"}, b"1e-400")).json()["results"]
    assert refused["status"] == "rejected", refused
    assert {(e["code"], e["field"]) for e in refused["errors"]} == {("SCHEMA", "claimed.quantity")}
    assert refused["errors"][0]["message_zh"]
    assert taken["status"] == "accepted", taken
    assert same["status"] == "duplicate", same  # 8.50 is 8.5: the same content
    assert tiny["status"] == "rejected", tiny  # read as 0.0 by a double, refused as a decimal
    with engine.connect() as conn:
        hours = conn.execute(select(records.c.hours).where(
            records.c.record_id == taken["record_id"])).scalar_one()
    assert str(hours) in ("8.5", "8.50")


def test_a_number_no_double_holds_refuses_its_record_not_the_request(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    partner = new_partner(engine)
    rng = random.Random(33)
    bad, good = canonical_submission(rng, "BIG-1", hours="8"), canonical_submission(rng, "OK-1")
    body = _with_quantity(bad, b"1e400")[:-2] + b"," + orjson.dumps(good) + b"]}"
    broken = body[:-1]  # its last brace gone
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        answer = _send(url, partner, "POST", "/v1/records", body)
        assert answer.status_code == 200, answer.text
        first, second = answer.json()["results"]
        # Still not JSON: the whole request is refused as before, with orjson's reason.
        refused = _send(url, partner, "POST", "/v1/records", broken)
    assert (first["status"], second["status"]) == ("rejected", "accepted"), answer.json()
    assert {e["field"] for e in first["errors"]} == {"claimed.quantity"}
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "SCHEMA" and "not JSON" in refused.text


def test_a_body_nested_deeper_than_python_walks_is_refused_not_a_500(
        db_url: str, engine: Engine, make_settings: Callable[..., Settings],
        new_partner: Callable[..., Partner]) -> None:
    """The parser, orjson, reads 1,024 levels; the walk for floats stops sooner (review 37)."""
    partner = new_partner(engine)
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        for leaf in (b"1e400", b"1.5", b"1"):
            deep = b'{"records":' + b"[" * 700 + leaf + b"]" * 700 + b"}"
            answer = _send(url, partner, "POST", "/v1/records", deep)
            assert answer.status_code == 422, (leaf, answer.text)
            assert answer.json()["error"]["code"] == "SCHEMA", answer.text
