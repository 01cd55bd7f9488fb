"""Alerts to the ops team's group chat: a WeCom (企业微信) or DingTalk (钉钉) robot webhook.

Conditions, each with a key naming one occurrence (``alert_state.key``):

==============================  ==============================================================
``missed_push:<partner>:<M>``   a monthly partner (health, finance) has no batch for month M,
                                the latest month whose deadline (``ALERT_MONTHLY_PUSH_DAY`` of
                                the next month) has passed
``backlog_age``                 the oldest pending delivery is older than
                                ``ALERT_BACKLOG_AGE_SECONDS``
``dead_letters:<through>``      deliveries dead-lettered since the last dead-letter alert
                                (``through``: the newest one's time — the next alert's start)
``year_close:<date>``           deliveries still failing (retrying or dead) within
                                ``ALERT_YEAR_CLOSE_DAYS`` days of the CE year close
==============================  ==============================================================

:func:`evaluate` (the ``alerts`` job every ``ALERT_INTERVAL_SECONDS``, or ``ce-gateway alerts
check``) computes the active conditions at ``now``, marks rows of conditions that went away
``cleared_at`` (so a recurrence fires again), and fires each active condition without a live
row.  Firing is *claim, post, commit* in one transaction: the row is inserted (or a cleared
row re-armed with a conditional UPDATE), the webhook is posted, and the transaction commits
only after a 2xx whose body carries no robot ``errcode``.  A failed post rolls the claim back,
so the next tick retries.  A concurrent evaluator (another replica, a manual ``check``) blocks
on the uncommitted key and then finds it taken, so an alert goes out once.  The one gap is a
crash between a successful post and the commit: the next tick posts again (at least once,
never lost).  The post runs under the claim's lock, so its timeout is short
(``ALERT_WEBHOOK_TIMEOUT_SECONDS``).

Messages are Chinese with English in brackets, counts and partner ids only: no identity
number, no payload.  The webhook URL carries the robot's key and is never logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from sqlalchemy import Connection, Engine, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.ops.overview import MONTHLY_ADAPTERS, backlog, latest_due_month, year_close
from gateway.reconcile import months_never_pushed, push_deadline
from gateway.scheduling import Job, register
from gateway.store.tables import alert_state, outbox, partners

__all__ = ["ALERTS_JOB", "AlertNotSent", "Condition", "Evaluation", "conditions", "evaluate",
           "payload", "send"]

log = logging.getLogger(__name__)
PREFIX = "【CE 网关告警】"
ADAPTER_ZH = {"health": "卫健", "finance": "财政"}


class AlertNotSent(GatewayError):
    """The webhook did not take the alert (transport error, non-2xx, or a robot errcode)."""


@dataclass(frozen=True)
class Condition:
    key: str
    kind: str  # missed_push | backlog_age | dead_letters | year_close
    title: str
    lines: tuple[str, ...]
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "kind": self.kind, "title": self.title, "lines": list(self.lines),
                "detail": self.detail}


@dataclass
class Evaluation:
    now: datetime
    configured: bool  # a webhook URL is set
    active: list[Condition] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)  # fired before, still active
    failed: dict[str, str] = field(default_factory=dict)  # key → why the post failed
    cleared: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"now": self.now.isoformat(), "configured": self.configured,
                "active": [c.as_dict() for c in self.active], "fired": self.fired,
                "already": self.already, "failed": self.failed, "cleared": self.cleared}


# -- conditions -------------------------------------------------------------------------------

def _duration_zh(seconds: float) -> str:
    minutes = int(seconds // 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days} 天 " if days else "") + f"{hours} 小时 {minutes} 分"


def _missed_pushes(conn: Connection, settings: Settings, now: datetime) -> list[Condition]:
    month = latest_due_month(settings, now)
    due_by = push_deadline(month, settings.alert_monthly_push_day) - timedelta(days=1)
    local_now = now.astimezone(ZoneInfo(settings.timezone))
    out = []
    for partner_id, adapter in conn.execute(
            select(partners.c.partner_id, partners.c.adapter)
            .where(partners.c.active.is_(True), partners.c.adapter.in_(MONTHLY_ADAPTERS))
            .order_by(partners.c.partner_id)):
        if month not in months_never_pushed(conn, adapter, int(month[:4]), today=local_now,
                                            partner_id=partner_id,
                                            push_day=settings.alert_monthly_push_day):
            continue
        out.append(Condition(
            f"missed_push:{partner_id}:{month}", "missed_push", "月度数据未按时推送 (monthly push missed)",
            (f"合作方 (partner)：{partner_id}（{ADAPTER_ZH.get(adapter, adapter)} {adapter}）",
             f"月份 (month)：{month}",
             f"应于 {due_by.isoformat()} 前推送 (due by)",
             "请联系对方补推月度批次 (ask the partner to push the monthly batch)"),
            {"partner_id": partner_id, "adapter": adapter, "month": month,
             "due_by": due_by.isoformat()}))
    return out


def _backlog_age(conn: Connection, settings: Settings, now: datetime) -> list[Condition]:
    pending = backlog(conn)
    age = pending.oldest_age_seconds(now)
    if age is None or age <= settings.alert_backlog_age_seconds:
        return []
    return [Condition(
        "backlog_age", "backlog_age", "投递积压超时 (delivery backlog too old)",
        (f"待投递 (pending)：{pending.size} 条",
         f"最早一条已等待 (oldest waiting)：{_duration_zh(age)}（{int(age)} s）",
         f"阈值 (threshold)：{int(settings.alert_backlog_age_seconds)} s",
         "请检查管理系统接口与熔断状态 (check the downstream and the circuit)"),
        {"size": pending.size, "oldest_age_seconds": round(age, 3),
         "threshold_seconds": settings.alert_backlog_age_seconds})]


def _dead_letters(conn: Connection) -> list[Condition]:
    last = conn.execute(select(alert_state.c.detail).where(alert_state.c.kind == "dead_letters")
                        .order_by(alert_state.c.fired_at.desc()).limit(1)).scalar()
    since = datetime.fromisoformat(json.loads(last)["through"]) if last else None
    dead = outbox.c.status == "dead"
    where = dead if since is None else and_(dead, outbox.c.updated_at > since)
    new, through = conn.execute(select(func.count(), func.max(outbox.c.updated_at)).where(where)).one()
    if not new or through is None:
        return []
    total = conn.execute(select(func.count()).where(dead)).scalar_one()
    return [Condition(
        f"dead_letters:{through.isoformat()}", "dead_letters", "新增死信 (new dead letters)",
        (f"新增 (new)：{new} 条；死信总数 (total dead)：{total} 条",
         "请在运维控制台 /ops 查看原因并重新投递 (see the reasons and reprocess in the ops console)"),
        {"new": int(new), "total": int(total), "since": since.isoformat() if since else None,
         "through": through.isoformat()})]


def _year_close(conn: Connection, settings: Settings, now: datetime) -> list[Condition]:
    close = year_close(settings, now)
    if close.days_left > settings.alert_year_close_days:
        return []
    retrying = conn.execute(select(func.count()).where(outbox.c.status == "pending",
                                                       outbox.c.attempts > 0)).scalar_one()
    dead = conn.execute(select(func.count()).where(outbox.c.status == "dead")).scalar_one()
    if not retrying and not dead:
        return []
    return [Condition(
        f"year_close:{close.date.isoformat()}", "year_close",
        "临近年度截止仍有投递失败 (deliveries failing close to the year close)",
        (f"{close.year} 年度截止日 (year close)：{close.date.isoformat()}，"
         f"剩余 (days left) {close.days_left} 天",
         f"重试中 (retrying)：{retrying} 条；死信 (dead)：{dead} 条",
         "截止后管理系统将不再接收当年学时 (after the close the year's hours are refused)"),
        {"year": close.year, "close": close.date.isoformat(), "days_left": close.days_left,
         "retrying": int(retrying), "dead": int(dead)})]


def conditions(conn: Connection, settings: Settings, now: datetime) -> list[Condition]:
    """Every alert condition active at ``now``."""
    return [*_missed_pushes(conn, settings, now), *_backlog_age(conn, settings, now),
            *_dead_letters(conn), *_year_close(conn, settings, now)]


# -- sending --------------------------------------------------------------------------------

def payload(condition: Condition, fmt: str) -> dict[str, Any]:
    """The robot message: WeCom markdown or DingTalk text."""
    if fmt == "wecom":
        content = f"**{PREFIX}{condition.title}**\n" + "\n".join(f"> {line}" for line in condition.lines)
        return {"msgtype": "markdown", "markdown": {"content": content}}
    if fmt == "dingtalk":
        return {"msgtype": "text",
                "text": {"content": f"{PREFIX}{condition.title}\n" + "\n".join(condition.lines)}}
    raise ValueError(f"unknown alert webhook format {fmt!r} (wecom | dingtalk)")


def send(client: httpx.Client, url: str, body: dict[str, Any]) -> None:
    """POST one message; :class:`AlertNotSent` unless a 2xx without a robot error code."""
    try:
        response = client.post(url, json=body)
    except httpx.HTTPError as exc:
        raise AlertNotSent(f"{type(exc).__name__}: {exc}") from exc
    if not response.is_success:
        raise AlertNotSent(f"HTTP {response.status_code}")
    try:
        answer = response.json()
    except ValueError:
        return  # a 2xx without JSON: a plain relay took it
    errcode = answer.get("errcode") if isinstance(answer, dict) else None
    if errcode not in (None, 0):  # WeCom/DingTalk answer 200 with errcode ≠ 0 when refusing
        raise AlertNotSent(f"errcode {errcode}: {str(answer.get('errmsg', ''))[:200]}")


def _claim(conn: Connection, condition: Condition, now: datetime) -> bool:
    """Take the condition's row for this firing; ``False`` if it is live (fired, not cleared)."""
    detail = json.dumps(condition.detail, ensure_ascii=False, sort_keys=True)
    row = conn.execute(select(alert_state.c.cleared_at)
                       .where(alert_state.c.key == condition.key)).first()
    if row is None:
        # Concurrent claimers of one new key queue on the primary key: the loser's INSERT fails.
        conn.execute(insert(alert_state).values(key=condition.key, kind=condition.kind,
                                                fired_at=now, cleared_at=None, detail=detail))
        return True
    if row.cleared_at is None:
        return False
    rearmed = conn.execute(update(alert_state)
                           .where(alert_state.c.key == condition.key, alert_state.c.cleared_at.is_not(None))
                           .values(fired_at=now, cleared_at=None, detail=detail)).rowcount
    return rearmed == 1


