"""``make bench``: figures beside a baseline measured in the same run; RESULTS.md updated.

- ``a`` (issue 6) canonical ingest over HTTP: signed 1,000-record ``POST /v1/records`` at
  concurrency 8 against ``ce-gateway serve --no-worker``, beside a floor server that only
  parses the JSON and bulk-inserts it (:mod:`benchmarks.floor`); target ≤ 3× the floor's time.
- ``b`` (issue 6) delivery at zero faults: one ``ce-gateway worker`` draining a backlog to the
  mock management system, beside the mock's own capacity from a bare client.
- ``c`` (issue 6) two worker processes against one on PostgreSQL: the scaling ratio.
- ``batch`` (issue 3) a health annual CSV through the batch path on SQLite, beside the same file
  parsed and bulk-inserted raw; targets ≤ 3× baseline, ≥ 20,000 rows/s, peak RSS < 300 MB.

``a`` and ``b`` run on SQLite, and on PostgreSQL too when ``BENCH_POSTGRES_URL`` or
``CE_GATEWAY_TEST_POSTGRES_URL`` names a server (each run gets a fresh schema, dropped after);
``c`` needs PostgreSQL and says so when it has none.  Sizes come from the environment:

=========================  ========  ==============================================
``BENCH_ONLY``             all       comma-separated subset of ``a,b,c,batch``
``BENCH_RECORDS``          40000     (a) records sent to each server
``BENCH_CONCURRENCY``      8         (a) requests in flight
``BENCH_DELIVERY_RECORDS`` 20000     (b) backlog drained per backend
``BENCH_SCALE_RECORDS``    20000     (c) backlog drained by 1, then 2 workers
``BENCH_ROWS``             200000    (batch) rows of the CSV (issue 3 quoted 1,000,000)
``BENCH_WRITE``            1         0: print only, leave RESULTS.md alone (smoke runs)
=========================  ========  ==============================================

The batch file is generated once (seeded) and kept under ``var/bench/``, with the servers' logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks import procs, report
from mock_partners import files

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "var" / "bench"
TARGET_RATIO, TARGET_RATE, TARGET_RSS = 3.0, 20_000, 300
PARTS = ("a", "b", "c", "batch")
DEFAULTS = {"BENCH_RECORDS": 40_000, "BENCH_CONCURRENCY": 8, "BENCH_DELIVERY_RECORDS": 20_000,
            "BENCH_SCALE_RECORDS": 20_000, "BENCH_ROWS": 200_000}
PER_REQUEST = 1000
RUN_LOAD = ["load average unknown"]  # how busy the machine was before the run started
console = Console(width=None if sys.stdout.isatty() else 140)


def _size(name: str) -> int:
    return int(os.environ.get(name, DEFAULTS[name]))


def _backends() -> list[str]:
    return ["sqlite", "postgres"] if procs.postgres_base() else ["sqlite"]


def _head(title: str, sizes: str) -> list[str]:
    if os.environ.get("BENCH_ONLY"):
        sizes = f"BENCH_ONLY={os.environ['BENCH_ONLY']}, {sizes}"
    return [f"### {title} — {report.stamp()}", "",
            f"Command: `make bench` ({sizes}; stores: {', '.join(_backends())}); "
            f"machine: {report.machine()}; "
            f"{RUN_LOAD[0]} when the run began, {report.load()} when this part began.", ""]


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


# -- (a) canonical ingest -----------------------------------------------------------------------
def part_a() -> list[str]:
    from benchmarks import api_ingest

    count, concurrency = _size("BENCH_RECORDS"), _size("BENCH_CONCURRENCY")
    lines = _head("Canonical ingest over HTTP, gateway against a floor server",
                  f"BENCH_RECORDS={count}, BENCH_CONCURRENCY={concurrency}")
    lines += ["| store | server | records | requests | wall s | records/s | p50 s | p99 s | "
              "server CPU µs/record | peak RSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table = Table(title=f"(a) canonical ingest: {count:,} records, {PER_REQUEST:,}-record signed "
                        f"batches, concurrency {concurrency}")
    for column in ("store", "server", "records", "wall s", "records/s", "p50 s", "p99 s",
                   "CPU µs/rec", "peak RSS MB"):
        table.add_column(column, justify="right")
    ratios = []
    for backend in _backends():
        with console.status(f"(a) floor, then gateway, on {backend}"):
            r = api_ingest.run(backend, WORK, count, PER_REQUEST, concurrency)
        for name, run in (("floor: parse + bulk insert", r["floor"]),
                          ("gateway: serve --no-worker", r["gateway"])):
            cells = [f"{run.records:,}", f"{run.seconds:.2f}", f"{run.rate:,.0f}",
                     f"{run.pct(50):.2f}", f"{run.pct(99):.2f}", f"{run.cpu_us:.0f}",
                     f"{run.peak_rss_mb:.0f}"]
            table.add_row(backend, name, *cells)
            lines.append(f"| {backend} | {name} | {cells[0]} | {run.requests} | "
                         + " | ".join(cells[1:]) + " |")
        ratios.append((backend, r["ratio"], r["cpu_ratio"]))
    console.print(table)
    lines.append("")
    for backend, ratio, cpu_ratio in ratios:
        verdict = f"target ≤ {TARGET_RATIO:g}× the floor: {_met(ratio <= TARGET_RATIO)}"
        console.print(f"  {backend}: gateway / floor time [bold]{ratio:.2f}×[/] — {verdict} "
                      f"(server CPU {cpu_ratio:.1f}×)")
        lines.append(f"Ratio (gateway / floor time) on {backend}: **{ratio:.2f}×**; {verdict} "
                     f"(server CPU per record: {cpu_ratio:.1f}×).")
    return lines + [""]


# -- (b) delivery ---------------------------------------------------------------------------------
def part_b() -> list[str]:
    from benchmarks import delivery

    count = _size("BENCH_DELIVERY_RECORDS")
    lines = _head("Delivery to the mock management system at zero faults",
                  f"BENCH_DELIVERY_RECORDS={count}")
    lines += ["| store | run | records | requests | wall s | records/s | peak RSS MB |",
              "|---|---|---:|---:|---:|---:|---:|"]
    table = Table(title=f"(b) delivery of {count:,} records, {delivery.batch_size()} a request")
    for column in ("store", "run", "records", "requests", "wall s", "records/s", "peak RSS MB"):
        table.add_column(column, justify="right")
    ratios = []
    for backend in _backends():
        with console.status(f"(b) filling the outbox, then draining it, on {backend}"):
            r = delivery.run_delivery(backend, WORK, count)
        cap, worker = r["capacity"], r["worker"]
        rows = (("mock capacity: bare client, 1 at a time", cap.records, cap.requests,
                 cap.seconds, cap.rate, r["mock_rss_mb"]),
                ("gateway: 1 `ce-gateway worker`", worker.records, worker.requests,
                 worker.seconds, worker.rate, worker.peak_rss_mb))
        for name, n, requests, seconds, rate, rss in rows:
            cells = [f"{n:,}", f"{requests}", f"{seconds:.2f}", f"{rate:,.0f}", f"{rss:.0f}"]
            table.add_row(backend, name, *cells)
            lines.append(f"| {backend} | {name} | " + " | ".join(cells) + " |")
        ratios.append((backend, r["ratio"]))
    console.print(table)
    lines.append("")
    for backend, ratio in ratios:
        console.print(f"  {backend}: worker / mock capacity [bold]{ratio:.2f}×[/] "
                      f"(the worker reaches {ratio:.0%} of what the mock can take)")
        lines.append(f"Ratio (worker records/s / mock capacity) on {backend}: **{ratio:.2f}×**.")
    return lines + [""]


# -- (c) scaling ----------------------------------------------------------------------------------
def part_c() -> list[str]:
    from benchmarks import delivery

    count = _size("BENCH_SCALE_RECORDS")
    lines = _head("Delivery workers on PostgreSQL, two against one",
                  f"BENCH_SCALE_RECORDS={count}")
    if procs.postgres_base() is None:
        reason = ("skipped: no PostgreSQL (set BENCH_POSTGRES_URL or "
                  "CE_GATEWAY_TEST_POSTGRES_URL, e.g. postgresql://postgres@127.0.0.1/test)")
        console.print(f"(c) 2 workers vs 1 {reason}")
        return lines + [f"(c) {reason}.", ""]
    with console.status("(c) filling the outbox, then draining it with 1 and with 2 workers"):
        r = delivery.run_scaling(WORK, count)
    table = Table(title=f"(c) {count:,} records on PostgreSQL, 1 worker vs 2")
    for column in ("run", "records", "requests", "wall s", "records/s", "peak RSS MB"):
        table.add_column(column, justify="right")
    lines += ["| run | records | requests | wall s | records/s | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|"]
    rows: list[tuple[str, Any, float]] = [
        (f"mock capacity: bare client, {n} at a time", cap, 0.0) for n, cap in r["capacity"].items()]
    rows += [("1 `ce-gateway worker`", r["one"], r["one"].peak_rss_mb),
             ("2 `ce-gateway worker`s", r["two"], r["two"].peak_rss_mb)]
    for name, run, rss in rows:
        cells = [f"{run.records:,}", f"{run.requests}", f"{run.seconds:.2f}", f"{run.rate:,.0f}",
                 f"{rss:.0f}" if rss else "—"]
        table.add_row(name, *cells)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    console.print(table)
    scaling = r["scaling"]
    console.print(f"  scaling: 2 workers drain [bold]{scaling:.2f}×[/] as fast as 1 (ideal 2×)")
    return lines + ["", f"Scaling (1-worker time / 2-worker time): **{scaling:.2f}×** (ideal 2×).",
                    ""]


# -- batch (issue 3) ---------------------------------------------------------------------------
def _measure_batch(mode: str, path: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.batch_ingest", mode, str(path), str(WORK)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def part_batch() -> list[str]:
    rows = _size("BENCH_ROWS")
    path = WORK / f"health_annual_{rows}.csv"
    if not path.exists():
        with console.status(f"generating {rows:,} health rows (seeded) → {path}"):
            files.write_csv(path.with_suffix(".part"), files.health_rows(2026, rows, 2026),
                            files.HEALTH_HEADERS, encoding="utf-8")
            path.with_suffix(".part").rename(path)
    lines = _head("Batch ingest", f"BENCH_ROWS={rows}")
    with console.status("batch baseline: csv parse + SQLite bulk insert"):
        base = _measure_batch("baseline", path)
    with console.status("batch: gateway batch ingest end to end"):
        gw = _measure_batch("gateway", path)
    for store in ("baseline", "gateway"):  # the stores are only for measuring: gigabytes at 1 M rows
        for suffix in ("", "-wal", "-shm"):
            (WORK / f"{store}.sqlite3{suffix}").unlink(missing_ok=True)
    ratio = gw["seconds"] / base["seconds"]
    checks = {
        f"time ≤ {TARGET_RATIO:g}× baseline": ratio <= TARGET_RATIO,
        f"≥ {TARGET_RATE:,} rows/s": gw["rows_per_s"] >= TARGET_RATE,
        f"peak RSS < {TARGET_RSS} MB": gw["peak_rss_mb"] < TARGET_RSS,
    }
    table = Table(title=f"Batch ingest, {rows:,}-row health annual CSV, SQLite")
    for column in ("run", "rows", "wall s", "rows/s", "peak RSS MB"):
        table.add_column(column, justify="right")
    lines += ["| run | rows | wall s | rows/s | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for name, r in (("baseline: csv parse + SQLite bulk insert", base),
                    ("gateway: batch ingest end to end", gw)):
        cells = [f"{int(r['rows']):,}", f"{r['seconds']:.1f}", f"{r['rows_per_s']:,.0f}",
                 f"{r['peak_rss_mb']:.0f}"]
        table.add_row(name, *cells)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    console.print(table)
    console.print(f"ratio gateway/baseline time: {ratio:.2f}×")
    cpu = (f"CPU s: writer {gw['writer_cpu_s']:.1f}, parse workers {gw['workers_cpu_s']:.1f} "
           f"(wall {gw['seconds']:.1f} on {os.cpu_count()} cores)")
    console.print(cpu)
    for label, ok in checks.items():
        console.print(f"  {'[green]met' if ok else '[red]MISSED'}[/] {label}")
    return lines + ["", f"{cpu}.", "", f"Ratio (gateway / baseline time): **{ratio:.2f}×**. "
                    + "; ".join(f"{label}: {_met(ok)}" for label, ok in checks.items()) + ".", ""]


def main() -> int:
    only = [p.strip() for p in os.environ.get("BENCH_ONLY", ",".join(PARTS)).split(",") if p.strip()]
    unknown = sorted(set(only) - set(PARTS))
    if unknown:
        console.print(f"[red]BENCH_ONLY: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
        return 2
    WORK.mkdir(parents=True, exist_ok=True)
    RUN_LOAD[0] = report.load()
    console.print(f"machine: {report.machine()}; {RUN_LOAD[0]}; stores: {', '.join(_backends())}")
    runners = {"a": part_a, "b": part_b, "c": part_c, "batch": part_batch}
    sections = []
    for part in PARTS:
        if part in only:
            sections.append(runners[part]())
    if os.environ.get("BENCH_WRITE", "1") != "0":
        report.record(sections)
        console.print(f"figures written to {report.RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"bench finished in {time.perf_counter() - started:.0f} s")
    raise SystemExit(code)
