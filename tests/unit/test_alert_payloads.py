"""Alert messages in the robots' JSON shapes, what counts as sent, and the push deadlines."""

from __future__ import annotations

from datetime import UTC, date, datetime

import httpx
import pytest

from gateway.alerts import ALERTS_JOB, AlertNotSent, Condition, payload, send
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
