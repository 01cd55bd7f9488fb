"""The console's rejections, revalidation and audit check (``/ops``), on SQLite and PostgreSQL.

Built on ``test_console``'s world (a gateway on uvicorn, an operator and a viewer): rejections
are made by ingesting bad records through the real pipeline, then the console is driven as a
browser would.  A rejection is listed with its identity number masked and corrected through the
edit form into an accepted record; revalidation counts first, then, after the reference data
was fixed, turns the selected rejections into records; the audit page names an altered event.
A viewer sees no action and a forged POST of theirs changes nothing.
"""

from __future__ import annotations

import random
import re
from typing import Any

from sqlalchemy import Engine, func, select, update

from gateway.accounts import add_partner
from gateway.masking import mask_id, mask_text
from gateway.pipeline.ingest import ingest
from gateway.pipeline.items import PartnerRef
from gateway.secrets_box import SecretBox
from gateway.store.tables import audit_events, records, rejections
from mock_partners import generators as gen
from tests.conftest import SECRET_KEY
from tests.integration.test_console import (
    World,
    _audit,
    _logged_in,
    _no_clear_ids,
    _session_name,
    world,
)
from tests.support.reference import load_base_and_plan

__all__ = ["world"]  # the fixture, imported from test_console

BASE, PLAN = "QHJD-031", "PLAN-2026-031"
PARTNER = "qh-console-more"
FIELD_INPUT = re.compile(r'name="f:([^"]+)" type="(text|password)" value="([^"]*)"')

BATCH = "B630102199001011234abcdef"  # new_batch_id()'s shape, with an id-number-like run

def _bad_id(world: World, partner_id: str = PARTNER, seed: int = 31,
            source_id: str = "REJ-ID") -> tuple[int, str, str]:
    """A canonical record whose identity number fails its check digit: an open rejection.

    Returns the rejection's id, the clear number and the corrupted number that was sent.
    """
    sub = gen.canonical_submission(random.Random(seed), source_id)
    good = sub["person"]["id_number"]
    sub["person"]["id_number"] = bad = gen.corrupt_check_digit(good)
    [answer] = ingest(world.engine, PartnerRef(partner_id, "canonical"), [sub])
    assert answer.status == "rejected"
    world.id_numbers += [good, bad]
    with world.engine.connect() as conn:
        rid = conn.execute(select(rejections.c.id).where(
            rejections.c.source_record_id == source_id)).scalar_one()
    return int(rid), good, bad


def _unknown_base(world: World, n: int) -> list[str]:
    """``n`` records from a base not yet in the directory (BASE_NOT_RECOGNIZED).

    Its canonical partner is registered for that base: a partner of no base may name none.
    """
    rng = random.Random(32)
    subs = []
    for i in range(n):
        sub = gen.canonical_submission(rng, f"REJ-BASE-{i}", hours="8")
        sub["activity"] |= {"provider_code": BASE, "plan_id": PLAN}
        subs.append(sub)
        world.id_numbers.append(sub["person"]["id_number"])
    relay = add_partner(world.engine, SecretBox(SECRET_KEY), f"{PARTNER}-base", "canonical", BASE)
    answers = ingest(world.engine, PartnerRef(relay.partner_id, "canonical", BASE), subs)
    assert {a.status for a in answers} == {"rejected"}
    return [s["source_record_id"] for s in subs]


def _rejection_statuses(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.source_record_id: r.status for r in conn.execute(
            select(rejections.c.source_record_id, rejections.c.status)
            .order_by(rejections.c.id))}


def _record_statuses(engine: Engine, *source_ids: str) -> dict[str, str]:
    with engine.connect() as conn:
        return {r.source_record_id: r.status for r in conn.execute(
            select(records.c.source_record_id, records.c.status)
            .where(records.c.source_record_id.in_(source_ids)))}


def _listed(html: str) -> list[str]:
    return re.findall(r'data-rejection="(\d+)"', html)


