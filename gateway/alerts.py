"""Alerts to the ops team's group chat: a WeCom (企业微信) or DingTalk (钉钉) robot webhook.

Conditions, each with a key naming one occurrence (``alert_state.key``):

==============================  ==============================================================
``missed_push:<partner>:<M>``   a monthly partner (health, finance) has no batch for month M,
                                whose deadline (``ALERT_MONTHLY_PUSH_DAY`` of the next month)
                                has passed: one per missing month, each until its batch comes
                                (looking back to January of the previous CE year, and no
                                earlier than the partner started; ``missing_pushes`` in
                                gateway/ops/overview.py)
``missed_annual:<partner>:<Y>`` a monthly partner has no full-year batch for CE year Y
                                (SPEC §1), whose deadline (``ALERT_ANNUAL_PUSH_DAY`` of
                                January Y+1) has passed
``backlog_age``                 the oldest pending delivery is older than
                                ``ALERT_BACKLOG_AGE_SECONDS``
``dead_letters:<through>``      deliveries dead-lettered since the last dead-letter alert
                                (``through``: the sequence number of the newest dead-lettering
                                audit event — the next alert's start)
``year_close:<date>``           deliveries of the closing CE year (the year their record
                                counts toward) still failing (retrying or dead) within
                                ``ALERT_YEAR_CLOSE_DAYS`` days of its close
==============================  ==============================================================

:func:`evaluate` (the ``alerts`` job every ``ALERT_INTERVAL_SECONDS``, or ``ce-gateway alerts
check``) computes the active conditions at ``now``, marks rows of conditions that went away
``cleared_at`` (so a recurrence fires again; only rows live before it read the conditions
and not claimed by another evaluator since), and fires each active condition without a live
row.  Firing is *claim, post, mark sent*, three steps with no transaction open during the post
(on SQLite a transaction holds the store's one write lock — every ingest, nonce, delivery and
batch chunk would wait for the robot; on PostgreSQL it would hold a pooled connection idle in
transaction):

1. *Claim*, one short transaction: insert the key's row with ``sent_at`` NULL and ``fired_at``
   the claim's time, or take an existing row with an UPDATE conditional on the row as read — a
   cleared row (the condition recurred) or a claim left unsent whose lease ran out.  The
   primary key, or the UPDATE's condition, lets one evaluator win: a concurrent one (another
   replica, a manual ``check``) finds the row taken and reports it ``already``.
2. *Post* the webhook.
3. After a 2xx whose body carries no robot ``errcode``, set ``sent_at`` (only while the row
   still carries this claim).  A failed post *undoes* the claim instead — deletes the inserted
   row, or puts the taken row back as it was — so the next tick retries.

An unsent claim's ``fired_at`` is a lease of ``LEASE_TIMEOUTS`` × ``ALERT_WEBHOOK_TIMEOUT_SECONDS``
(a post, answer included, is cut off after ``upstream.DEADLINE_TIMEOUTS`` of them, overrun by at
most one read timeout — httpx alone times out each phase and each read, so a robot that
trickled its answer would hold a post for ever): while it runs, others leave
the row to its claimer (a post in flight); once it has run out the claimer is taken for dead,
and the next tick claims the row again and posts.  So the crash windows are:

* between the claim and a successful post: the alert goes out one lease later, on the first
  tick that still finds the condition (a condition that went away meanwhile is cleared unsent:
  there is nothing left to alert; dead letters are not dropped so, see below);
* between a successful post and the commit of ``sent_at`` (or a post that outlives its lease):
  it is posted again — at least once, never lost while the condition holds.

The dead-letter alert starts from the last alert that was sent or is still leased, so an
unsent one's dead letters are counted again by the next.  Claim times are the evaluation's
``now`` plus the time the evaluation has taken so far: leases run on the evaluations' clock.

Missed pushes go out together.  They come by the dozen at once — the look-back to January of
the previous CE year when alerts are first turned on, a partner registered late, a day when
every partner's deadline passes — and a robot takes 20 messages a minute (WeCom refuses the
rest with ``errcode`` 45009): one message a key would flood the group and leave the alerts
after them failing until the next tick.  So an evaluation fires the other conditions first, one
message each, then claims every missed push it fires and posts them as one digest
(:func:`digest`: per partner, its months as ranges and its years, kept under a robot's message
size).  The claims' leases start again together just before the post (:func:`_restamp`); they
are undone or marked sent together, and given back if the evaluation stops while claiming.
Each key keeps its own row, so what was sent, cleared or recurs is still per month and partner.

Messages are Chinese with English in brackets, counts and partner ids only: no identity
number, no payload.  The webhook URL carries the robot's key and is never logged.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from gateway import upstream
from gateway.config import Settings
from gateway.errors import GatewayError
from gateway.masking import mask_excerpt
from gateway.ops.overview import backlog, later_version_alive, missing_pushes, year_close
from gateway.reconcile import push_deadline
from gateway.scheduling import Job, ensure_held, register
from gateway.store.tables import DEAD_EVENTS, alert_state, audit_events, outbox, records

__all__ = ["ALERTS_JOB", "DIGEST_KINDS", "LEASE_TIMEOUTS", "AlertNotSent", "Condition", "Evaluation",
           "conditions", "digest", "evaluate", "lease", "payload", "send"]

log = logging.getLogger(__name__)
PREFIX = "【CE 网关告警】"
ADAPTER_ZH = {"health": "卫健", "finance": "财政"}
# An unsent claim is left to its claimer for this many webhook timeouts (see the module doc):
# a post gives up after upstream.DEADLINE_TIMEOUTS of them, overrun by at most one read.
LEASE_TIMEOUTS = upstream.DEADLINE_TIMEOUTS + 1
# A robot answers a few dozen bytes ({"errcode":0,"errmsg":"ok"}); more is cut off, not sent.
ROBOT_ANSWER_BYTES = 64 * 1024
# Conditions an evaluation posts together as one digest (see the module doc).
DIGEST_KINDS = frozenset({"missed_push", "missed_annual"})
# A digest lists partners while its text stays within this many UTF-8 bytes, and counts the
# rest: WeCom refuses a markdown message over 4,096 (errcode 40058); DingTalk's text takes more.
DIGEST_MAX_BYTES = 3800


class AlertNotSent(GatewayError):
    """The webhook did not take the alert (transport error, non-2xx, or a robot errcode)."""


@dataclass(frozen=True)
class Condition:
    key: str
    kind: str  # missed_push | missed_annual | backlog_age | dead_letters | year_close
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
    already: list[str] = field(default_factory=list)  # sent before (or being sent), still active
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
    """One condition per partner and due month never pushed, and per due annual batch.

    Each stays active until its batch comes (:func:`gateway.ops.overview.missing_pushes`).
    """
    out = []
    for owed in missing_pushes(conn, settings, now):
        partner = (f"合作方 (partner)：{owed.partner_id}"
                   f"（{ADAPTER_ZH.get(owed.adapter, owed.adapter)} {owed.adapter}）")
        for month in owed.months:
            due_by = push_deadline(month, settings.alert_monthly_push_day) - timedelta(days=1)
            out.append(Condition(
                f"missed_push:{owed.partner_id}:{month}", "missed_push",
                "月度数据未按时推送 (monthly push missed)",
                (partner, f"月份 (month)：{month}", f"应于 {due_by.isoformat()} 前推送 (due by)",
                 "请联系对方补推月度批次 (ask the partner to push the monthly batch)"),
                {"partner_id": owed.partner_id, "adapter": owed.adapter, "month": month,
                 "due_by": due_by.isoformat()}))
        for year in owed.annual:
            due_by = push_deadline(f"{year}-12", settings.alert_annual_push_day) - timedelta(days=1)
            out.append(Condition(
                f"missed_annual:{owed.partner_id}:{year}", "missed_annual",
                "年度数据未按时推送 (annual push missed)",
                (partner, f"年度 (year)：{year}", f"应于 {due_by.isoformat()} 前推送 (due by)",
                 "请联系对方推送全年批次，以便与月度数据对账 "
                 "(ask the partner to push the full-year batch, for the reconciliation)"),
                {"partner_id": owed.partner_id, "adapter": owed.adapter, "year": year,
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


def _dead_letter_mark(conn: Connection, now: datetime, held: timedelta) -> int | None:
    """``through`` of the newest dead-letter alert sent, or claimed and still being posted.

    (Keys written before migration 0010 end in a time, not a sequence number: ignored.)
    """
    keys = conn.execute(select(alert_state.c.key).where(
        alert_state.c.kind == "dead_letters",
        or_(alert_state.c.sent_at.is_not(None), alert_state.c.fired_at > now - held))).scalars()
    return max((int(through) for key in keys if (through := key.partition(":")[2]).isdigit()),
               default=None)


def _dead_letters(conn: Connection, now: datetime, held: timedelta) -> list[Condition]:
    # The mark is a sequence number of the audit trail, whose dead-lettering events are written
    # in the transaction that turns the delivery dead and numbered under the chain head's lock,
    # so in commit order.  (The outbox rows' ``updated_at`` is not: a worker stamps ``now``
    # before its transaction, and a slower or skewed worker commits an older stamp later.)
    since = _dead_letter_mark(conn, now, held)
    # The predicate as the partial index ix_audit_events_dead has it, literally, so it serves.
    newer = select(func.count(), func.max(audit_events.c.seq)).where(text(DEAD_EVENTS))
    if since is not None:
        newer = newer.where(audit_events.c.seq > since)
    new, through = conn.execute(newer).one()
    if not new or through is None:
        return []
    total = conn.execute(select(func.count()).where(outbox.c.status == "dead")).scalar_one()
    return [Condition(
        f"dead_letters:{int(through)}", "dead_letters", "新增死信 (new dead letters)",
        (f"新增 (new)：{new} 条；死信总数 (total dead)：{total} 条",
         "请在运维控制台 /ops 查看原因并重新投递 (see the reasons and reprocess in the ops console)"),
        {"new": int(new), "total": int(total), "since": since, "through": int(through)})]


def _year_close(conn: Connection, settings: Settings, now: datetime) -> list[Condition]:
    close = year_close(settings, now)
    if close.days_left > settings.alert_year_close_days:
        return []
    # Only deliveries of the closing year: another year's failures (a dead letter of a year
    # closed long ago) are not at stake at this close.
    of_the_year = (select(func.count()).select_from(outbox.join(
        records, records.c.record_id == outbox.c.record_id))
        .where(func.coalesce(records.c.counts_year, records.c.year) == close.year))
    retrying = conn.execute(of_the_year.where(outbox.c.status == "pending",
                                              outbox.c.attempts > 0)).scalar_one()
    # A dead version whose correction is pending or delivered has nothing left to redo.
    dead = conn.execute(of_the_year.where(outbox.c.status == "dead",
                                          ~later_version_alive())).scalar_one()
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
            *_dead_letters(conn, now, lease(settings)), *_year_close(conn, settings, now)]


def _month_runs(months: Sequence[str]) -> str:
    """``2025-01``…``2025-03``, ``2025-05`` as "2025-01 至 2025-03（3 个月）、2025-05"."""
    runs: list[list[str]] = []
    for month in sorted(months):
        year, mm = int(month[:4]), int(month[5:7])
        if runs:
            last = runs[-1][-1]
            if (int(last[:4]) * 12 + int(last[5:7])) + 1 == year * 12 + mm:
                runs[-1].append(month)
                continue
        runs.append([month])
    return "、".join(run[0] if len(run) == 1 else f"{run[0]} 至 {run[-1]}（{len(run)} 个月）"
                    for run in runs)


def digest(group: Sequence[Condition], fmt: str = "wecom") -> Condition:
    """Several missed pushes as one message: a line per partner, under ``DIGEST_MAX_BYTES``.

    Partners that do not fit are counted in a last line; the ops console's overview lists
    every month (``GET /ops``, ``missing_months``).  The condition's ``detail`` names every key.
    """
    owed: dict[str, dict[str, Any]] = {}
    for c in group:
        entry = owed.setdefault(c.detail["partner_id"], {"adapter": c.detail["adapter"],
                                                         "months": [], "years": []})
        entry["months" if c.kind == "missed_push" else "years"].append(
            c.detail.get("month") or str(c.detail.get("year")))
    head = (f"共 {len(group)} 项未按时推送，涉及 {len(owed)} 个合作方 "
            f"({len(group)} pushes missed, {len(owed)} partners)",)
    tail = ("请联系对方补推；每月明细见运维控制台 /ops 总览 "
            "(ask the partners to push; the ops console /ops lists every month)",)
    title = "合作方数据未按时推送 (partner pushes missed)"
    lines: list[str] = []
    for n, (partner_id, entry) in enumerate(owed.items()):
        parts = ([f"月度 (months) {_month_runs(entry['months'])}"] if entry["months"] else []) + \
            ([f"年度 (annual) {'、'.join(sorted(entry['years']))}"] if entry["years"] else [])
        line = (f"{partner_id}（{ADAPTER_ZH.get(entry['adapter'], entry['adapter'])} "
                f"{entry['adapter']}）：" + "；".join(parts))
        left = len(owed) - n - 1
        more = (f"……另有 {left} 个合作方未列出 ({left} more partners not listed)",) if left else ()
        trial = Condition("digest", "missed_push", title, (*head, *lines, line, *more, *tail), {})
        if _content_bytes(trial, fmt) > DIGEST_MAX_BYTES and lines:
            left += 1
            lines.append(f"……另有 {left} 个合作方未列出 ({left} more partners not listed)")
            break
        lines.append(line)
    return Condition("digest", "missed_push", title, (*head, *lines, *tail),
                     {"keys": [c.key for c in group]})


def _content_bytes(condition: Condition, fmt: str) -> int:
    return len(_content(condition, fmt)[1].encode())


# -- sending --------------------------------------------------------------------------------

def _content(condition: Condition, fmt: str) -> tuple[str, str]:
    """The message type and the text a robot shows (what its size limit counts)."""
    if fmt == "wecom":
        return "markdown", (f"**{PREFIX}{condition.title}**\n"
                            + "\n".join(f"> {line}" for line in condition.lines))
    if fmt == "dingtalk":
        return "text", f"{PREFIX}{condition.title}\n" + "\n".join(condition.lines)
    raise ValueError(f"unknown alert webhook format {fmt!r} (wecom | dingtalk)")


def payload(condition: Condition, fmt: str) -> dict[str, Any]:
    """The robot message: WeCom markdown or DingTalk text."""
    msgtype, content = _content(condition, fmt)
    return {"msgtype": msgtype, msgtype: {"content": content}}


def send(client: httpx.Client, url: str, body: dict[str, Any], *,
         timeout_seconds: float | None = None) -> None:
    """POST one message; :class:`AlertNotSent` unless a 2xx without a robot error code.

    The whole post, answer included, is bounded (:func:`gateway.upstream.bounded_request`):
    ``DEADLINE_TIMEOUTS`` × ``timeout_seconds`` (default: the client's timeout), and an answer
    of at most ``ROBOT_ANSWER_BYTES``.
    """
    try:
        response = upstream.bounded_request(client, "POST", url, json=body,
                                            timeout_seconds=timeout_seconds,
                                            max_bytes=ROBOT_ANSWER_BYTES)
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
        raise AlertNotSent(f"errcode {errcode}: {mask_excerpt(str(answer.get('errmsg', '')))}")


def lease(settings: Settings) -> timedelta:
    """How long an unsent claim is left to its claimer before another evaluator may post it."""
    return timedelta(seconds=LEASE_TIMEOUTS * settings.alert_webhook_timeout_seconds)


@dataclass(frozen=True)
class _Claim:
    key: str
    at: datetime  # the row's fired_at while claimed: the lease's start, and the claim's token
    before: dict[str, Any] | None  # the row as the claim found it; None if the claim inserted it


def _claim(conn: Connection, condition: Condition, at: datetime, held: timedelta) -> _Claim | None:
    """Take the condition's row for this firing.

    ``None`` if it is live (sent, not cleared) or another evaluator's unsent claim is still
    within its lease (being posted).
    """
    detail = json.dumps(condition.detail, ensure_ascii=False, sort_keys=True)
    row = conn.execute(select(alert_state.c.fired_at, alert_state.c.cleared_at, alert_state.c.sent_at,
                              alert_state.c.detail)
                       .where(alert_state.c.key == condition.key)).mappings().first()
    if row is None:
        # Concurrent claimers of one new key queue on the primary key: the loser's INSERT fails.
        conn.execute(insert(alert_state).values(key=condition.key, kind=condition.kind, fired_at=at,
                                                cleared_at=None, sent_at=None, detail=detail))
        return _Claim(condition.key, at, None)
    if row["sent_at"] is None:
        if row["fired_at"] > at - held:
            return None
    elif row["cleared_at"] is None:
        return None
    # A cleared row (the condition recurred) or a claim whose lease ran out: take it as read.
    taken = conn.execute(
        update(alert_state)
        .where(alert_state.c.key == condition.key, alert_state.c.fired_at == row["fired_at"],
               alert_state.c.cleared_at.is_not_distinct_from(row["cleared_at"]),
               alert_state.c.sent_at.is_not_distinct_from(row["sent_at"]))
        .values(fired_at=at, cleared_at=None, sent_at=None, detail=detail)).rowcount
    return _Claim(condition.key, at, dict(row)) if taken == 1 else None


def _ours(claim: _Claim) -> tuple[Any, ...]:
    """The row still carries ``claim``: nobody took it over after its lease ran out."""
    return (alert_state.c.key == claim.key, alert_state.c.fired_at == claim.at,
            alert_state.c.sent_at.is_(None))


def _mark_sent(engine: Engine, claims: Sequence[_Claim], at: datetime) -> None:
    with engine.begin() as conn:
        for claim in claims:
            if conn.execute(update(alert_state).where(*_ours(claim)).values(sent_at=at)).rowcount != 1:
                # Our post outlived the lease: the taker posts it again (at least once).
                log.warning("alert %s sent after its claim was taken over; it may go out twice",
                            claim.key)


def _undo(engine: Engine, claims: Sequence[_Claim]) -> None:
    """Give the claims back, so the next tick retries: delete the rows inserted, or restore them."""
    with engine.begin() as conn:
        for claim in claims:
            if claim.before is None:
                conn.execute(delete(alert_state).where(*_ours(claim)))
            else:
                conn.execute(update(alert_state).where(*_ours(claim)).values(**claim.before))


def _restamp(engine: Engine, taken: Sequence[tuple[Condition, _Claim]], at: datetime,
             result: Evaluation) -> list[tuple[Condition, _Claim]]:
    """The claims still this evaluation's, their leases started again at ``at``.

    A claim another evaluator took over meanwhile (its lease ran out) is that one's to post.
    """
    kept = []
    with engine.begin() as conn:
        for condition, claim in taken:
            if conn.execute(update(alert_state).where(*_ours(claim)).values(fired_at=at)).rowcount:
                kept.append((condition, _Claim(claim.key, at, claim.before)))
            else:
                result.already.append(claim.key)
    return kept


def _take(engine: Engine, settings: Settings, condition: Condition,
          clock: Callable[[], datetime]) -> _Claim | None:
    try:
        with engine.begin() as conn:
            return _claim(conn, condition, clock(), lease(settings))
    except IntegrityError:
        return None  # another evaluator inserted the key meanwhile


def _fire(engine: Engine, settings: Settings, client: httpx.Client, group: Sequence[Condition],
          clock: Callable[[], datetime], result: Evaluation) -> None:
    """Claim the conditions of ``group`` and post those claimed as one message (:func:`digest`)."""
    assert settings.alert_webhook_url is not None
    taken: list[tuple[Condition, _Claim]] = []
    try:
        for condition in group:
            ensure_held()
            claim = _take(engine, settings, condition, clock)
            if claim is None:
                result.already.append(condition.key)
            else:
                taken.append((condition, claim))
        if taken and len(group) > 1:
            # Claimed or checked one by one, the first claims' leases ran while the rest of the
            # group was gone through (a new month ahead of many live ones, too): start them
            # again now, so the post has the whole lease, as a single alert's has.
            taken = _restamp(engine, taken, clock(), result)
    except BaseException:
        # The job's lease lost, the store gone: give back what this evaluation took, rather
        # than leave it to go out only once its lease has run out.
        _undo(engine, [claim for _, claim in taken])
        raise
    if not taken:
        return
    fmt = settings.alert_webhook_format
    message = taken[0][0] if len(taken) == 1 else digest([c for c, _ in taken], fmt)
    claims = [claim for _, claim in taken]
    # The claims are committed: no transaction (no lock, no pooled connection) is held while posting.
    try:
        send(client, settings.alert_webhook_url, payload(message, fmt),
             timeout_seconds=settings.alert_webhook_timeout_seconds)
    except Exception as exc:
        _undo(engine, claims)
        if not isinstance(exc, AlertNotSent):
            raise
        for claim in claims:
            log.warning("alert %s not sent: %s", claim.key, exc)
            result.failed[claim.key] = str(exc)
        return
    _mark_sent(engine, claims, clock())
    for claim in claims:
        log.info("alert %s sent", claim.key)
        result.fired.append(claim.key)


def _live(conn: Connection) -> dict[str, datetime]:
    """The alerts not cleared, each with its claim's time."""
    return {str(key): fired_at for key, fired_at in conn.execute(
        select(alert_state.c.key, alert_state.c.fired_at).where(alert_state.c.cleared_at.is_(None)))}


def _clear(engine: Engine, live: dict[str, datetime], active: set[str], now: datetime) -> list[str]:
    """Clear the alerts, live before the conditions were read, whose condition went away.

    Only a row still as it was read: one another evaluator claimed since (a condition that
    came true after this evaluation read them) is that evaluator's, and clearing it would post
    it again on the next tick.
    """
    gone = sorted(key for key in live if key not in active)
    cleared = []
    if gone:
        with engine.begin() as conn:
            for key in gone:
                if conn.execute(update(alert_state).where(
                        alert_state.c.key == key, alert_state.c.cleared_at.is_(None),
                        alert_state.c.fired_at == live[key]).values(cleared_at=now)).rowcount:
                    cleared.append(key)
    return cleared


def evaluate(engine: Engine, settings: Settings, now: datetime | None = None, *,
             client: httpx.Client | None = None) -> Evaluation:
    """One evaluation at ``now``: clear what went away, fire what is new (see the module doc)."""
    now = now or datetime.now(UTC)
    started = time.monotonic()

    def clock() -> datetime:  # ``now`` moved on by the time this evaluation has taken
        return now + timedelta(seconds=time.monotonic() - started)

    result = Evaluation(now=now, configured=bool(settings.alert_webhook_url))
    with engine.connect() as conn:
        live = _live(conn)  # first: an alert claimed after this read is not this evaluation's
        result.active = conditions(conn, settings, now)
    ensure_held()  # run as the scheduled job: write nothing once another replica took over
    result.cleared = _clear(engine, live, {c.key for c in result.active}, now)
    if not result.configured:
        return result
    own = client is None
    http = client or httpx.Client(timeout=settings.alert_webhook_timeout_seconds)
    together = [c for c in result.active if c.kind in DIGEST_KINDS]
    try:
        for condition in result.active:  # the others first, one message each
            if condition.kind not in DIGEST_KINDS:
                _fire(engine, settings, http, [condition], clock, result)
        if together:
            _fire(engine, settings, http, together, clock, result)
    finally:
        if own:
            http.close()
    return result


def _run(engine: Engine, settings: Settings) -> object:
    return evaluate(engine, settings)


# Runs only while a webhook URL is set; ALERT_INTERVAL_SECONDS 0 turns it off.
ALERTS_JOB = register(Job("alerts", _run,
                          lambda s: s.alert_interval_seconds if s.alert_webhook_url else 0))
