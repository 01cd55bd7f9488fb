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
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select

from gateway.signing import SigningClient
from gateway.store.db import make_engine
from gateway.store.tables import outbox
from mock_partners import generators as gen

SETTLE_TIMEOUT_SECONDS = 180


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


def build_workload(rng: random.Random, n: int) -> list[tuple[str, dict[str, Any]]]:
    """(partner, submission) pairs: mostly good, with every kind of trouble mixed in."""
    work: list[tuple[str, dict[str, Any]]] = []
    people = [gen.make_person(rng) for _ in range(max(10, n // 3))]
    for i in range(n):
        sub = gen.canonical_submission(rng, f"DEMO-{i:05d}", rng.choice(people))
        kind = i % 20
        if kind == 3:
            sub["person"]["id_number"] = gen.corrupt_check_digit(sub["person"]["id_number"])
        elif kind == 7:
            sub["person"]["region_code"] = "990000"
        elif kind == 11:
            sub["activity"]["completd_on"] = sub["activity"].pop("completed_on")  # a typo
        elif kind == 13:
            sub["activity"]["title"] += " [REJECT]"  # the management system will refuse it
        work.append(("base", sub))
    goods = [s for _, s in work if "completed_on" in s["activity"] and s["person"]["region_code"] != "990000"]
    for sub in goods[: n // 10]:
        work.append(("base", json.loads(json.dumps(sub))))  # plain resends
    for sub in goods[n // 10: n // 10 + n // 20]:
        fixed = json.loads(json.dumps(sub))
        fixed["claimed"]["quantity"] = str(int(fixed["claimed"]["quantity"]) + 4)
        work.append(("base", fixed))  # corrections
    for j, sub in enumerate(goods[n // 5: n // 5 + 6]):
        other = json.loads(json.dumps(sub))
        other["source_record_id"] = f"OTHER-{j:03d}"
        if j % 2:
            other["claimed"]["quantity"] = str(int(other["claimed"]["quantity"]) + 8)  # conflict
        work.append(("other", other))  # the same activity reported by a second partner
    rng.shuffle(work)
    return work


def run_demo(console: Console, n_records: int = 300, keep: bool = False) -> int:
    workdir = Path("var") / f"demo-{int(time.time())}"
    workdir.mkdir(parents=True, exist_ok=True)
    db_url = f"sqlite:///{workdir / 'gateway.sqlite3'}"
    mock_port, gw_port = free_port(), free_port()
    env = {**os.environ, "CE_GATEWAY_DATABASE_URL": db_url,
           "CE_GATEWAY_DOWNSTREAM_URL": f"http://127.0.0.1:{mock_port}",
           "CE_GATEWAY_RETRY_SCHEDULE": "1,2,3,5,8", "CE_GATEWAY_DELIVERY_BATCH_SIZE": "50",
           "CE_GATEWAY_DELIVERY_LEASE_SECONDS": "20", "CE_GATEWAY_CIRCUIT_RESET_SECONDS": "2",
           "CE_GATEWAY_INLINE_RETRY_MAX_WAIT_SECONDS": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(20261125)
    mock_url, gw_url = f"http://127.0.0.1:{mock_port}", f"http://127.0.0.1:{gw_port}"
    with ExitStack() as stack:
        console.rule("CE Gateway demo")
        console.print(f"work dir {workdir}; mock management system on :{mock_port} "
                      "(10% 503s, every 7th request 429, 5% lost replies); gateway on "
                      f":{gw_port}")
        _spawn(stack, env, workdir / "mock.log", "mock", "ce-system", "--port", str(mock_port),
               "--error-rate", "0.1", "--rate-limit-every", "7", "--lost-reply-rate", "0.05",
               "--latency-ms", "5", "--seed", "7")
        wait_until(lambda: httpx.get(f"{mock_url}/healthz").status_code == 200, 30, "the mock")
        base = _cli(env, "partner", "add", "--id", "qh-base-demo", "--adapter", "canonical", "--json")
        other = _cli(env, "partner", "add", "--id", "qh-other-demo", "--adapter", "canonical", "--json")
        _spawn(stack, env, workdir / "gateway.log", "serve", "--port", str(gw_port))
        wait_until(lambda: httpx.get(f"{gw_url}/readyz").status_code == 200, 60, "the gateway")

        work = build_workload(rng, n_records)
        answers: Counter[str] = Counter()
        rejected_codes: Counter[str] = Counter()
        clients = {name: stack.enter_context(SigningClient(gw_url, p["app_key"], p["secret"]))
                   for name, p in (("base", base), ("other", other))}
        sent_ids: dict[str, str] = {}
        for start in range(0, len(work), 40):
            chunk = work[start: start + 40]
            for who in ("base", "other"):
                subs = [s for w, s in chunk if w == who]
                if not subs:
                    continue
                response = clients[who].submit(subs)
                response.raise_for_status()
                for result in response.json()["results"]:
                    answers[result["status"]] += 1
                    rejected_codes.update(e["code"] for e in result["errors"]
                                          if result["status"] == "rejected")
                    if result["record_id"]:
                        sent_ids[result["source_record_id"]] = result["record_id"]
        withdrawn = clients["base"].delete("/v1/records/DEMO-00000")
        console.print(f"sent {len(work)} submissions; withdrawal of DEMO-00000 → "
                      f"{withdrawn.status_code}")

        engine = make_engine(db_url)
        stack.callback(engine.dispose)

        def settled() -> bool:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(outbox)
                                    .where(outbox.c.status == "pending")).scalar_one() == 0

        with console.status("waiting for deliveries to settle (faults are on)…"):
            wait_until(settled, SETTLE_TIMEOUT_SECONDS, "deliveries to settle", interval=0.5)
        with engine.connect() as conn:
            by_status: dict[str, int] = dict(conn.execute(select(outbox.c.status, func.count())
                                          .group_by(outbox.c.status)).all())
            retried = conn.execute(select(func.count()).select_from(outbox)
                                   .where(outbox.c.attempts > 1)).scalar_one()
            dead_codes = Counter(r[0] for r in conn.execute(
                select(outbox.c.error_code).where(outbox.c.status == "dead")))
        mock = httpx.get(f"{mock_url}/_mock/applied").json()
        verify = _cli(env, "audit", "verify", "--json")

        table = Table(title="Summary 汇总", show_header=True)
        table.add_column("what")
        table.add_column("count", justify="right")
        for status in ("accepted", "corrected", "duplicate", "conflict", "rejected"):
            table.add_row(f"answered {status}", str(answers[status]))
        for code, count in sorted(rejected_codes.items()):
            table.add_row(f"  rejected {code}", str(count))
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
        problems: list[str] = []
        if mock["double_applied"] or mock["out_of_order"]:
            problems.append("the mock saw a double apply or an out-of-order version")
        if len(mock["applied"]) != by_status.get("delivered", 0):
            problems.append("delivered versions and versions applied downstream differ")
        if not verify["ok"]:
            problems.append("audit chain broken")
        for problem in problems:
            console.print(f"[red]FAILED: {problem}[/red]")
        if not problems:
            console.print("[green]demo finished: every accepted version delivered once, in order[/green]")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if problems else 0
