"""The ops console in a real browser: Debian's headless Chromium driven by Playwright.

A real gateway (uvicorn on 127.0.0.1, with its delivery worker) sends to the mock management
system, which refuses one person's records until the fault is lifted: the record goes dead.
An operator then logs in, finds the dead delivery, reprocesses it (dry run "将重新投递 1 条",
then a confirmation with a reason) and watches the record page turn 已投递, while the mock
shows the version applied exactly once.  A viewer in the same browser sees no action buttons
and a forged POST with its own session's CSRF token is refused 403.

Nothing is downloaded: the browser is ``/usr/bin/chromium`` (``make browser`` installs it as
root); without it, or without Playwright, the test skips saying so.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from gateway.accounts import Partner
from gateway.api.app import create_app
from gateway.config import Settings
from gateway.signing import SigningClient
from gateway.store.db import make_engine
from gateway.store.tables import outbox
from mock_partners import generators as gen
from mock_partners.ce_system import Faults
from tests.support.servers import poll, uvicorn_thread

CHROMIUM = Path("/usr/bin/chromium")
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (pip install -e '.[dev]')")
if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
    pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (`make browser` installs "
                "it when run as root with apt-get)", allow_module_level=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            launched.close()


def _status(engine: Engine, record_id: str) -> str | None:
    with engine.connect() as conn:
        return conn.execute(select(outbox.c.status).where(outbox.c.record_id == record_id)
                            .order_by(outbox.c.version.desc())).scalars().first()


def _log_in(page: Any, url: str, token: str) -> None:
    page.goto(f"{url}/ops")
    assert "/ops/login" in page.url  # not logged in: sent to the login page
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/ops")
    assert page.inner_text("h1") == "概览"


def test_operator_reprocesses_a_dead_delivery_and_a_viewer_cannot(
    sqlite_url: str, make_settings: Callable[..., Settings], new_partner: Callable[..., Partner],
    new_operator: Callable[..., str], mock_ce: tuple[str, Faults], browser: Any,
) -> None:
    mock_url, faults = mock_ce
    engine = make_engine(sqlite_url)
    partner = new_partner(engine)
    operator_token, viewer_token = new_operator(engine, "operator"), new_operator(engine, "viewer")
    submission = gen.canonical_submission(random.Random(8), "WEB-1")
    faults.reject_ids.add(submission["person"]["id_number"])  # the mock refuses this person

    app = create_app(make_settings(sqlite_url, mock_url), run_worker=True)
    with uvicorn_thread(app) as url, SigningClient(url, partner.app_key, partner.secret) as client:
        [answer] = client.submit([submission]).json()["results"]
        record_id = answer["record_id"]
        poll(lambda: _status(engine, record_id) == "dead", 20, what="the delivery dead-lettered")
        faults.reject_ids.clear()  # the management system is fixed; ops may now reprocess

        page = browser.new_context(locale="zh-CN", timezone_id="Asia/Shanghai").new_page()
        page.set_default_timeout(30_000)  # generous: CI machines are busy
        _log_in(page, url, operator_token)
        assert page.inner_text("#circuit") == "闭合（正常投递）"  # this process runs the worker
        page.click("nav >> text=失败投递")
        row = page.locator(f"#deliveries tr[data-record='{record_id}']")
        assert "DOWNSTREAM_REJECTED" in row.inner_text()
        row.locator("button.reprocess").click()
        page.wait_for_url(f"{url}/ops/deliveries/reprocess")
        assert "将重新投递 1 条" in page.inner_text("#dry-run")
        assert _status(engine, record_id) == "dead"  # the dry run changed nothing
        page.fill("#reason", "管理系统已修复，重新投递")
        page.click("#confirm")
        assert "已重新排队 1 条" in page.inner_text("#requeued")

        page.goto(f"{url}/ops/records/{record_id}")

        def delivered_on_page() -> bool:
            page.reload()
            return page.inner_text("#record-status") == "已投递"

        poll(delivered_on_page, 20, interval=0.2, what="the record page to show 已投递")
        assert "运维重新投递" in page.inner_text("#timeline")
        applied = httpx.get(f"{mock_url}/_mock/applied").json()
        assert [a["record_id"] for a in applied["applied"]].count(record_id) == 1
        assert applied["double_applied"] == []
        assert submission["person"]["id_number"] not in page.content()  # shown masked only

        # A viewer: the pages, no buttons; a forged POST (own valid CSRF token) is a 403.
        viewer = browser.new_context(locale="zh-CN").new_page()
        viewer.set_default_timeout(30_000)  # generous: CI machines are busy
        _log_in(viewer, url, viewer_token)
        viewer.goto(f"{url}/ops/deliveries?status=")
        assert viewer.locator(f"#deliveries tr[data-record='{record_id}']").count() == 1
        assert viewer.locator("button.reprocess").count() == 0
        found = re.search(r'name="csrf" value="([^"]+)"', viewer.content())
        assert found is not None
        forged = viewer.request.post(f"{url}/ops/deliveries/reprocess", form={
            "csrf": found.group(1), "step": "confirm", "record_id": record_id, "reason": "x"})
        assert forged.status == 403 and "无权操作" in forged.text()
    engine.dispose()