def test_rejections_are_listed_masked_and_an_operator_edit_accepts_one(world: World) -> None:
    rid, good, bad = _bad_id(world)
    [base_source] = _unknown_base(world, 1)
    viewer, viewer_csrf = _logged_in(world, world.viewer_token)
    operator, csrf = _logged_in(world, world.operator_token)

    nav = viewer.get("/ops").text
    for href in ("/ops/rejections", "/ops/revalidate", "/ops/audit"):
        assert f'href="{href}"' in nav

    page = viewer.get("/ops/rejections")
    assert page.status_code == 200 and "驳回记录" in page.text
    assert len(_listed(page.text)) == 2 and str(rid) in _listed(page.text)
    assert mask_id(bad) in page.text and "ID_NUMBER_INVALID" in page.text
    _no_clear_ids(page.text, world)
    assert "修改后重新处理</a>" not in page.text  # a viewer has no edit link
    assert "修改后重新处理</a>" in operator.get("/ops/rejections").text

    # Filters (the API's list helper) and keyset paging.
    by_code = viewer.get("/ops/rejections", params={"error_code": "ID_NUMBER_INVALID",
                                                     "partner_id": PARTNER, "adapter": "canonical"})
    assert _listed(by_code.text) == [str(rid)] and '<strong id="total">1</strong>' in by_code.text
    assert _listed(viewer.get("/ops/rejections", params={"adapter": "health"}).text) == []
    first = viewer.get("/ops/rejections", params={"limit": "1"})
    link = re.search(r'href="/ops/rejections\?([^"]*cursor=[^"]+)">下一页', first.text)
    assert link is not None
    second = viewer.get("/ops/rejections?" + link.group(1).replace("&amp;", "&"))
    assert len(_listed(first.text)) == len(_listed(second.text)) == 1
    assert _listed(first.text) != _listed(second.text)
    with world.engine.begin() as conn:  # as if it came in a batch file
        conn.execute(update(rejections).where(rejections.c.id == rid).values(batch_id="B-REJ-1"))
    in_batch = viewer.get("/ops/rejections", params={"batch_id": "B-REJ-1"})
    assert _listed(in_batch.text) == [str(rid)] and '<strong id="total">1</strong>' in in_batch.text
    assert _listed(viewer.get("/ops/rejections", params={"batch_id": "B-OTHER"}).text) == []
    for query, status in (("error_code=NOPE", 400), ("cursor=garbage", 422),
                          ("status=bogus", 400)):
        bad_page = viewer.get(f"/ops/rejections?{query}")
        assert bad_page.status_code == status and "参数有误" in bad_page.text, query

    # A viewer may not open the form; a forged POST is refused and changes nothing.
    path = f"/ops/rejections/{rid}/edit"
    assert viewer.get(path).status_code == 403
    forged = viewer.post(path, data={"f:person.id_number": good, "reason": "x", "csrf": viewer_csrf})
    assert forged.status_code == 403 and "无权操作" in forged.text
    assert operator.post(path, data={"f:person.id_number": good, "reason": "x"}).status_code == 403
    assert _rejection_statuses(world.engine)["REJ-ID"] == "open"

    # The operator's form: the payload's fields by dotted path, the identity number write-only.
    form = operator.get(path)
    assert form.status_code == 200 and "ID_NUMBER_INVALID" in form.text
    _no_clear_ids(form.text, world)
    fields = {name: (kind, value) for name, kind, value in FIELD_INPUT.findall(form.text)}
    assert fields["person.id_number"] == ("password", "")
    assert fields["year"] == ("text", "2026") and fields["activity.title"][1]
    typed = {f"f:{name}": value for name, (_, value) in fields.items()}
    unchanged = operator.post(path, data={**typed, "csrf": csrf, "reason": "无修改"})
    assert unchanged.status_code == 400 and "没有修改任何字段" in unchanged.text
    still_bad = good[:-1] + next(c for c in "0123456789" if c not in (good[-1], bad[-1]))
    world.id_numbers.append(still_bad)
    refused = operator.post(path, data={**typed, "f:person.id_number": still_bad, "csrf": csrf,
                                        "reason": "身份证号录入错误"})
    assert refused.status_code == 422 and "ID_NUMBER_INVALID" in refused.text
    _no_clear_ids(refused.text, world)
    assert _rejection_statuses(world.engine)["REJ-ID"] == "open"

    fixed = operator.post(path, data={**typed, "f:person.id_number": good, "csrf": csrf,
                                      "reason": "身份证号录入错误"})
    assert fixed.status_code == 200 and "已修改并重新处理" in fixed.text, fixed.text
    assert "判定为“已接收”" in fixed.text
    _no_clear_ids(fixed.text, world)
    assert _record_statuses(world.engine, "REJ-ID") == {"REJ-ID": "accepted"}
    assert _rejection_statuses(world.engine) == {"REJ-ID": "revalidated", base_source: "open"}
    [event] = _audit(world.engine, "rejection_edited")
    assert event["actor"] == _session_name(world.engine, world.operator_token)
    assert event["detail"]["rejection_id"] == rid and event["detail"]["reason"] == "身份证号录入错误"
    record_id = re.search(r"生成记录 (R[0-9a-f]{24})", fixed.text)
    assert record_id is not None and record_id.group(1) == event["record_id"]

    again = operator.post(path, data={**typed, "f:person.id_number": good, "csrf": csrf,
                                      "reason": "再来一次"})
    assert again.status_code == 409 and "不能修改" in again.text
    assert _listed(viewer.get("/ops/rejections").text) != [str(rid)]
    assert str(rid) in _listed(viewer.get("/ops/rejections?status=revalidated").text)


