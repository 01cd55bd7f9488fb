"""The partner families of ``make demo``: each drives its mock partner against the gateway.

Kept apart from :mod:`gateway.demo` (which starts and stops the processes) so each family is
a short function: canonical pushes, a training base, the health and finance batches with
their annual reconciliation, and the Cadre Network College pull.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import httpx

from gateway.signing import SigningClient
from mock_partners import files
from mock_partners import generators as gen
from mock_partners import training_base as tb

Tally = Counter[str]


def tally(results: list[dict[str, Any]], into: Tally, codes: Tally) -> None:
    for result in results:
        into[result["status"]] += 1
        if result["status"] == "rejected":
            codes.update(e["code"] for e in result["errors"])


def canonical_workload(rng: random.Random, n: int) -> list[tuple[str, dict[str, Any]]]:
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


def run_canonical(clients: dict[str, SigningClient], rng: random.Random, n: int,
                  answers: Tally, codes: Tally) -> None:
    work = canonical_workload(rng, n)
    for start in range(0, len(work), 40):
        chunk = work[start: start + 40]
        for who in ("base", "other"):
            subs = [s for w, s in chunk if w == who]
            if subs:
                response = clients[who].submit(subs)
                response.raise_for_status()
                tally(response.json()["results"], answers, codes)
    clients["base"].delete("/v1/records/DEMO-00000").raise_for_status()  # a withdrawal


def publish_reference(mock_url: str, year: int) -> None:
    """Put the demo base and its plan (filed in March) into the mock's reference API."""
    bases = [{"code": "QHJD-001", "name": "青海省高原生态继续教育基地", "level": "provincial",
              "status": "active", "assessed_on": f"{year - 1}-06-30"}]
    starts_on, ends_on = tb.plan_period(year)  # the period the mock base's results lie in
    plans = [{"plan_id": "PLAN-2026-001", "base_code": "QHJD-001", "title": "高原生态修复技术研修班",
              "category": "professional", "hours": "40", "starts_on": starts_on.isoformat(),
              "ends_on": ends_on.isoformat(), "filed_on": f"{year}-03-01"}]
    for kind, items in (("bases", bases), ("plans", plans)):
        httpx.post(f"{mock_url}/_mock/reference/{kind}", json={"items": items},
                   timeout=10).raise_for_status()


def run_training_base(client: SigningClient, rng: random.Random, answers: Tally, codes: Tally) -> None:
    rows = tb.results(rng, 120, prefix="QHJD", bad_every=15)
    tally(tb.push(client, "QHJD-001", "PLAN-2026-001", rows, per_request=50), answers, codes)
    tally(tb.push(client, "QHJD-001", "PLAN-2026-001", rows[:20]), answers, codes)  # a resend


def upload(client: SigningClient, path: Path, adapter: str, kind: str, period: str) -> str:
    response = client.upload_batch(path, adapter=adapter, kind=kind, period=period)
    response.raise_for_status()
    return str(response.json()["batch_id"])


def run_batches(clients: dict[str, SigningClient], workdir: Path, year: int) -> list[str]:
    """Monthly and annual batches of both departments, in every file format; their ids."""
    ids: list[str] = []
    families: tuple[tuple[Literal["health", "finance"], int], ...] = (("health", 31), ("finance", 32))
    for adapter, seed in families:
        data = files.year_dataset(seed, year, people=60, per_month=12, adapter=adapter)
        headers = files.HEALTH_HEADERS if adapter == "health" else files.FINANCE_HEADERS
        for month, rows in enumerate(data.monthly, start=1):
            if not rows or month > 10:
                continue  # never pushed (the dataset leaves some out) or not due yet
            path = workdir / f"{adapter}_{year}-{month:02d}"
            if month % 3 == 0:
                files.write_xlsx(path.with_suffix(".xlsx"), rows, headers)
                path = path.with_suffix(".xlsx")
            else:
                if month % 3 == 1:
                    files.write_csv(path.with_suffix(".csv"), rows, headers, encoding="gb18030")
                else:
                    files.write_csv(path.with_suffix(".csv"), rows, headers, encoding="utf-8-sig")
                path = path.with_suffix(".csv")
            ids.append(upload(clients[adapter], path, adapter, "monthly", f"{year}-{month:02d}"))
        annual = workdir / f"{adapter}_{year}_annual.csv"
        files.write_csv(annual, data.annual, headers, encoding="gb18030")
        ids.append(upload(clients[adapter], annual, adapter, "annual", str(year)))
    return ids


def batch_totals(operator: httpx.Client, batch_ids: list[str]) -> tuple[bool, Counter[str]]:
    totals: Counter[str] = Counter()
    done = True
    for batch_id in batch_ids:
        status = operator.get(f"/v1/batches/{batch_id}", params={"limit": 1}).json()
        done = done and status["status"] in ("done", "failed")
        totals.update({k: v for k, v in status["counts"].items() if k != "rows"})
    return done, totals
