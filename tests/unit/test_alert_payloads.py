"""Alert messages in the robots' JSON shapes, what counts as sent, and the push deadlines."""

from __future__ import annotations

from datetime import UTC, date, datetime

import httpx
import pytest

from gateway.alerts import ALERTS_JOB, AlertNotSent, Condition, digest, payload, send
from gateway.config import Settings
from gateway.ops.overview import latest_due_month, year_close
from gateway.reconcile import due_months, push_deadline

CONDITION = Condition("backlog_age", "backlog_age", "投递积压超时 (delivery backlog too old)",
                      ("待投递 (pending)：3 条", "阈值 (threshold)：600 s"), {"size": 3})


def test_wecom_markdown_shape() -> None:
    body = payload(CONDITION, "wecom")
    assert set(body) == {"msgtype", "markdown"} and body["msgtype"] == "markdown"
    assert set(body["markdown"]) == {"content"}
    assert body["markdown"]["content"] == (
        "**【CE 网关告警】投递积压超时 (delivery backlog too old)**\n"
        "> 待投递 (pending)：3 条\n> 阈值 (threshold)：600 s")


def test_dingtalk_text_shape() -> None:
    body = payload(CONDITION, "dingtalk")
    assert body == {"msgtype": "text", "text": {"content": (
        "【CE 网关告警】投递积压超时 (delivery backlog too old)\n"
        "待投递 (pending)：3 条\n阈值 (threshold)：600 s")}}
    with pytest.raises(ValueError, match="unknown alert webhook format"):
        payload(CONDITION, "slack")


def _missed(partner_id: str, months: list[str], years: tuple[int, ...] = ()) -> list[Condition]:
    adapter = "finance" if partner_id.startswith("fin") else "health"
    return [Condition(f"missed_push:{partner_id}:{m}", "missed_push", "", (),
                      {"partner_id": partner_id, "adapter": adapter, "month": m}) for m in months] + \
        [Condition(f"missed_annual:{partner_id}:{y}", "missed_annual", "", (),
                   {"partner_id": partner_id, "adapter": adapter, "year": y}) for y in years]


def test_a_digest_lists_each_partners_months_as_runs() -> None:
    group = [*_missed("fin-1", ["2025-01", "2025-02", "2025-03", "2025-05", "2025-12", "2026-01"],
                      (2025,)),
             *_missed("wjw-2", ["2026-09"])]
    found = digest(group)
    assert found.detail == {"keys": [c.key for c in group]}
    assert found.lines == (
        "共 8 项未按时推送，涉及 2 个合作方 (8 pushes missed, 2 partners)",
        "fin-1（财政 finance）：月度 (months) 2025-01 至 2025-03（3 个月）、2025-05、"
        "2025-12 至 2026-01（2 个月）；年度 (annual) 2025",
        "wjw-2（卫健 health）：月度 (months) 2026-09",
        "请联系对方补推；每月明细见运维控制台 /ops 总览 "
        "(ask the partners to push; the ops console /ops lists every month)")


@pytest.mark.parametrize("fmt", ["wecom", "dingtalk"])
def test_a_digest_of_many_partners_stays_within_a_robot_message(fmt: str) -> None:
    """WeCom refuses markdown over 4,096 bytes: partners past that are counted, not listed."""
    every_other = [f"2025-{m:02d}" for m in range(1, 13, 2)]  # six runs of one month each
    group = [c for n in range(300) for c in _missed(f"wjw-{n:03d}-{'x' * 40}", every_other, (2025,))]
    found = digest(group, fmt)
    body = payload(found, fmt)
    text = body["markdown"]["content"] if fmt == "wecom" else body["text"]["content"]
    assert 3000 < len(text.encode()) <= 4096
    listed = [line for line in found.lines if line.startswith("wjw-")]
    [more] = [line for line in found.lines if line.startswith("……另有")]
    assert more == f"……另有 {300 - len(listed)} 个合作方未列出 ({300 - len(listed)} more partners not listed)"
    assert listed and listed[0].startswith("wjw-000-") and listed[-1].startswith(f"wjw-{len(listed) - 1:03d}-")
    assert found.lines[0].startswith("共 2100 项未按时推送，涉及 300 个合作方")


@pytest.mark.parametrize(("status", "answer", "sent"), [
    (200, {"errcode": 0, "errmsg": "ok"}, True),
    (200, "relayed", True),  # not JSON: a plain relay took it
    (200, {"errcode": 93000, "errmsg": "invalid webhook url"}, False),  # the robots' refusal
    (500, {"errmsg": "oops"}, False),
    (429, {}, False),
])
def test_what_counts_as_sent(status: int, answer: object, sent: bool) -> None:
    seen: list[httpx.Request] = []

    def robot(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if isinstance(answer, str):
            return httpx.Response(status, text=answer)
        return httpx.Response(status, json=answer)

    with httpx.Client(transport=httpx.MockTransport(robot)) as client:
        if sent:
            send(client, "https://robot.example/cgi-bin/webhook/send?key=k", payload(CONDITION, "wecom"))
        else:
            with pytest.raises(AlertNotSent):
                send(client, "https://robot.example/cgi-bin/webhook/send?key=k", payload(CONDITION, "wecom"))
    [request] = seen
    assert request.method == "POST" and request.headers["content-type"] == "application/json"


def test_transport_error_is_not_sent_and_hides_the_url() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with httpx.Client(transport=httpx.MockTransport(down)) as client, \
            pytest.raises(AlertNotSent) as caught:
        send(client, "https://robot.example/send?key=secret-key", payload(CONDITION, "wecom"))
    assert "secret-key" not in str(caught.value)


def test_push_deadlines_and_the_latest_due_month() -> None:
    assert push_deadline("2026-09", 5) == date(2026, 10, 6)  # due by the 5th: late from the 6th
    assert push_deadline("2026-12", 0) == date(2027, 1, 1)
    assert due_months(2026, date(2026, 10, 5), push_day=5) == [f"2026-{m:02d}" for m in range(1, 9)]
    assert due_months(2026, date(2026, 10, 6), push_day=5)[-1] == "2026-09"
    assert due_months(2026, date(2026, 10, 1)) == [f"2026-{m:02d}" for m in range(1, 10)]
    settings = Settings(alert_monthly_push_day=5, timezone="Asia/Shanghai")
    # 16:00 UTC on 5 January is already 00:00 on the 6th in Xining: December is late from then.
    assert latest_due_month(settings, datetime(2027, 1, 5, 15, 0, tzinfo=UTC)) == "2026-11"
    assert latest_due_month(settings, datetime(2027, 1, 5, 16, 0, tzinfo=UTC)) == "2026-12"


def test_year_close_days_left_honours_extensions() -> None:
    plain = Settings(year_close_extensions={})
    assert year_close(plain, datetime(2026, 12, 27, 2, tzinfo=UTC)).days_left == 3
    after = year_close(plain, datetime(2026, 12, 31, 2, tzinfo=UTC))
    assert (after.year, after.date) == (2027, date(2027, 12, 30))
    extended = Settings(year_close_extensions={2026: date(2027, 3, 31)})
    late = year_close(extended, datetime(2027, 1, 10, 2, tzinfo=UTC))
    assert (late.year, late.date, late.days_left) == (2026, date(2027, 3, 31), 80)


def test_alerts_job_runs_only_with_a_webhook() -> None:
    assert ALERTS_JOB.interval_seconds(Settings(alert_webhook_url=None)) == 0
    configured = Settings(alert_webhook_url="https://robot.example/send", alert_interval_seconds=30)
    assert ALERTS_JOB.interval_seconds(configured) == 30