def test_revalidate_counts_first_then_accepts_once_the_reference_data_is_fixed(
    world: World,
) -> None:
    _bad_id(world)  # outside the filter: it stays open
    sources = _unknown_base(world, 2)
    with world.engine.begin() as conn:  # as if from a file: a gateway batch id whose digits
        conn.execute(update(rejections)  # look like an identity number (masked: selects none)
                     .where(rejections.c.source_record_id.in_(sources)).values(batch_id=BATCH))
    viewer, viewer_csrf = _logged_in(world, world.viewer_token)
    operator, csrf = _logged_in(world, world.operator_token)
    flt = {"error_code": "BASE_NOT_RECOGNIZED", "adapter": "canonical", "batch_id": BATCH}

    preview = viewer.get("/ops/revalidate", params=flt)
    assert preview.status_code == 200 and '<strong id="matched">2</strong>' in preview.text
    assert 'action="/ops/revalidate"' in preview.text and 'id="confirm"' not in preview.text
    assert '<strong id="matched">3</strong>' in viewer.get("/ops/revalidate").text
    assert viewer.get("/ops/revalidate?error_code=NOPE").status_code == 400
    forged = viewer.post("/ops/revalidate", data={**flt, "reason": "x", "csrf": viewer_csrf})
    assert forged.status_code == 403 and "无权操作" in forged.text
    assert operator.post("/ops/revalidate", data={**flt, "reason": "x"}).status_code == 403

    confirm = operator.get("/ops/revalidate", params=flt)
    assert "确认重新校验 2 条" in confirm.text
    hidden = dict(re.findall(r'type="hidden" name="([a-z_]+)" value="([^"]*)"', confirm.text))
    assert {k: hidden.get(k) for k in flt} == flt, confirm.text
    no_reason = operator.post("/ops/revalidate", data={**flt, "csrf": csrf})
    assert no_reason.status_code == 400 and "请填写" in no_reason.text
    assert set(_rejection_statuses(world.engine).values()) == {"open"}
    assert _audit(world.engine, "revalidation") == []

    load_base_and_plan(world.engine, BASE, PLAN)
    done = operator.post("/ops/revalidate", data={**flt, "csrf": csrf, "reason": "基地已入目录"})
    assert done.status_code == 200, done.text
    assert "已重新校验 <strong>2</strong> 条" in done.text
    _no_clear_ids(done.text.replace(BATCH, "B…"), world)  # the batch id is the gateway's own
    assert _record_statuses(world.engine, *sources) == dict.fromkeys(sources, "accepted")
    assert _rejection_statuses(world.engine) == {"REJ-ID": "open",
                                                 **dict.fromkeys(sources, "revalidated")}
    [run] = _audit(world.engine, "revalidation")
    assert run["actor"] == _session_name(world.engine, world.operator_token)
    # The audit text masks every id-number-like run, this batch id's included.
    assert run["detail"]["filter"] == {**flt, "batch_id": mask_text(BATCH)}
    assert run["detail"]["counts"]["accepted"] == 2
    assert '<strong id="matched">0</strong>' in viewer.get("/ops/revalidate", params=flt).text


def test_audit_page_is_intact_then_names_the_altered_event(world: World) -> None:
    viewer, _ = _logged_in(world, world.viewer_token)
    with world.engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(audit_events)).scalar_one()
        victim: Any = conn.execute(select(audit_events.c.seq, audit_events.c.kind).where(
            audit_events.c.record_id == world.dead_id, audit_events.c.kind == "dead")).one()
    intact = viewer.get("/ops/audit")
    assert intact.status_code == 200 and "审计日志完整" in intact.text
    assert f'<strong id="checked">{total}</strong>' in intact.text

    with world.engine.begin() as conn:
        conn.execute(update(audit_events).where(audit_events.c.seq == victim.seq)
                     .values(detail='{"reason":"nothing happened"}'))
    broken = viewer.get("/ops/audit")
    assert broken.status_code == 200 and "审计日志完整" not in broken.text
    assert f'<strong id="bad-seq">{victim.seq}</strong>' in broken.text
    assert "转入死信" in broken.text and "<code>dead</code>" in broken.text  # the event's kind
    assert "内容被修改" in broken.text and "content does not match its hash" in broken.text
    _no_clear_ids(broken.text, world)