def _fire(engine: Engine, settings: Settings, client: httpx.Client, condition: Condition,
          now: datetime, result: Evaluation) -> None:
    assert settings.alert_webhook_url is not None
    try:
        with engine.begin() as conn:
            if not _claim(conn, condition, now):
                result.already.append(condition.key)
                return
            # Raising here rolls the claim back: the next tick tries again.
            send(client, settings.alert_webhook_url, payload(condition, settings.alert_webhook_format))
    except IntegrityError:
        result.already.append(condition.key)  # another evaluator fired it meanwhile
    except AlertNotSent as exc:
        log.warning("alert %s not sent: %s", condition.key, exc)
        result.failed[condition.key] = str(exc)
    else:
        log.info("alert %s sent", condition.key)
        result.fired.append(condition.key)


def _clear(engine: Engine, active: set[str], now: datetime) -> list[str]:
    with engine.begin() as conn:
        live = conn.execute(select(alert_state.c.key).where(alert_state.c.cleared_at.is_(None))).scalars()
        gone = sorted(key for key in live if key not in active)
        if gone:
            conn.execute(update(alert_state)
                         .where(alert_state.c.key.in_(gone), alert_state.c.cleared_at.is_(None))
                         .values(cleared_at=now))
    return gone


def evaluate(engine: Engine, settings: Settings, now: datetime | None = None, *,
             client: httpx.Client | None = None) -> Evaluation:
    """One evaluation at ``now``: clear what went away, fire what is new (see the module doc)."""
    now = now or datetime.now(UTC)
    result = Evaluation(now=now, configured=bool(settings.alert_webhook_url))
    with engine.connect() as conn:
        result.active = conditions(conn, settings, now)
    result.cleared = _clear(engine, {c.key for c in result.active}, now)
    if not result.configured:
        return result
    own = client is None
    http = client or httpx.Client(timeout=settings.alert_webhook_timeout_seconds)
    try:
        for condition in result.active:
            _fire(engine, settings, http, condition, now, result)
    finally:
        if own:
            http.close()
    return result


def _run(engine: Engine, settings: Settings) -> object:
    return evaluate(engine, settings)


# Runs only while a webhook URL is set; ALERT_INTERVAL_SECONDS 0 turns it off.
ALERTS_JOB = register(Job("alerts", _run,
                          lambda s: s.alert_interval_seconds if s.alert_webhook_url else 0))
