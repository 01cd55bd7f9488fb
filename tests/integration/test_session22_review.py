"""Review of session 22's changes (``git diff 99dda1a main``).

Audit-detail masking, the year-close alert, CLI refusals and actors, ``audit verify
--anchor``, the HTTP mappings (405, HEAD, 400 → 422), the native training_base envelope and
empty rejection filters.

Most of it held up under probing (see the plain tests); each ``xfail(strict=True)`` is a hole
that fails today and passes once fixed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import httpx
import orjson
import pytest
from sqlalchemy import Engine, select

from gateway import audit
from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.tables import audit_events
from mock_partners import generators as gen
from tests.conftest import SECRET_KEY
from tests.support.servers import cli, uvicorn_thread

BASE_CODE = "QHJD001"


def _id_number(seed: int) -> str:
    """A resident id number without the X check character (it can stand as a JSON number)."""
    rng = random.Random(seed)
    while (number := gen.make_id_number(rng)).endswith(("X", "x")):
        pass
    return number


def _stored_detail(store: Engine, kind: str) -> str:
    with store.connect() as conn:
        text: str = conn.execute(select(audit_events.c.detail)
                                 .where(audit_events.c.kind == kind)).scalar_one()
    return text


# -- audit detail masking -----------------------------------------------------------------


@pytest.mark.parametrize("gap", ["\f", "\v", "\r", "\u2028", "\x1f", "\u3000"])
def test_an_identity_number_split_by_other_white_space_is_masked_in_the_audit_text(
        store: Engine, gap: str) -> None:
    r"""Escaped (\f, \u000b, \r, \u001f) or not (U+2028, U+3000): the birth date is hidden."""
    number = _id_number(3)
    written = gap.join([number[:6], number[6:14], number[14:]])
    with store.begin() as conn:
        audit.append(conn, [audit.Event("note", actor="ops", detail={
            "reason": written, written: 1})])
    stored = _stored_detail(store, "note")
    assert number[6:14] not in stored, stored
    assert orjson.loads(stored)  # still JSON
    with store.connect() as conn:
        assert audit.verify(conn).ok


def test_an_identity_number_held_as_a_number_in_an_audit_detail_leaves_the_trail_readable(
        store: Engine) -> None:
    number = int(_id_number(5))
    record_id = "R" + "0" * 24
    with store.begin() as conn:
        audit.append(conn, [audit.Event("note", record_id, 1, actor="ops",
                                        detail={"value": number})])
    with store.connect() as conn:
        [event] = audit.events_for(conn, [record_id])  # JSONDecodeError today
    assert str(number)[6:14] not in json.dumps(event["detail"])


def test_the_same_number_beside_an_escape_is_masked_and_readable(store: Engine) -> None:
    """The masked() path: what the test above asks of the plain path."""
    number = int(_id_number(5))
    record_id = "R" + "1" * 24
    with store.begin() as conn:
        audit.append(conn, [audit.Event("note", record_id, 1, actor="ops",
                                        detail={"value": number, "reason": "a\tb"})])
    with store.connect() as conn:
        [event] = audit.events_for(conn, [record_id])
    assert event["detail"]["value"] == f"{str(number)[:6]}********{str(number)[14:]}"


# -- audit verify --anchor edges ------------------------------------------------------------


def test_anchor_edges_seq_zero_uppercase_and_beyond_the_head(store: Engine) -> None:
    for bad in ("0:" + "a" * 64, "1:" + "A" * 64, "-1:" + "a" * 64, "1:" + "a" * 63, "",
                "１:" + "a" * 64):
        with pytest.raises(ValueError):
            audit.parse_anchor(bad)
    with store.begin() as conn:
        audit.append(conn, [audit.Event("note", actor="ops")])
    with store.connect() as conn:
        sound = audit.verify(conn)
        assert sound.ok and sound.head_seq is not None and sound.head_hash is not None
        assert audit.verify(conn, anchor=(sound.head_seq, sound.head_hash)).ok
        beyond = audit.verify(conn, anchor=(sound.head_seq + 5, sound.head_hash))
    assert (beyond.ok, beyond.problem, beyond.first_bad_seq) == (
        False, "anchor", sound.head_seq + 5)


# -- CLI refusals ---------------------------------------------------------------------------


def test_a_cli_refusal_masks_an_identity_number_it_quotes(db_url: str) -> None:
    number = _id_number(9)
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY}
    done = cli(env, "revalidate", "--dry-run", "--error-code", number)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "SCHEMA (error_code)" in done.stderr, done.stderr
    assert number not in done.stderr, done.stderr


# -- HTTP: HEAD, 405, envelope, empty filters -----------------------------------------------


def test_http_changes_hold(db_url: str, store: Engine, make_settings: Callable[..., Settings],
                           new_partner: Callable[..., Partner],
                           new_operator: Callable[..., str]) -> None:
    base = new_partner(store, adapter="training_base", base_code=BASE_CODE)
    viewer = {"Authorization": f"Bearer {new_operator(store, role='viewer')}"}
    with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url:
        with httpx.Client(base_url=url) as c:
            head = c.head("/healthz")
            assert head.status_code == 200 and head.content == b""
            assert c.head("/readyz").status_code == 200
            wrong = c.request("OPTIONS", "/healthz")
            assert wrong.status_code == 405 and "GET" in wrong.headers["allow"]
            assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
            empty = c.get("/v1/rejections", headers=viewer, params={
                "partner_id": "", "adapter": "", "error_code": "", "batch_id": "",
                "status": "", "since": "", "until": ""})
            assert empty.status_code == 200, empty.text
        with SigningClient(url, base.app_key, base.secret) as signed:
            for body, field in ((b"[]", "body"), (b'{"base_code": "QHJD001"}', "results"),
                                (b'{"base_code": "QHJD001", "results": []}', "results"),
                                (b'{"results": [{}]}', "base_code")):
                resp = signed.post("/v1/partners/training_base/records", content=body,
                                   headers={"Content-Type": "application/json"})
                assert resp.status_code == 422, resp.text
                assert resp.json()["error"]["field"] == field, resp.text
            one_bad = signed.post("/v1/partners/training_base/records", content=orjson.dumps(
                {"base_code": BASE_CODE, "plan_id": "P-1", "results": [{}, "x"]}),
                headers={"Content-Type": "application/json"})
    assert one_bad.status_code == 200, one_bad.text  # bad results stay per-result answers
    assert [r["status"] for r in one_bad.json()["results"]] == ["rejected", "rejected"]




def test_a_long_cli_actor_is_refused_coded_or_cut_to_the_column(db_url: str,
                                                               store: Engine) -> None:
    env = {"CE_GATEWAY_DATABASE_URL": db_url, "CE_GATEWAY_SECRET_KEY": SECRET_KEY}
    done = cli(env, "revalidate", "--reason", "备案已补录", "--actor", "运维" + "x" * 68)
    assert "Traceback" not in done.stderr and "DataError" not in done.stderr, done.stderr[-800:]
    if done.returncode == 2:
        assert "(actor)" in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr[-800:]
    with store.connect() as conn:
        actors = conn.execute(select(audit_events.c.actor)).scalars().all()
    assert actors and all(len(a) <= 64 for a in actors), actors
