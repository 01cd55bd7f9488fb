"""The ops web console (``/ops``) over HTTP, on SQLite and PostgreSQL.

A small world is built through the real code paths: canonical records ingested, the delivery
worker run against the mock management system (one record rejected for its title, one for its
identity number, so two dead letters), a conflicting report from a second partner, and a batch
with a row error.  Then the console is driven as a browser would (forms, cookies, redirects):
login and logout, the session cookie's flags, CSRF, a viewer's 403, every page in Chinese with
its data and no clear identity number, friendly 4xx pages for bad parameters, and the
operator's reprocess, reprocess-with-edit and conflict resolution end to end.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
from sqlalchemy import Engine, delete, insert, select, update

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.console import session as sessions
from gateway.console.render import Ident, Renderer, _finalize
from gateway.delivery.worker import DeliveryWorker
from gateway.masking import mask_id, mask_text
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.store.db import make_engine
from gateway.store.tables import (
    audit_events,
    batch_errors,
    batches,
    operators,
    outbox,
    record_versions,
    records,
)
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.conftest import SECRET_KEY
from tests.support.servers import uvicorn_thread

MakeSettings = Callable[..., Settings]
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ID_LIKE = re.compile(r"(?<!\d)\d{17}[\dXx](?!\d)")
OWN_ID = re.compile(r"(?<![0-9A-Za-z])(?:[RB][0-9a-f]{24}|[0-9a-f]{32})(?![0-9A-Za-z])")  # kept whole


CERT_LIKE_AN_ID = "202605101234567"

@dataclass
class World:
    engine: Engine
    url: str  # the gateway (uvicorn on 127.0.0.1, no worker of its own)
    mock_url: str
    faults: Faults
    id_numbers: list[str]
    delivered: str  # record ids
    dead_title: str  # rejected downstream for its title ("[REJECT]")
    dead_id: str  # rejected downstream for its identity number (fault lifted afterwards)
    conflict: str
    batch_id: str
    operator_token: str
    viewer_token: str
    db_url: str
    make_settings: MakeSettings
    clients: list[httpx.Client] = field(default_factory=list)

    def drain(self) -> None:
        worker = DeliveryWorker(make_engine(self.db_url), self.make_settings(self.db_url, self.mock_url))
        try:
            for _ in range(20):
                if worker.run_once() == 0:
                    return
        finally:
            worker.close()
            worker.engine.dispose()
        raise AssertionError("delivery worker still busy")

    def outbox_status(self, record_id: str) -> list[tuple[int, str]]:
        with self.engine.connect() as conn:
            return [(r.version, r.status) for r in conn.execute(
                select(outbox.c.version, outbox.c.status).where(outbox.c.record_id == record_id)
                .order_by(outbox.c.version))]


def prune_delivered(world: World) -> None:
    """The delivered record's version pruned by retention (ops_interface.md's stub)."""
    now = datetime.now(UTC)
    stub = {"pruned": True, "record_id": world.delivered, "version": 1, "content_hash": "0" * 64,
            "pruned_at": now.isoformat()}
    with world.engine.begin() as conn:
        conn.execute(update(record_versions).where(record_versions.c.record_id == world.delivered)
                     .values(payload=orjson.dumps(stub).decode(), pruned_at=now))


@pytest.fixture
def world(db_url: str, make_settings: MakeSettings, new_partner: Callable[..., Partner],
          new_operator: Callable[..., str], mock_ce: tuple[str, Faults]) -> Iterator[World]:
    mock_url, faults = mock_ce
    engine = make_engine(db_url)
    rng = random.Random(77)
    first, second = new_partner(engine), new_partner(engine)
    subs = [gen.canonical_submission(rng, f"CON-{i}") for i in range(3)]
    subs[1]["activity"]["title"] = "[REJECT] 高原医学专题讲座"
    # A certificate number the pages print masked (a run of 15 digits): editing must keep it.
    subs[1]["evidence"] = {**subs[1].get("evidence", {}), "certificate_no": CERT_LIKE_AN_ID}
    faults.reject_ids.add(subs[2]["person"]["id_number"])
    answers = ingest(engine, PartnerRef(first.partner_id, "canonical"), subs)
    assert [a.status for a in answers] == ["accepted"] * 3
    clash = copy.deepcopy(subs[0]) | {"source_record_id": "OTHER-1"}
    clash["claimed"] = {**clash["claimed"], "quantity": "99"}
    [conflict] = ingest(engine, PartnerRef(second.partner_id, "canonical"), [clash])
    assert conflict.status == "conflict"
    batch_id = _batch_with_row_error(engine, first.partner_id, subs[0]["person"]["id_number"])
    app = create_app(make_settings(db_url, mock_url), run_worker=False)
    with uvicorn_thread(app) as url:
        world = World(engine, url, mock_url, faults, [s["person"]["id_number"] for s in subs],
                      answers[0].record_id, answers[1].record_id, answers[2].record_id,
                      conflict.record_id, batch_id, new_operator(engine, "operator"),
                      new_operator(engine, "viewer"), db_url, make_settings)
        world.drain()
        faults.reject_ids.clear()
        assert world.outbox_status(world.delivered) == [(1, "delivered")]
        assert world.outbox_status(world.dead_title) == [(1, "dead")]
        assert world.outbox_status(world.dead_id) == [(1, "dead")]
        yield world
        for client in world.clients:
            client.close()
    engine.dispose()


def _batch_with_row_error(engine: Engine, partner_id: str, id_number: str,
                          batch_id: str | None = None) -> str:
    batch_id = batch_id or "B" + uuid.uuid4().hex[:24]
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(insert(batches).values(
            batch_id=batch_id, partner_id=partner_id, adapter="health", kind="monthly",
            period="2026-02", status="done", file_path="/nonexistent", file_format="csv",
            file_size=10, sha256="0" * 64, rows_done=3, rows_total=2, accepted=1, rejected=1,
            credits_total="3", created_at=now, finished_at=now))
        # A row error that (wrongly) quotes an identity number: the page must mask it anyway.
        conn.execute(insert(batch_errors).values(
            batch_id=batch_id, row_no=3, column_name="身份证号", code="ID_NUMBER_INVALID",
            message=f"bad id {id_number}", message_zh=f"身份证号 {id_number} 校验位错误"))
    return batch_id


def _client(world: World) -> httpx.Client:
    client = httpx.Client(base_url=world.url, follow_redirects=False)
    world.clients.append(client)
    return client


def _login(client: httpx.Client, token: str, next_path: str = "/ops") -> httpx.Response:
    page = client.get("/ops/login", params={"next": next_path})
    assert page.status_code == 200 and "运维令牌" in page.text
    csrf = CSRF.search(page.text)
    assert csrf is not None
    return client.post("/ops/login", data={"token": token, "csrf": csrf.group(1), "next": next_path})


def _session_csrf(client: httpx.Client) -> str:
    page = client.get("/ops")
    assert page.status_code == 200, page.text
    found = CSRF.search(page.text)  # the logout form carries it
    assert found is not None
    return found.group(1)


def _logged_in(world: World, token: str) -> tuple[httpx.Client, str]:
    client = _client(world)
    assert _login(client, token).status_code == 303
    return client, _session_csrf(client)


def _no_clear_ids(html: str, world: World) -> None:
    for number in world.id_numbers:
        assert number not in html
    assert ID_LIKE.search(OWN_ID.sub(" ", html)) is None


def _audit(engine: Engine, kind: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(audit_events).where(audit_events.c.kind == kind)
                            .order_by(audit_events.c.seq)).mappings().all()
    return [{**r, "detail": orjson.loads(r["detail"])} for r in rows]


def test_login_session_cookie_and_logout(world: World) -> None:
    with _client(world) as client:
        for path in ("/ops", "/ops/deliveries?status=dead", f"/ops/records/{world.dead_id}"):
            resp = client.get(path)
            assert resp.status_code == 303 and resp.headers["location"].startswith("/ops/login?next=")
        assert client.post("/ops/deliveries/reprocess", data={"step": "preview"}
                           ).headers["location"].startswith("/ops/login")

        # The login form's own CSRF token is required; a wrong token is refused in Chinese.
        assert client.post("/ops/login", data={"token": world.operator_token}).status_code == 403
        bad = _login(client, "op_not-a-token")
        assert bad.status_code == 401 and "令牌无效" in bad.text
        assert sessions.COOKIE not in client.cookies

        ok = _login(client, world.operator_token, f"/ops/records/{world.dead_id}")
        assert ok.status_code == 303 and ok.headers["location"] == f"/ops/records/{world.dead_id}"
        cookie = next(h for h in ok.headers.get_list("set-cookie") if h.startswith(sessions.COOKIE))
        flags = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/ops"} <= flags
        assert any(f.startswith("max-age=") for f in flags)
        home = client.get("/ops")
        assert home.status_code == 200 and "概览" in home.text
        assert home.headers["content-security-policy"].startswith("default-src 'none'")
        csrf = CSRF.search(home.text)
        assert csrf is not None

        # No open redirect after login.
        again = _client(world)
        assert _login(again, world.operator_token, "//evil.example/ops").headers["location"] == "/ops"

        # A tampered cookie, or one whose expiry has passed, is no session.
        value = client.cookies[sessions.COOKIE]
        forged = _client(world)
        forged.cookies.set(sessions.COOKIE, value[:-2] + ("00" if not value.endswith("00") else "11"),
                           path="/ops")
        assert forged.get("/ops").status_code == 303
        signer = sessions.Signer(SECRET_KEY)
        issued = sessions.log_in(world.engine, signer, world.operator_token,
                                 now=time.time() - sessions.SESSION_SECONDS - 5)
        assert issued is not None
        expired = _client(world)
        expired.cookies.set(sessions.COOKIE, issued[0], path="/ops")
        assert expired.get("/ops").status_code == 303

        # Logout needs the CSRF token too; then the session is gone, a copy of its cookie too.
        assert client.post("/ops/logout").status_code == 403
        copied = _client(world)
        copied.cookies.set(sessions.COOKIE, value, path="/ops")
        assert copied.get("/ops").status_code == 200
        out = client.post("/ops/logout", data={"csrf": csrf.group(1)})
        assert out.status_code == 303 and out.headers["location"] == "/ops/login"
        assert client.get("/ops").status_code == 303
        assert copied.get("/ops").status_code == 303
        assert copied.post("/ops/deliveries/reprocess",
                           data={"csrf": csrf.group(1), "step": "preview"}).status_code in (303, 403)

        # A deleted operator loses access at the next request.
        viewer, _ = _logged_in(world, world.viewer_token)
        assert viewer.get("/ops").status_code == 200
        with world.engine.begin() as conn:
            conn.execute(delete(operators).where(operators.c.role == "viewer"))
        assert viewer.get("/ops").status_code == 303


def test_every_page_renders_in_chinese_with_masked_ids(world: World) -> None:
    viewer, _ = _logged_in(world, world.viewer_token)
    pages = {
        "/ops": ["概览", "死信", "独立 worker 进程", "距", "合作方推送"],
        "/ops/deliveries": ["失败投递", world.dead_title, world.dead_id, "DOWNSTREAM_REJECTED"],
        "/ops/deliveries?status=delivered": [world.delivered, "已投递"],
        f"/ops/records/{world.dead_id}": ["时间线", "死信（投递失败）", "投递尝试"],
        f"/ops/records/{world.conflict}": ["冲突（待处理）", world.delivered],
        "/ops/conflicts": ["冲突", world.conflict, world.delivered, "99"],
        # Two data rows after the header: rows_done is the file row (3), not the rows done.
        "/ops/batches": ["批次", world.batch_id, "2 / 2"],
        f"/ops/batches/{world.batch_id}": ["拒收的行", "ID_NUMBER_INVALID", "校验位错误",
                                           "<dt>已处理行</dt><dd>2</dd>", "文件第 3 行"],
        "/ops/reconciliation?adapter=health&year=2026": ["年报与月报对账", "暂无年报批次", "2026-02"],
    }
    for path, expected in pages.items():
        resp = viewer.get(path)
        assert resp.status_code == 200, (path, resp.text)
        for text in expected:
            assert text in resp.text, (path, text)
        _no_clear_ids(resp.text, world)
        # A viewer sees no action buttons.
        assert "重新投递</button>" not in resp.text and "修改后重新投递</a>" not in resp.text
    record = viewer.get(f"/ops/records/{world.dead_id}").text
    number = world.id_numbers[2]
    assert f"{number[:6]}{'*' * 8}{number[-4:]}" in record  # shown masked, never clear
    delivered = viewer.get("/ops/deliveries?status=delivered").text
    assert world.dead_id not in delivered

    # Bad parameters: a Chinese page with a 4xx, never a 500 (nor the API's JSON).
    bad = {
        "/ops/deliveries?status=bogus": 400, "/ops/deliveries?since=yesterday": 400,
        "/ops/deliveries?limit=0": 400, "/ops/deliveries?partner_id=%00x": 400,
        "/ops/deliveries?since=2026-03-02&until=2026-03-01": 400,
        "/ops/deliveries?cursor=garbage": 422, "/ops/deliveries?error_code=NOPE": 422,
        "/ops/conflicts?cursor=garbage": 422, "/ops/batches?page=0": 400,
        "/ops/batches?status=x": 400, "/ops/reconciliation?year=abc": 400,
        "/ops/reconciliation?adapter=canonical": 400, "/ops/records/R-unknown": 404,
        "/ops/records/R%00x": 404, "/ops/batches/B-unknown": 404,
        f"/ops/batches/{world.batch_id}?cursor=-1": 400,
    }
    for path, status in bad.items():
        resp = viewer.get(path)
        assert resp.status_code == status, (path, resp.text)
        assert resp.headers["content-type"].startswith("text/html"), path
        assert any(t in resp.text for t in ("参数有误", "未找到", "参数")), (path, resp.text)
    # Filters that match: by error code and time.
    found = viewer.get("/ops/deliveries", params={"error_code": "DOWNSTREAM_REJECTED",
                                                   "since": "2000-01-01", "until": "2100-01-01"})
    assert found.status_code == 200 and "共 <strong id=\"total\">2</strong> 条" in found.text
    none = viewer.get("/ops/deliveries", params={"until": "2000-01-01"})
    assert "共 <strong id=\"total\">0</strong> 条" in none.text

    # Paged (newest first) and timed in Asia/Shanghai.
    first = viewer.get("/ops/deliveries", params={"status": "", "limit": "1"})
    link = re.search(r'href="/ops/deliveries\?([^"]*cursor=[^"]+)">下一页', first.text)
    assert link is not None and 'data-record="' in first.text
    second = viewer.get("/ops/deliveries?" + link.group(1).replace("&amp;", "&"))
    assert second.status_code == 200
    ids = [re.findall(r'data-record="([^"]+)"', page.text) for page in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    with world.engine.connect() as conn:
        updated = conn.execute(select(outbox.c.updated_at)
                               .where(outbox.c.record_id == world.dead_id)).scalar_one()
    local = updated.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d %H:%M:%S")
    assert local in viewer.get(f"/ops/deliveries?record_id={world.dead_id}").text

    # A version whose payload retention pruned shows as such (the stub of ops_interface.md).
    prune_delivered(world)
    pruned = viewer.get(f"/ops/records/{world.delivered}")
    assert pruned.status_code == 200 and "已按保留期清理" in pruned.text
    assert "已投递" in pruned.text


def test_viewer_gets_403_csrf_is_required_and_the_operator_acts(world: World) -> None:
    viewer, viewer_csrf = _logged_in(world, world.viewer_token)
    operator, operator_csrf = _logged_in(world, world.operator_token)
    posts = [
        ("/ops/deliveries/reprocess", {"step": "confirm", "record_id": world.dead_id, "reason": "x"}),
        ("/ops/deliveries/reprocess", {"step": "preview", "status": "dead"}),
        (f"/ops/records/{world.dead_title}/edit", {"activity.title": "高原医学", "reason": "x"}),
        (f"/ops/conflicts/{world.conflict}/resolve", {"keep": "this", "reason": "x"}),
    ]
    for path, form in posts:
        resp = viewer.post(path, data={**form, "csrf": viewer_csrf})
        assert resp.status_code == 403 and "无权操作" in resp.text, (path, resp.text)
        # The operator without the token, or with another session's token, is refused too.
        assert operator.post(path, data=form).status_code == 403
        stolen = operator.post(path, data={**form, "csrf": viewer_csrf})
        assert stolen.status_code == 403 and "请求已失效" in stolen.text
    for path in (f"/ops/records/{world.dead_title}/edit", f"/ops/conflicts/{world.conflict}/resolve"):
        assert viewer.get(path).status_code == 403
        assert operator.get(path).status_code == 200
    assert "重新投递</button>" in operator.get("/ops/deliveries").text
    # Nothing moved.
    assert world.outbox_status(world.dead_id) == [(1, "dead")]
    assert world.outbox_status(world.dead_title) == [(1, "dead")]
    with world.engine.connect() as conn:
        status = conn.execute(select(records.c.status).where(records.c.record_id == world.conflict))
        assert status.scalar_one() == "conflict"
    assert _audit(world.engine, "ops_reprocess") == []
    assert operator_csrf != viewer_csrf

    # Then the operator acts (same world: a second one would double this test's time).
    _operator_reprocesses_edits_and_resolves(world, operator, operator_csrf)


def _operator_reprocesses_edits_and_resolves(world: World, client: httpx.Client, csrf: str) -> None:
    me = _session_name(world.engine, world.operator_token)

    # Reprocess by id: the dry run counts, the confirmation needs a reason.
    preview = client.post("/ops/deliveries/reprocess",
                          data={"csrf": csrf, "step": "preview", "record_id": world.dead_id})
    assert preview.status_code == 200 and "将重新投递 <strong id=\"matched\">1</strong> 条" in preview.text
    assert world.outbox_status(world.dead_id) == [(1, "dead")]
    no_reason = client.post("/ops/deliveries/reprocess",
                            data={"csrf": csrf, "step": "confirm", "record_id": world.dead_id})
    assert no_reason.status_code == 400 and "请填写" in no_reason.text
    done = client.post("/ops/deliveries/reprocess", data={
        "csrf": csrf, "step": "confirm", "record_id": world.dead_id, "reason": "下游已修复"})
    assert done.status_code == 200 and "已重新排队 <strong>1</strong> 条" in done.text
    [run] = _audit(world.engine, "ops_reprocess")
    assert run["actor"] == me and run["detail"]["reason"] == "下游已修复"
    assert run["detail"]["filter"] == {"record_ids": [world.dead_id]}

    # The whole filter: the other dead letter (the title is still rejected downstream).
    bulk = client.post("/ops/deliveries/reprocess",
                       data={"csrf": csrf, "step": "preview", "status": "dead"})
    assert "将重新投递 <strong id=\"matched\">1</strong> 条" in bulk.text
    world.drain()
    assert world.outbox_status(world.dead_id) == [(1, "delivered")]
    page = client.get(f"/ops/records/{world.dead_id}").text
    assert 'data-status="delivered"' in page and "已投递" in page
    applied = httpx.get(f"{world.mock_url}/_mock/applied/{world.dead_id}").json()["versions"]
    assert len(applied) == 1

    # Reprocess with edit: the title fixed, a new version delivered, the diff audited.
    form = client.get(f"/ops/records/{world.dead_title}/edit")
    assert form.status_code == 200 and 'value="[REJECT] 高原医学专题讲座"' in form.text
    # Printed masked, so write-only: an empty box, the masked value only in its label.
    assert 'name="evidence.certificate_no" type="password" value=""' in form.text
    _no_clear_ids(form.text, world)
    fields = dict(re.findall(r'name="([a-z_.]+)" type="[a-z]+" value="([^"]*)"', form.text))
    # The version the form shows travels with it (a newer one since is refused, 409).
    fields.update(re.findall(r'type="hidden" name="(version)" value="(\d+)"', form.text))
    assert fields["version"] == "1"
    typed = world.id_numbers[1]  # a typed identity number is never echoed back
    no_reason = client.post(f"/ops/records/{world.dead_title}/edit",
                            data={**fields, "person.id_number": typed, "csrf": csrf})
    assert no_reason.status_code == 400 and "请填写修改原因" in no_reason.text
    _no_clear_ids(no_reason.text, world)
    assert 'name="person.id_number" type="password" value=""' in no_reason.text
    unchanged = client.post(f"/ops/records/{world.dead_title}/edit",
                            data={**fields, "csrf": csrf, "reason": "无修改"})
    assert unchanged.status_code == 400 and "没有修改任何字段" in unchanged.text
    edited = client.post(f"/ops/records/{world.dead_title}/edit", data={
        **fields, "activity.title": "高原医学专题讲座", "csrf": csrf, "reason": "去掉误加的标记"})
    assert edited.status_code == 200 and "已修改并重新排队" in edited.text, edited.text
    world.drain()
    assert world.outbox_status(world.dead_title)[-1] == (2, "delivered")
    [applied_edit] = httpx.get(f"{world.mock_url}/_mock/applied/{world.dead_title}").json()["versions"]
    assert applied_edit["record"]["activity"]["title"] == "高原医学专题讲座"
    assert applied_edit["record"]["evidence"]["certificate_no"] == CERT_LIKE_AN_ID

    # A conflict resolved by keeping the existing record: confirmation, then closed.
    confirm = client.get(f"/ops/conflicts/{world.conflict}/resolve",
                         params={"other": world.delivered})
    assert confirm.status_code == 200 and "保留哪一版" in confirm.text
    _no_clear_ids(confirm.text, world)
    shown = re.search(r'type="hidden" name="version" value="(\d+)"', confirm.text)
    assert shown is not None
    missing = client.post(f"/ops/conflicts/{world.conflict}/resolve",
                          data={"csrf": csrf, "keep": "existing", "version": shown.group(1)})
    assert missing.status_code == 400 and "请选择" in missing.text
    stale = client.post(f"/ops/conflicts/{world.conflict}/resolve", data={
        "csrf": csrf, "keep": "existing", "reason": "以培训基地为准",
        "version": str(int(shown.group(1)) + 1)})
    assert stale.status_code == 409 and "新版本" in stale.text, stale.text
    resolved = client.post(f"/ops/conflicts/{world.conflict}/resolve", data={
        "csrf": csrf, "keep": "existing", "reason": "以培训基地为准", "version": shown.group(1)})
    assert resolved.status_code == 200 and "冲突已解决" in resolved.text
    again = client.post(f"/ops/conflicts/{world.conflict}/resolve", data={
        "csrf": csrf, "keep": "existing", "reason": "再来一次", "version": shown.group(1)})
    assert again.status_code == 409 and "操作未完成" in again.text
    assert world.conflict not in client.get("/ops/conflicts").text


def _session_name(engine: Engine, token: str) -> str:
    found = sessions.log_in(engine, sessions.Signer(SECRET_KEY), token)
    assert found is not None
    return found[1].operator.name


# -- identifiers the gateway made are never masked; typed dates at the calendar's edges ----------

ID_NUMBER = "630102198704139126"
DIGIT_RUN_BATCH = "B123456789012345678abcdef"  # "B" + 24 hex, holding an 18-digit run


def test_gateway_identifiers_print_as_they_are_and_identity_numbers_masked() -> None:
    assert _finalize(Ident(DIGIT_RUN_BATCH)) == DIGIT_RUN_BATCH
    assert _finalize(DIGIT_RUN_BATCH) == DIGIT_RUN_BATCH  # masking keeps the gateway's ids whole
    assert _finalize(f"身份证号 {ID_NUMBER}") == f"身份证号 {mask_id(ID_NUMBER)}"
    record_id = "R000000123456789012345678"
    link = Renderer.query({"other": Ident(record_id), "partner_id": ID_NUMBER})
    assert isinstance(link, Ident) and f"other={record_id}" in link and ID_NUMBER not in link
    # CSRF tokens (the login form's too) are base64url of the MAC, unpadded, and still checked.
    signer = sessions.Signer(SECRET_KEY)
    for token in (signer.csrf_for("some-session"), sessions.login_csrf(signer, "nonce")):
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), token
    assert signer.check_csrf("some-session", signer.csrf_for("some-session"))
    assert not signer.check_csrf("some-session", signer.csrf_for("other-session"))
    assert not signer.check_csrf("some-session", None)


def _old_hex_csrf(sid: str) -> str:
    """The CSRF token the console used to issue: the first 40 hex digits of the MAC."""
    key = hashlib.sha256(b"ce-gateway/console-session/" + SECRET_KEY.encode()).digest()
    return hmac.new(key, f"csrf\n{sid}".encode(), hashlib.sha256).hexdigest()[:40]


def test_digit_runs_in_gateway_ids_and_edge_dates_do_not_break_the_console(
    db_url: str, make_settings: MakeSettings, new_partner: Callable[..., Partner],
    new_operator: Callable[..., str],
) -> None:
    engine = make_engine(db_url)
    partner = new_partner(engine)
    batch_id = _batch_with_row_error(engine, partner.partner_id, ID_NUMBER, DIGIT_RUN_BATCH)
    signer = sessions.Signer(SECRET_KEY)
    # A session whose hex token would have held a 15/18-digit run (~0.44 % of sessions).
    sid = next(s for s in (f"sid-{i}" for i in itertools.count())
               if mask_text(_old_hex_csrf(s)) != _old_hex_csrf(s))
    issued = sessions.log_in(engine, signer, new_operator(engine, "viewer"))
    assert issued is not None
    payload = signer.unsign(issued[0])
    assert payload is not None
    try:
        with uvicorn_thread(create_app(make_settings(db_url), run_worker=False)) as url, \
                httpx.Client(base_url=url, follow_redirects=False) as client:
            client.cookies.set(sessions.COOKIE, signer.sign({**payload, "sid": sid}), path="/ops")

            listing = client.get("/ops/batches")
            assert listing.status_code == 200
            assert f'<a href="/ops/batches/{batch_id}">{batch_id}</a>' in listing.text
            page = client.get(f"/ops/batches/{batch_id}")
            assert page.status_code == 200 and f"<h1>批次 {batch_id}</h1>" in page.text
            assert ID_NUMBER not in page.text and mask_id(ID_NUMBER) in page.text

            # Dates at the calendar's edges: a friendly 400, never a 500.
            for query in ("since=0001-01-01", "until=9999-12-31", "since=9999-12-31T23:00-05:00",
                          "until=1999-12-31"):
                bad = client.get(f"/ops/deliveries?{query}")
                assert bad.status_code == 400 and "年份应在 2000 到 2999 之间" in bad.text, query
            edges = client.get("/ops/deliveries?since=2000-01-01&until=2999-12-31")
            assert edges.status_code == 200 and '<strong id="total">0</strong>' in edges.text

            home = client.get("/ops")
            found = CSRF.search(home.text)
            assert found is not None and found.group(1) == signer.csrf_for(sid)
            out = client.post("/ops/logout", data={"csrf": found.group(1)})
            assert out.status_code == 303 and out.headers["location"] == "/ops/login"
    finally:
        engine.dispose()


def test_a_batch_page_walks_its_rejected_rows_and_says_when_its_file_was_removed(
        world: World) -> None:
    """The console follows the API's opaque rows cursor: 100 rows a page, none lost or repeated."""
    with world.engine.connect() as conn:
        partner_id = conn.execute(select(batches.c.partner_id).where(
            batches.c.batch_id == world.batch_id)).scalar_one()
    big = _batch_with_row_error(world.engine, partner_id, world.id_numbers[0])
    removed = datetime(2027, 4, 2, 1, 30, tzinfo=UTC)
    with world.engine.begin() as conn:
        conn.execute(insert(batch_errors), [
            {"batch_id": big, "row_no": 3 + n, "column_name": "学时", "code": "SCHEMA",
             "message": f"row {n}", "message_zh": f"第 {n} 行"} for n in range(1, 150)])
        conn.execute(update(batches).where(batches.c.batch_id == big)
                     .values(file_removed_at=removed))
    viewer, _ = _logged_in(world, world.viewer_token)
    rows: list[str] = []
    path, pages = f"/ops/batches/{big}", 0
    while path:
        page = viewer.get(path)
        assert page.status_code == 200, page.text
        table = page.text.split('id="row-errors"', 1)[1].split("</table>", 1)[0]
        found = re.findall(r'<tr><td class="num">(\d+)</td>', table)
        assert found and len(found) <= 100
        rows += found
        pages += 1
        assert ("回到第一页" in page.text) == (pages > 1)
        assert "已按保留期删除（2027-04-02 09:30:00）" in page.text  # local time (Asia/Shanghai)
        link = re.search(r'href="(/ops/batches/[^"?]+\?cursor=[^"]+)">下一页', page.text)
        path = link.group(1) if link else ""
        _no_clear_ids(page.text, world)
    assert pages == 2 and rows == [str(n) for n in range(3, 153)]
    # A page of one batch's rows is not a place in another's.
    cursor = re.search(r'\?cursor=([^"]+)">下一页', viewer.get(f"/ops/batches/{big}").text)
    assert cursor is not None
    other = viewer.get(f"/ops/batches/{world.batch_id}?cursor={cursor.group(1)}")
    assert other.status_code == 400 and "从第一页重新翻页" in other.text
    assert "已按保留期删除" not in viewer.get(f"/ops/batches/{world.batch_id}").text
