"""The dashboard in a real browser: `registry up`, `registry http` and `agent simulate` as
processes, headless Chromium driven over the DevTools protocol (tests/integration/cdp.py).

One scenario, as an operator sees it: the fleet appears and the counts match the API; a
new worker's row appears without a reload, with its untrusted name shown as text; the
filters and sorts narrow and order the rows; the worker leaves and its row goes offline,
live; its page shows the explain narrative and history. With DASHBOARD_SCREENSHOT set,
the fleet view is saved to docs/dashboard.png (the README's picture).

Needs the `chromium` package (.ci/run installs it): skipped without it, failed in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from tests.conftest import eventually
from tests.integration.cdp import Page, chromium, find_chromium
from tests.integration.registry_helpers import (
    RegistryProcess,
    bounded,
    new_incarnation,
    publish,
    register_body,
    registry_process,
    unregister_body,
)

ROOT = Path(__file__).resolve().parents[2]
FLEET = 20
NEW = "dash-new-1"
UNTRUSTED = '<img src=x onerror="window.__xss = 1">dash <b>new</b>'
STATS = ("total", "available", "online", "busy", "offline",
         "gpu_workers", "cpu_workers", "hybrid_workers")  # fmt: skip


@pytest.fixture
def browser_binary() -> str:
    found = find_chromium()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


@contextlib.asynccontextmanager
async def child(args: list[str], log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Python entry point as a child process (output to a file); stopped on exit, whatever
    happens: SIGTERM, then SIGKILL after 10 s."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("NATS_URL", None)
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - a local file, at once
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args, cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), 10.0)


@contextlib.asynccontextmanager
async def stopped(
    started: contextlib.AbstractAsyncContextManager[RegistryProcess],
) -> AsyncIterator[RegistryProcess]:
    """`registry up`/`registry http`, stopped with SIGTERM on the way out (so the embedded
    nats-server goes too); killed after 15 s by registry_process if that did not do."""
    async with started as proc:
        try:
            yield proc
        finally:
            with contextlib.suppress(Exception):
                await proc.terminate(15.0)


class Api:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base

    async def get(self, path: str) -> Any:
        async with self.http.get(f"{self.base}/api/v1{path}") as res:
            assert res.status == 200, f"GET {path}: {res.status} {await res.text()}"
            return await res.json()


async def counts_match(page: Page, api: Api) -> bool:
    keys = json.dumps(list(STATS))
    shown = await page.evaluate(
        f"Object.fromEntries({keys}.map(k => [k, document.getElementById('count-' + k).textContent]))"
    )
    stats = await api.get("/workers/stats")
    return all(shown[k] == str(stats[k]) for k in STATS)


def row(worker_id: str) -> str:
    return f"document.querySelector('tr[data-worker-id=\"{worker_id}\"]')"


ROW_IDS = "[...document.querySelectorAll('#worker-rows tr')].map(tr => tr.dataset.workerId)"


async def choose(page: Page, element_id: str, value: str) -> None:
    """Set a filter as a person would: the value, then the event the page listens to."""
    event = "input" if element_id == "filter-tag" else "change"
    await page.evaluate(
        f"(() => {{ const e = document.getElementById({json.dumps(element_id)}); "
        f"e.value = {json.dumps(value)}; e.dispatchEvent(new Event('{event}')); }})()"
    )
    await page.evaluate("new Promise(r => setTimeout(r, 200))")  # the page redraws in 50 ms


async def screenshot(page: Page, tmp_path: Path, name: str, docs: bool = False) -> None:
    paths = [tmp_path / f"{name}.png"]
    if docs and os.environ.get("DASHBOARD_SCREENSHOT"):
        paths.append(ROOT / "docs" / "dashboard.png")
    await page.screenshot(*paths)


@bounded(150)
async def test_dashboard_follows_the_fleet_live_in_a_browser(
    tmp_path: Path, browser_binary: str
) -> None:
    data = ["--port", "0", "--data-dir", str(tmp_path / "data")]
    async with stopped(registry_process(data, tmp_path / "registry.log")) as registry:
        url = await registry.first_line(30.0)
        http_command = [sys.executable, "-m", "registry.cli", "http"]
        fleet = ["agent", "simulate", "--nats", url, "--count", str(FLEET),
                 "--heartbeat-interval", "2", "--seed", "7", "--id-prefix", "sim"]  # fmt: skip
        async with (
            stopped(registry_process(["--nats", url, "--port", "0"], tmp_path / "gateway.log",
                                     command=http_command)) as gateway,
            child(fleet, tmp_path / "fleet.log"),
            aiohttp.ClientSession() as http,
        ):  # fmt: skip
            api = Api(http, (await gateway.first_line(30.0)).rstrip("/"))
            await eventually(lambda: api.get("/health"), timeout=30.0)
            await eventually(lambda: _len_is(api.get("/workers"), FLEET), timeout=30.0)
            async with chromium(browser_binary, tmp_path / "profile",
                                tmp_path / "chromium.log") as page:  # fmt: skip
                await _scenario(page, api, url, tmp_path)


async def _len_is(answer: Any, n: int) -> bool:
    return len(await answer) == n


async def _scenario(page: Page, api: Api, nats_url: str, tmp_path: Path) -> None:
    await page.navigate(f"{api.base}/")
    await page.evaluate("window.__loadedOnce = 'yes'")  # gone if the page ever reloads

    # the fleet, and the counts as the API has them
    await page.wait_for(f"{ROW_IDS}.filter(id => id.startsWith('sim-')).length === {FLEET}",
                        20.0, f"{FLEET} simulated workers shown")  # fmt: skip
    await eventually(lambda: counts_match(page, api), timeout=15.0)
    await page.wait_for("document.getElementById('feed-state').dataset.state === 'live'", 10.0)
    await page.wait_for("document.getElementById('health').dataset.status === 'ok'", 10.0)
    assert await page.evaluate("document.getElementById('health-holder').textContent") != "none"

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        incarnation = new_incarnation()
        body = register_body(NEW, incarnation, capability="hybrid",
                             supported_content_types=["document", "text"],
                             tags={"team": "dashboard", "note": "<script>x</script>"})  # fmt: skip
        body["registration"]["name"] = UNTRUSTED
        await publish(js, "register", NEW, body)

        # a new worker appears live, its untrusted strings as text
        await page.wait_for(f"{row(NEW)} && {row(NEW)}.dataset.status === 'online'", 10.0,
                            "the new worker's row")  # fmt: skip
        name = await page.evaluate(f"{row(NEW)}.querySelector('[data-col=name]').textContent")
        assert name == UNTRUSTED
        assert (
            await page.evaluate("document.querySelectorAll('#workers img, #workers b').length") == 0
        )
        await page.wait_for(f"document.getElementById('count-total').textContent === '{FLEET + 1}'",
                            10.0, "the total counting the new worker")  # fmt: skip
        await eventually(lambda: counts_match(page, api), timeout=15.0)

        await _filters_and_sorts(page, api)

        # it leaves: its row goes from the live view, and shows offline among the offline
        await publish(js, "unregister", NEW, unregister_body(NEW, incarnation, reason="done"))
        await page.wait_for(f"!{row(NEW)}", 10.0, "the row leaving the live view")
        await choose(page, "filter-status", "offline")
        status = await page.wait_for(
            f"{row(NEW)} && {row(NEW)}.querySelector('[data-col=status]').textContent", 5.0
        )
        assert status == "offline (unregistered)"
        await choose(page, "filter-status", "")
        await page.wait_for(f"document.getElementById('count-total').textContent === '{FLEET}'",
                            10.0, "the total without the worker that left")  # fmt: skip
    finally:
        await nc.close()

    # its page: the record, the explain narrative and the history
    await page.evaluate(f"location.hash = '#/workers/{NEW}'")
    explained = await api.get(f"/workers/{NEW}/explain")
    await page.wait_for(
        "[...document.querySelectorAll('#worker-explain li')].map(li => li.textContent).join('\\n')"
        f" === {json.dumps(chr(10).join(explained['lines']))}", 10.0, "the explain lines",
    )  # fmt: skip
    assert any("unregistered" in line for line in explained["lines"])
    if explained.get("state"):  # the verdict above the history, when the gateway gives one
        shown = await page.evaluate("document.getElementById('worker-state').textContent")
        assert shown == explained["state"]
    history = await page.wait_for("document.querySelectorAll('#worker-history tbody tr').length")
    assert history == len((await api.get(f"/workers/{NEW}/history?limit=50"))["events"]) >= 2
    status = await page.evaluate("document.querySelector('[data-field=status] dd').textContent")
    assert status == "offline (unregistered)"
    await screenshot(page, tmp_path, "worker")

    await page.evaluate("location.hash = '#/'")
    await page.wait_for(f"{ROW_IDS}.length === {FLEET}", 10.0, "back to the fleet")
    await screenshot(page, tmp_path, "fleet", docs=True)  # the fleet has run a while: some load
    assert await page.evaluate("window.__loadedOnce") == "yes", "the page reloaded"
    lists = await page.evaluate(
        "performance.getEntriesByType('resource').filter(e => e.name.includes('/workers?')).length"
    )
    assert lists == 1, "the list was read again: the changes did not come from the feed alone"
    assert await page.evaluate("window.__xss") is None
    assert page.errors == []


async def _filters_and_sorts(page: Page, api: Api) -> None:
    await choose(page, "filter-tag", "team=dashboard")
    assert await page.evaluate(ROW_IDS) == [NEW]
    await choose(page, "filter-tag", "")

    await choose(page, "filter-capability", "gpu")
    gpu = await api.get("/workers/stats")
    shown = await page.evaluate("[...document.querySelectorAll('#worker-rows tr')]"
                                ".map(tr => tr.dataset.capability)")  # fmt: skip
    assert set(shown) == {"gpu"} and len(shown) == gpu["gpu_workers"]
    await choose(page, "filter-capability", "")

    await choose(page, "filter-content-type", "document")
    documents = {
        r["registration"]["worker_id"] for r in await api.get("/workers")
        if "document" in r["registration"]["supported_content_types"]
    }  # fmt: skip
    assert set(await page.evaluate(ROW_IDS)) == documents and NEW in documents
    await choose(page, "filter-content-type", "")

    await choose(page, "sort", "id")
    ids = await page.evaluate(ROW_IDS)
    assert ids == sorted(ids) and len(ids) == FLEET + 1
    await choose(page, "sort", "load")
    loads = await page.evaluate("[...document.querySelectorAll('#worker-rows tr')]"
                                ".map(tr => Number(tr.dataset.load))")  # fmt: skip
    assert loads == sorted(loads, reverse=True)
