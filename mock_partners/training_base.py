"""A training base's side: results of a filed plan, pushed with the signing client.

Used by the demo and the end-to-end tests; a base could run the same code against the real
gateway (``python -m mock_partners.training_base URL APP_KEY SECRET BASE PLAN``).
"""

from __future__ import annotations

import random
import sys
from datetime import date, timedelta
from typing import Any

import httpx

from gateway.signing import SigningClient
from mock_partners import generators as gen

TRAINING_DAYS = 4  # each result's training runs from started_on to started_on + 3 days


def plan_period(year: int = 2026) -> tuple[date, date]:
    """The (starts_on, ends_on) of the plan the mock base files for ``year``.

    :func:`results` dates every result inside it, so a demo or test that files its plan with
    these dates sees no INTEGRITY_OUTSIDE_PLAN (R14, 青人社厅函〔2022〕394号 六(五) 培训时限).
    """
    return date(year, 3, 1), date(year, 12, 15)


def results(rng: random.Random, n: int, *, year: int = 2026, prefix: str = "TB",
            bad_every: int = 0) -> list[dict[str, Any]]:
    """``n`` trainees' results inside :func:`plan_period`.

    Every ``bad_every``-th has a corrupted id number.
    """
    starts_on, ends_on = plan_period(year)
    # Starts spread over the first 200 days (as before the period was named), ends in time.
    spread = min(200, (ends_on - starts_on).days - TRAINING_DAYS + 2)
    out = []
    for i in range(n):
        person = gen.make_person(rng)
        start = starts_on + timedelta(days=rng.randrange(spread))
        id_no = person.id_number
        if bad_every and i % bad_every == bad_every - 1:
            id_no = gen.corrupt_check_digit(id_no)
        out.append({
            "result_id": f"{prefix}-{year}-{i:05d}", "id_no": id_no, "name": person.name,
            "employer": person.employer, "region": person.region,
            "hours": str(rng.choice([16, 24, 32, 40])), "started_on": start.isoformat(),
            "completed_on": (start + timedelta(days=TRAINING_DAYS - 1)).isoformat(),
            "passed": rng.random() > 0.05,
            "certificate_no": f"JD{year}{i:06d}",
        })
    return out


def push(client: SigningClient, base_code: str, plan_id: str,
         rows: list[dict[str, Any]], per_request: int = 500) -> list[dict[str, Any]]:
    """POST the results in requests of ``per_request``; returns every per-record answer."""
    answers: list[dict[str, Any]] = []
    for start in range(0, len(rows), per_request):
        response = client.post("/v1/partners/training_base/records", json={
            "base_code": base_code, "plan_id": plan_id, "results": rows[start: start + per_request]})
        response.raise_for_status()
        answers.extend(response.json()["results"])
    return answers


def main(argv: list[str]) -> int:  # pragma: no cover - a manual tool
    url, app_key, secret, base_code, plan_id = argv[:5]
    with SigningClient(url, app_key, secret) as client:
        try:
            answers = push(client, base_code, plan_id, results(random.Random(1), 100))
        except httpx.HTTPStatusError as exc:
            print(exc.response.text, file=sys.stderr)
            return 1
    print({a["status"] for a in answers})
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
