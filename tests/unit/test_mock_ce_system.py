"""Unit tests for the mock CE management system (mock_partners/ce_system.py), in-process."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from mock_partners import ce_system
from mock_partners.ce_system import MAX_BATCH, PAGE_SIZE, Faults, create_app

pytestmark = pytest.mark.anyio

BATCH = "/api/v1/ce-records/batch"
RECEIPT_NO = re.compile(r"^CE\d{4}-\d{8}$")

Post = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def faults() -> Faults:
    return Faults(seed=7)


@pytest.fixture
async def client(faults: Faults) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(faults))
    async with httpx.AsyncClient(transport=transport, base_url="http://ce-system") as c:
        yield c


def rec(
    record_id: str = "R1",
    version: int = 1,
    *,
    title: str = "高原生态修复技术研修班",
    id_number: str = "630102198704139126",
    withdrawn: bool = False,
) -> dict[str, Any]:
    return {
        "record_id": record_id,
        "version": version,
        "withdrawn": withdrawn,
        "year": 2026,
        "person": {"id_number": id_number, "name": "赵伟"},
        "activity": {"title": title},
    }


async def send(
    client: httpx.AsyncClient, records: list[dict[str, Any]], key: str | None = "k1"
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await client.post(BATCH, json={"records": records}, headers=headers)


async def readback(client: httpx.AsyncClient) -> dict[str, Any]:
    resp = await client.get("/_mock/applied")
    assert resp.status_code == 200
    return resp.json()  # type: ignore[no-any-return]


async def test_accepted_receipts_and_readback(client: httpx.AsyncClient) -> None:
    resp = await send(client, [rec("R1"), rec("R2", withdrawn=True)])
    assert resp.status_code == 200
    receipts = resp.json()["receipts"]
    assert [(r["record_id"], r["version"], r["status"]) for r in receipts] == [
        ("R1", 1, "accepted"),
        ("R2", 1, "accepted"),
    ]
    assert all(RECEIPT_NO.match(r["receipt_no"]) and r["reason"] is None for r in receipts)
    assert receipts[0]["receipt_no"] != receipts[1]["receipt_no"]

    state = await readback(client)
    assert [
        (a["record_id"], a["withdrawn"], a["seq"], a["idempotency_key"]) for a in state["applied"]
    ] == [("R1", False, 1, "k1"), ("R2", True, 2, "k1")]
    assert state["applied"][0]["receipt_no"] == receipts[0]["receipt_no"]
    assert state["requests"] == {"total": 1, "by_status": {"200": 1}}
    assert state["double_applied"] == [] and state["out_of_order"] == []

    one = (await client.get("/_mock/applied/R2")).json()
    assert one["versions"][0]["record"]["activity"]["title"] == "高原生态修复技术研修班"


async def test_same_key_replays_stored_receipts_and_applies_nothing(
    client: httpx.AsyncClient,
) -> None:
    first = await send(client, [rec("R1")], key="same")
    again = await send(client, [rec("R1")], key="same")
    assert again.status_code == 200
    assert again.json() == first.json()
    assert again.json()["receipts"][0]["status"] == "accepted"  # not "duplicate": a replay

    # A different batch under a used key still gets the stored reply, and is flagged.
    other = await send(client, [rec("R9")], key="same")
    assert other.json() == first.json()
    state = await readback(client)
    assert [a["record_id"] for a in state["applied"]] == ["R1"]
    assert state["key_mismatch"] == [
        {"idempotency_key": "same", "first": [["R1", 1]], "now": [["R9", 1]]}
    ]


async def test_replay_conflict_answers_409_with_receipts(
    client: httpx.AsyncClient, faults: Faults
) -> None:
    faults.replay_conflict = True
    first = await send(client, [rec("R1")], key="k")
    again = await send(client, [rec("R1")], key="k")
    assert (first.status_code, again.status_code) == (200, 409)
    assert again.json() == first.json()


async def test_same_version_under_new_key_is_duplicate(client: httpx.AsyncClient) -> None:
    first = (await send(client, [rec("R1")], key="a")).json()["receipts"][0]
    resp = await send(client, [rec("R1"), rec("R2")], key="b")
    dup, fresh = resp.json()["receipts"]
    assert dup["status"] == "duplicate"
    assert dup["receipt_no"] == first["receipt_no"]
    assert fresh["status"] == "accepted"
    assert [a["record_id"] for a in (await readback(client))["applied"]] == ["R1", "R2"]


async def test_reject_marker_and_reject_ids(client: httpx.AsyncClient, faults: Faults) -> None:
    faults.reject_ids = {"632123199001011234"}
    records = [
        rec("R1", title="[REJECT] 考前辅导班"),
        rec("R2"),
        rec("R3", id_number="632123199001011234"),
    ]
    receipts = (await send(client, records)).json()["receipts"]
    assert [r["status"] for r in receipts] == ["rejected", "accepted", "rejected"]
    assert receipts[0]["receipt_no"] is None and "[REJECT]" in receipts[0]["reason"]
    assert "id_number" in receipts[2]["reason"]
    assert [a["record_id"] for a in (await readback(client))["applied"]] == ["R2"]


async def test_missing_idempotency_key_is_400(client: httpx.AsyncClient) -> None:
    resp = await send(client, [rec("R1")], key=None)
    assert resp.status_code == 400
    assert "Idempotency-Key" in resp.json()["error"]
    state = await readback(client)
    assert state["applied"] == [] and state["requests"]["by_status"] == {"400": 1}


@pytest.mark.parametrize(
    "body",
    [
        {"records": []},
        {"records": [{"record_id": f"R{i}", "version": 1} for i in range(MAX_BATCH + 1)]},
        {"records": [{"version": 1}]},
        {"records": [{"record_id": "R1"}]},
        {"records": [{"record_id": "R1", "version": "1"}]},
        {"items": []},
        [1, 2],
    ],
    ids=[
        "empty",
        "oversized",
        "no-record-id",
        "no-version",
        "string-version",
        "no-records",
        "not-object",
    ],
)
async def test_malformed_batch_is_400_and_applies_nothing(
    client: httpx.AsyncClient, body: Any
) -> None:
    # A good record beside the bad one must not be applied either: 400 is all-or-nothing.
    if isinstance(body, dict) and body.get("records") and len(body["records"]) == 1:
        body = {"records": [rec("OK"), *body["records"]]}
    resp = await client.post(BATCH, json=body, headers={"Idempotency-Key": "k"})
    assert resp.status_code == 400
    assert resp.json()["error"]
    assert (await readback(client))["applied"] == []


async def test_full_batch_of_max_size_is_accepted(client: httpx.AsyncClient) -> None:
    resp = await send(client, [rec(f"R{i}") for i in range(MAX_BATCH)])
    assert resp.status_code == 200 and len(resp.json()["receipts"]) == MAX_BATCH


async def test_non_json_body_is_400(client: httpx.AsyncClient) -> None:
    resp = await client.post(BATCH, content=b"{nope", headers={"Idempotency-Key": "k"})
    assert resp.status_code == 400


async def test_outage_then_recovery(client: httpx.AsyncClient) -> None:
    assert (await client.post("/_mock/faults", json={"outage": True})).status_code == 200
    down = await send(client, [rec("R1")])
    assert down.status_code == 503 and down.headers["Retry-After"] == "1"
    assert (await readback(client))["applied"] == []

    await client.post("/_mock/faults", json={"outage": False})
    up = await send(client, [rec("R1")])
    assert up.status_code == 200 and up.json()["receipts"][0]["status"] == "accepted"
    assert (await readback(client))["requests"]["by_status"] == {"503": 1, "200": 1}


async def test_outage_window_ends_by_itself(client: httpx.AsyncClient, faults: Faults) -> None:
    resp = await client.post("/_mock/faults", json={"outage_seconds": 60})
    assert resp.json()["outage_until"] > time.time()
    assert (await send(client, [rec("R1")])).status_code == 503
    assert faults.in_outage(now=time.time() + 61) is False
    faults.stop_outage()
    assert (await send(client, [rec("R1")])).status_code == 200


async def test_rate_limit_every_second_request(client: httpx.AsyncClient, faults: Faults) -> None:
    faults.rate_limit_every = 2
    statuses = []
    for i in range(4):
        resp = await send(client, [rec(f"R{i}")], key=f"k{i}")
        statuses.append(resp.status_code)
        if resp.status_code == 429:
            assert resp.headers["Retry-After"] == "1"
    assert statuses == [200, 429, 200, 429]
    assert [a["record_id"] for a in (await readback(client))["applied"]] == ["R0", "R2"]


async def test_lost_reply_applies_then_replay_returns_receipts(
    client: httpx.AsyncClient, faults: Faults
) -> None:
    faults.lost_reply_rate = 1.0
    lost = await send(client, [rec("R1")], key="k")
    assert lost.status_code == 503
    state = await readback(client)
    assert [a["record_id"] for a in state["applied"]] == ["R1"]  # applied despite the 503

    retry = await send(client, [rec("R1")], key="k")
    assert retry.status_code == 200
    receipt = retry.json()["receipts"][0]
    assert receipt["status"] == "accepted"
    assert receipt["receipt_no"] == state["applied"][0]["receipt_no"]
    state = await readback(client)
    assert len(state["applied"]) == 1 and state["double_applied"] == []


async def test_error_rate_one_applies_nothing(client: httpx.AsyncClient, faults: Faults) -> None:
    faults.error_rate = 1.0
    for i in range(3):
        assert (await send(client, [rec("R1")], key=f"k{i}")).status_code == 503
    state = await readback(client)
    assert state["applied"] == [] and state["requests"]["by_status"] == {"503": 3}


async def test_error_rate_is_deterministic_with_seed() -> None:
    async def run() -> list[int]:
        app = create_app(Faults(error_rate=0.5, seed=42))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://m") as c:
            return [(await send(c, [rec(f"R{i}")], key=f"k{i}")).status_code for i in range(20)]

    first, second = await run(), await run()
    assert first == second
    assert set(first) == {200, 503}


async def test_out_of_order_versions_are_recorded(client: httpx.AsyncClient) -> None:
    await send(client, [rec("A", 1), rec("A", 2)], key="in-order")
    assert (await readback(client))["out_of_order"] == []

    await send(client, [rec("B", 2)], key="b2")
    resp = await send(client, [rec("B", 1)], key="b1")
    assert resp.json()["receipts"][0]["status"] == "accepted"
    assert (await readback(client))["out_of_order"] == [
        {"record_id": "B", "version": 1, "highest_applied": 2, "idempotency_key": "b1"}
    ]


async def test_duplicate_receipts_fault_repeats_each_receipt(
    client: httpx.AsyncClient, faults: Faults
) -> None:
    faults.duplicate_receipts = True
    receipts = (await send(client, [rec("R1"), rec("R2")])).json()["receipts"]
    assert [r["record_id"] for r in receipts] == ["R1", "R1", "R2", "R2"]
    assert len((await readback(client))["applied"]) == 2


async def test_latency_is_added(client: httpx.AsyncClient, faults: Faults) -> None:
    faults.latency_ms = 60
    started = time.perf_counter()
    await send(client, [rec("R1")])
    assert time.perf_counter() - started >= 0.05


async def test_faults_endpoint_validates_and_reset_restores(
    client: httpx.AsyncClient, faults: Faults
) -> None:
    assert (await client.post("/_mock/faults", json={"nope": 1})).status_code == 400
    assert (await client.post("/_mock/faults", json={"error_rate": "lots"})).status_code == 400
    resp = await client.post("/_mock/faults", json={"error_rate": 0.3, "reject_ids": ["X"]})
    assert resp.json()["error_rate"] == 0.3 and faults.reject_ids == {"X"}
    assert (await client.get("/_mock/faults")).json()["reject_ids"] == ["X"]

    faults.error_rate = 0.0
    await send(client, [rec("R1")])
    await client.post("/_mock/reference/bases", json={"items": [{"code": "B1"}]})
    assert (await client.post("/_mock/reset")).status_code == 200
    state = await readback(client)
    assert state["applied"] == [] and state["requests"]["total"] == 0
    assert faults.reject_ids == set() and faults.seed == 7
    assert (await client.get("/api/v1/reference/bases")).json()["items"] == []
    # The key store was cleared too: the same key applies afresh.
    assert (await send(client, [rec("R1")])).json()["receipts"][0]["status"] == "accepted"


async def test_reference_paging(client: httpx.AsyncClient) -> None:
    items = [
        {
            "code": f"QH{i:04d}",
            "name": f"基地{i}",
            "level": "provincial",
            "status": "active",
            "assessed_on": "2025-06-01",
        }
        for i in range(250)
    ]
    loaded = await client.post("/_mock/reference/bases", json={"items": items})
    assert loaded.json() == {"loaded": 250, "total": 250}

    codes: list[str] = []
    cursors: list[str | None] = []
    params: dict[str, str] = {}
    while True:
        page = (await client.get("/api/v1/reference/bases", params=params)).json()
        assert len(page["items"]) <= PAGE_SIZE
        assert all(i["updated_at"] for i in page["items"])
        codes += [i["code"] for i in page["items"]]
        cursors.append(page["next"])
        if page["next"] is None:
            break
        params = {"cursor": page["next"]}
    assert codes == [i["code"] for i in items]
    assert cursors == ["100", "200", None]


async def test_reference_since_filter(client: httpx.AsyncClient) -> None:
    items = [
        {"plan_id": "P1", "updated_at": "2026-01-01T00:00:00+08:00"},
        {"plan_id": "P2", "updated_at": "2026-03-01T00:00:00+08:00"},
        {"plan_id": "P3"},  # stamped now
    ]
    await client.post("/_mock/reference/plans", json={"items": items})
    page = await client.get(
        "/api/v1/reference/plans", params={"since": "2026-02-01T00:00:00+08:00"}
    )
    assert [i["plan_id"] for i in page.json()["items"]] == ["P2", "P3"]
    assert page.json()["next"] is None
    all_plans = (await client.get("/api/v1/reference/plans")).json()["items"]
    assert len(all_plans) == 3
    bad = await client.get("/api/v1/reference/plans", params={"since": "yesterday"})
    assert bad.status_code == 400


async def test_reference_unknown_kind_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/v1/reference/teachers")).status_code == 404
    resp = await client.post("/_mock/reference/teachers", json={"items": []})
    assert resp.status_code == 404
    for kind in ("deferrals", "title-applicants"):
        assert (await client.get(f"/api/v1/reference/{kind}")).json() == {"items": [], "next": None}


async def test_healthz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}


def test_serve_runs_uvicorn_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kwargs: Any) -> None:
        seen["app"] = app
        seen.update(kwargs)

    monkeypatch.setattr(ce_system.uvicorn, "run", fake_run)
    ce_system.serve(port=8799, faults=Faults(outage=True))
    assert seen["port"] == 8799 and seen["host"] == "127.0.0.1"
    assert seen["log_level"] == "warning"
    assert seen["app"].state.mock.faults.outage is True
