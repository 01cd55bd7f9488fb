"""``make demo``: the whole job end to end on the embedded SQLite store.

Starts the mock management system with faults on and a gateway (real processes, real HTTP on
127.0.0.1), registers partners with the CLI, sends a few hundred signed records with bad ones,
resends, corrections, a withdrawal, a cross-source duplicate and a conflict mixed in, waits until
delivery settles, prints a summary, checks the invariants and stops everything it started.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, func, select

from gateway import demo_families as fam
from gateway.signing import SigningClient
from gateway.store.db import make_engine
from gateway.store.tables import outbox, records

SETTLE_TIMEOUT_SECONDS = 180
# The CE year the demo's data is dated in; past its close the demo extends it (a real setting,
# YEAR_CLOSE_EXTENSIONS) rather than show every record rejected as YEAR_CLOSED.
DEMO_YEAR = 2026


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", *args], env=env, check=True,
                         capture_output=True, text=True, timeout=120)
    return dict(json.loads(out.stdout))


def _spawn(stack: ExitStack, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    handle = stack.enter_context(log.open("wb"))
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args], env=env,
                            stdout=handle, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    return proc


def run_demo(console: Console, n_records: int = 300, keep: bool = False) -> int:
    workdir = (Path("var") / f"demo-{int(time.time())}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'gateway.sqlite3'}"
    mock_port, college_port, gw_port, sink_port = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "CE_GATEWAY_DATABASE_URL": db_url,
           "CE_GATEWAY_DOWNSTREAM_URL": f"http://127.0.0.1:{mock_port}",
           "CE_GATEWAY_CADRE_COLLEGE_URL": f"http://127.0.0.1:{college_port}",
           "CE_GATEWAY_PULL_INTERVAL_SECONDS": "3", "CE_GATEWAY_BATCH_DIR": str(workdir / "batches"),
           "CE_GATEWAY_RETRY_SCHEDULE": "1,2,3,5,8", "CE_GATEWAY_DELIVERY_BATCH_SIZE": "100",
           "CE_GATEWAY_DELIVERY_LEASE_SECONDS": "20", "CE_GATEWAY_CIRCUIT_RESET_SECONDS": "2",
           "CE_GATEWAY_INLINE_RETRY_MAX_WAIT_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(20261125)
    year = DEMO_YEAR
    today = datetime.now(ZoneInfo("Asia/Shanghai")).date()
    if today > date(year, 12, 30):  # the demo's data outlived its year: keep it open
        env["CE_GATEWAY_YEAR_CLOSE_EXTENSIONS"] = f"{year}={today.year + 1}-12-30"
    mock_url, gw_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{gw_port}"
    answers: Counter[str] = Counter()
    rejected_codes: Counter[str] = Counter()
    with ExitStack() as stack:
        console.rule("CE Gateway demo")
        console.print(f"work dir {workdir}\nmock management system :{mock_port} (10% 503s, every "
                      f"7th request 429, 5% lost replies); mock Cadre Network College "
                      f":{college_port}; gateway :{gw_port}")
        _spawn(stack, env, workdir / "mock.log", "mock", "ce-system", "--port", str(mock_port),
               "--error-rate", "0.1", "--rate-limit-every", "7", "--lost-reply-rate", "0.05",
               "--latency-ms", "5", "--seed", "7")
        _spawn(stack, env, workdir / "college.log", "mock", "cadre-college", "--port",
               str(college_port), "--initial", "150", "--seed", "3")
        wait_until(lambda: httpx.get(f"{mock_url}/healthz").status_code == 200, 30, "the mock")
        sink_url = f"http://127.0.0.1:{sink_port}"
        _spawn(stack, env, workdir / "webhook.log", "mock", "webhook-sink", "--port", str(sink_port))
        wait_until(lambda: httpx.get(f"{sink_url}/healthz").status_code == 200, 30, "the webhook sink")
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{college_port}/healthz").status_code == 200,
                   30, "the mock college")
        keys = {name: _cli(env, "partner", "add", "--id", pid, "--adapter", adapter, *extra, "--json")
                for name, pid, adapter, extra in (
                    ("base", "qh-canonical-demo", "canonical", ()),
                    ("other", "qh-other-demo", "canonical", ()),
                    ("training_base", "qh-base-001", "training_base", ("--base-code", "QHJD-001")),
                    ("health", "qh-health-commission", "health", ()),
                    ("finance", "qh-finance-dept", "finance", ()))}
        token = _cli(env, "operator", "add", "--name", "demo-ops", "--role", "operator", "--json")["token"]
        # Reference data as the management system publishes it: the base and its filed plan
        # (R9), synced the way the scheduled job does it.
        fam.publish_reference(mock_url, year)
        synced = _cli(env, "reference", "sync", "--json")
        console.print(f"reference data synced from the management system: version {synced['version']}")
        _spawn(stack, env, workdir / "gateway.log", "serve", "--port", str(gw_port))
        wait_until(lambda: httpx.get(f"{gw_url}/readyz").status_code == 200, 60, "the gateway")
        clients = {name: stack.enter_context(SigningClient(gw_url, k["app_key"], k["secret"]))
                   for name, k in keys.items()}
        ops = stack.enter_context(httpx.Client(base_url=gw_url, timeout=60,
                                               headers={"Authorization": f"Bearer {token}"}))

        fam.run_canonical(clients, rng, n_records, answers, rejected_codes)
        console.print(f"canonical: {n_records} records plus resends, corrections, a conflict, "
                      "a withdrawal")
        fam.run_training_base(clients["training_base"], rng, answers, rejected_codes)
        console.print("training base QHJD-001: 120 results pushed, 20 resent")
        batch_ids = fam.run_batches(clients, workdir, year)
        console.print(f"health and finance: {len(batch_ids)} monthly/annual batches uploaded "
                      "(GB18030 and UTF-8 CSV, XLSX)")
        wait_until(lambda: fam.batch_totals(ops, batch_ids)[0], SETTLE_TIMEOUT_SECONDS, "batches")
        _, batch_counts = fam.batch_totals(ops, batch_ids)
        engine = make_engine(db_url)
        stack.callback(engine.dispose)

        def settled() -> bool:
            with engine.connect() as conn:
                pending = conn.execute(select(func.count()).select_from(outbox)
                                       .where(outbox.c.status == "pending")).scalar_one()
                pulled = conn.execute(select(func.count()).select_from(records)
                                      .where(records.c.adapter == "cadre_college")).scalar_one()
            return pending == 0 and pulled >= 150

        with console.status("waiting for the college pull and deliveries to settle (faults are on)…"):
            wait_until(settled, SETTLE_TIMEOUT_SECONDS, "deliveries to settle", interval=0.5)
        _ops_tour(console, ops, {**env, "CE_GATEWAY_ALERT_WEBHOOK_URL": f"{sink_url}/robot"},
                  sink_url, gw_url)
        problems = _summarise(console, engine, ops, mock_url, env, answers, rejected_codes,
                              batch_counts, year)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0


def _ops_tour(console: Console, ops: httpx.Client, env: dict[str, str], sink_url: str,
              gw_url: str) -> None:
    """What the ops team sees once the run settles.

    Dead letters, a dry-run reprocess, a conflict resolved, the metrics, and the alerts a robot
    webhook received.
    """
    console.rule("Ops 运维")
    dead = ops.get("/v1/deliveries", params={"status": "dead", "limit": 5}).json()
    dry = ops.post("/v1/deliveries/reprocess", json={
        "status": "dead", "dry_run": True, "reason": "demo: how many would go again"}).json()
    console.print(f"dead deliveries: {dead['total']} (e.g. "
                  f"{', '.join(sorted({d['error_code'] or '?' for d in dead['items']})) or 'none'}); "
                  f"a dry-run reprocess would requeue {dry['matched']}")
    conflicts = ops.get("/v1/conflicts").json()
    if conflicts["items"]:
        first = conflicts["items"][0]
        resolved = ops.post(f"/v1/conflicts/{first['record_id']}/resolve", json={
            "keep": "existing", "reason": "demo: the first report stands"})
        console.print(f"conflicts held for ops: {conflicts['total']}; resolved one keeping the "
                      f"existing record → HTTP {resolved.status_code}")
    wanted = ("ce_gateway_backlog_records", "ce_gateway_dead_letters", "ce_gateway_circuit_state")
    metrics = [line for line in httpx.get(f"{gw_url}/metrics", timeout=30).text.splitlines()
               if line.startswith(wanted)]
    console.print("metrics: " + "; ".join(metrics))
    alerts = subprocess.run([sys.executable, "-m", "gateway.cli", "alerts", "check", "--json"],
                            env=env, capture_output=True, text=True, timeout=120)
    received = httpx.get(f"{sink_url}/_mock/received", timeout=30).json()["messages"]
    console.print(f"alerts check (exit {alerts.returncode}): the robot webhook received "
                  f"{len(received)} message(s)")
    for message in received[:4]:
        body = message.get("body", message)
        text = str(body.get("markdown", body.get("text", {})).get("content", body))
        console.print("  • " + text.splitlines()[0][:100])
    console.print("web console (zh-CN): start a gateway (`ce-gateway serve`) and open its /ops — "
                  "log in with an operator token (this run's gateway has stopped)")


def _summarise(console: Console, engine: Engine, ops: httpx.Client, mock_url: str,
               env: dict[str, str], answers: Counter[str], rejected_codes: Counter[str],
               batch_counts: Counter[str], year: int) -> list[str]:
    with engine.connect() as conn:
        by_status: dict[str, int] = dict(conn.execute(select(outbox.c.status, func.count())
                                                      .group_by(outbox.c.status)).all())
        retried = conn.execute(select(func.count()).select_from(outbox)
                               .where(outbox.c.attempts > 1)).scalar_one()
        dead_codes = Counter(r[0] for r in conn.execute(
            select(outbox.c.error_code).where(outbox.c.status == "dead")))
        by_family: dict[str, int] = dict(conn.execute(select(records.c.adapter, func.count())
                                      .group_by(records.c.adapter)).all())
    mock = httpx.get(f"{mock_url}/_mock/applied", timeout=30).json()
    verify = _cli(env, "audit", "verify", "--json")

    table = Table(title="Summary 汇总", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    for status in ("accepted", "corrected", "duplicate", "conflict", "rejected"):
        table.add_row(f"pushed records answered {status}", str(answers[status]))
    for code, count in sorted(rejected_codes.items()):
        table.add_row(f"  rejected {code}", str(count))
    for status in ("accepted", "corrected", "duplicate", "conflict", "rejected"):
        table.add_row(f"batch rows {status}", str(batch_counts[status]))
    for adapter, count in sorted(by_family.items()):
        table.add_row(f"records stored from {adapter}", str(count))
    table.add_row("delivered (versions)", str(by_status.get("delivered", 0)))
    table.add_row("delivered after a retry", str(retried))
    table.add_row("dead-lettered", str(by_status.get("dead", 0)))
    for code, count in sorted(dead_codes.items()):
        table.add_row(f"  dead {code}", str(count))
    table.add_row("mock: requests / applied", f"{mock['requests']['total']} / {len(mock['applied'])}")
    table.add_row("mock: answers by status", json.dumps(mock["requests"]["by_status"]))
    table.add_row("mock: applied twice / out of order",
                  f"{len(mock['double_applied'])} / {len(mock['out_of_order'])}")
    table.add_row("audit chain", f"{'intact' if verify['ok'] else 'BROKEN'} ({verify['checked']} events)")
    console.print(table)

    recon = ops.get(f"/v1/reconciliation/health/{year}").json()
    rtable = Table(title=f"Health {year}: annual vs monthly 年度与月度对账")
    for column in ("month", "monthly", "repeated", "corrected", "lacking", "added", "conflicts"):
        rtable.add_column(column, justify="right")
    for m in recon["months"]:
        rtable.add_row(m["month"], *(str(m[c]) for c in ("monthly_records", "repeated", "corrected",
                                                          "lacking", "added", "conflicts")))
    t = recon["totals"]
    rtable.add_row("total", *(str(t[c]) for c in ("monthly_records", "repeated", "corrected",
                                                   "lacking", "added", "conflicts")))
    console.print(rtable)
    console.print(f"months never pushed: {', '.join(recon['months_never_pushed']) or 'none'}")

    problems: list[str] = []
    if mock["double_applied"] or mock["out_of_order"]:
        problems.append("the mock saw a double apply or an out-of-order version")
    if len(mock["applied"]) != by_status.get("delivered", 0):
        problems.append("delivered versions and versions applied downstream differ")
    if not verify["ok"]:
        problems.append("audit chain broken")
    if set(by_family) != {"canonical", "training_base", "health", "finance", "cadre_college"}:
        problems.append(f"not every partner family arrived: {sorted(by_family)}")
    for problem in problems:
        console.print(f"[red]FAILED: {problem}[/red]")
    if not problems:
        console.print("[green]demo finished: all four partner families delivered, every accepted "
                      "version once and in order[/green]")
    return problems
