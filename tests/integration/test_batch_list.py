"""GET /v1/batches: the batch list ops and partners page through (SPEC §5 lists).

Real uploads through the signed API on uvicorn; the list must agree with each batch's own
status, page newest first without skipping or repeating a batch (also when one is uploaded
between two pages), filter, and keep a partner to its own batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from mock_partners.files import FINANCE_HEADERS, finance_rows, write_csv
from tests.integration.test_batches_api import (
    YEAR,
    MakeSettings,
    NewOperator,
    NewPartner,
    assert_coded,
    finished,
    gateway,
    generated_health,
    signed,
    upload,
)


def _walk(client: httpx.Client, query: str, limit: int) -> list[dict[str, Any]]:
    """Every item ``next`` leads to, page by page."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(50):
        page = client.get("/v1/batches", params={**dict(
            p.split("=", 1) for p in query.split("&") if p), "limit": limit,
            **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["items"]) <= limit
        items += body["items"]
        cursor = body["next"]
        if cursor is None:
            return items
    raise AssertionError("paging never ends")


def test_the_batch_list_pages_filters_and_keeps_partners_to_their_own(
        db_url: str, engine: Engine, tmp_path: Path, make_settings: MakeSettings,
        new_partner: NewPartner, new_operator: NewOperator) -> None:
    health = new_partner(engine, adapter="health")
    finance = new_partner(engine, adapter="finance")
    token = new_operator(engine, "viewer")
    files = []
    for seed in range(3):
        path = tmp_path / f"health_{seed}.csv"
        generated_health(path, 70 + seed, 4, bad_ratio=0.0)
        files.append(path)
    fin = tmp_path / "finance.csv"
    write_csv(fin, finance_rows(75, 3, YEAR, 3), FINANCE_HEADERS)
    with gateway(make_settings(db_url, batch_dir=tmp_path / "b")) as url, \
            signed(url, health) as hc, signed(url, finance) as fc, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                         timeout=30) as ops:
        ids = [upload(hc, path, "health", period=f"{YEAR}-0{3 + i}")
               for i, path in enumerate(files)]
        fin_id = upload(fc, fin, "finance", period=f"{YEAR}-03")
        status = {b: finished(hc if b in ids else fc, b) for b in [*ids, fin_id]}

        everything = _walk(ops, "", limit=2)
        assert [i["batch_id"] for i in everything] == [fin_id, *reversed(ids)]  # newest first
        assert ops.get("/v1/batches").json()["total"] == 4
        for item in everything:  # what each batch's own status says
            own = status[item["batch_id"]]
            assert item["counts"] == own["counts"] and item["status"] == own["status"]
            assert (item["adapter"], item["kind"], item["period"]) == (
                own["adapter"], own["kind"], own["period"])

        assert [i["batch_id"] for i in _walk(ops, "adapter=health", 2)] == list(reversed(ids))
        assert [i["batch_id"] for i in _walk(ops, f"partner_id={finance.partner_id}", 5)] == [fin_id]
        assert [i["batch_id"] for i in _walk(ops, f"period={YEAR}-04", 5)] == [ids[1]]
        assert _walk(ops, "status=failed", 5) == []
        assert _walk(ops, "adapter=", 5) == everything  # an empty filter is "any"

        # A batch uploaded between two pages shifts nothing on the pages still to come.
        first = ops.get("/v1/batches", params={"limit": 2}).json()
        late_path = tmp_path / "late.csv"
        generated_health(late_path, 99, 2, bad_ratio=0.0)
        late = upload(hc, late_path, "health", period=f"{YEAR}-06")
        rest = ops.get("/v1/batches", params={"limit": 10, "cursor": first["next"]}).json()
        assert [i["batch_id"] for i in first["items"] + rest["items"]] == [fin_id, *reversed(ids)]
        finished(hc, late)

        # A partner sees its own batches only, and may not ask for another's.
        assert [i["batch_id"] for i in _walk(hc, "", 10)] == [late, *reversed(ids)]
        assert [i["batch_id"] for i in _walk(fc, "", 10)] == [fin_id]
        assert_coded(fc.get("/v1/batches", params={"partner_id": health.partner_id}),
                     403, "SCOPE_VIOLATION")

        # Refusals are coded, never a 500.
        for query in ({"status": "bogus"}, {"adapter": "canonical"}, {"kind": "weekly"},
                      {"since": "yesterday"}, {"limit": "0"}, {"limit": "501"},
                      {"cursor": "not-a-cursor"}, {"period": "2026-03-01x"}):
            assert_coded(ops.get("/v1/batches", params=query), 422, "SCHEMA")
        assert_coded(httpx.get(f"{url}/v1/batches"), 401, "UNAUTHENTICATED")


@pytest.mark.parametrize("forged", [
    ["batches", "2026-13-01T00:00:00+00:00", "B1"],  # no such day
    ["batches", "2026-03-01T00:00:00", "B1"],  # naive
    ["batches", 5, "B1"], ["batches", "2026-03-01T00:00:00+00:00", 7],
    ["deliveries", 5],  # another list's cursor
])
def test_a_forged_cursor_is_refused_coded(forged: list[Any]) -> None:
    from gateway.errors import PayloadRejected
    from gateway.ops.batches import list_batches
    from gateway.ops.common import encode_cursor

    with pytest.raises(PayloadRejected) as refused:
        list_batches(None, cursor=encode_cursor(forged[0], *forged[1:]))  # type: ignore[arg-type]
    assert refused.value.code == "SCHEMA" and refused.value.field == "cursor"
